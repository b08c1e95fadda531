"""A watch on the validation videos, for the burn a learning rate too high gives.

Users of the official trainer report it for CogVideoX-5B LoRAs: past some rate the videos turn garish,
colours saturate and blow out, long before the loss says anything; further on the model collapses into
a mosaic of noise (the demo model at 30 times its rate: BENCHMARKS.md). Each validation round here
measures each of its videos; the log keeps the figures, one per validation prompt
(`validation_saturation`, `validation_vivid`, `validation_blown`, `validation_detail`), and a video that
has left the base model's video of the same prompt and seed far behind (made at step 0, before any
training; a LoRA run resumed with other validation settings makes it then, the LoRA left out) gets a
warning that names the levers. Fine-tuning towards a vivid, bright or busy style moves the figures too, so
the warning says what it measured and leaves the judgement to the eye.
"""

from __future__ import annotations

import numpy as np

FIGURES = ("validation_saturation", "validation_vivid", "validation_blown", "validation_detail")
# A burn, against the base model's video of the same prompt: garish (the mean saturation up by this much
# and this much more of the picture fully saturated), blown out (this much more of it at full brightness),
# or broken into noise (neighbouring pixels this many times as different, and by this much at least).
SATURATION_RISE = 0.15
VIVID_RISE = 0.10
BLOWN_RISE = 0.20
DETAIL_FACTOR = 3.0
DETAIL_RISE = 0.01
_VIVID = 0.9  # a pixel this saturated counts as fully so (its weakest channel under a tenth of its strongest)
_BLOWN = 250  # a pixel whose strongest channel reaches this is at full brightness
_DARK = 0.1  # pixels darker than this are left out of the saturation: their hue is noise
_STRIDE = 4  # every 4th pixel of every 2nd frame is plenty for a mean


def measure_video(frames: np.ndarray) -> tuple[float, float, float, float]:
    """(mean HSV saturation of the pixels brighter than a tenth, their share fully saturated, the share of
    all pixels at full brightness, the mean difference of neighbouring pixels in [0, 1]) of a uint8 video
    [F, H, W, 3]."""
    pixels = frames[::2, ::_STRIDE, ::_STRIDE].reshape(-1, 3)
    strongest = pixels.max(axis=1)
    blown = float((strongest >= _BLOWN).mean())
    every = frames[::2].astype(np.float32) / 255.0  # neighbours need every pixel of a frame
    detail = float((np.abs(np.diff(every, axis=1)).mean() + np.abs(np.diff(every, axis=2)).mean()) / 2)
    value = strongest.astype(np.float32) / 255.0
    lit = value >= _DARK
    if not lit.any():
        return 0.0, 0.0, blown, detail
    saturation = (value[lit] - pixels[lit].min(axis=1).astype(np.float32) / 255.0) / value[lit]
    return float(saturation.mean()), float((saturation >= _VIVID).mean()), blown, detail


def measure(videos: list[np.ndarray]) -> dict[str, list[float]]:
    """The figures of each video, as the log records them: each of `FIGURES`, one value per video."""
    per_video = [measure_video(frames) for frames in videos]
    return {name: [round(figures[k], 4) for figures in per_video] for k, name in enumerate(FIGURES)}


def burn_warning(
    base: dict[str, list[float]] | None, now: dict[str, list[float]], step: int, lr: float, prompts: list[str]
) -> str | None:
    """The warning for a validation round at `step` with a video whose colours `now` have burnt against
    the base model's video of the same prompt (`base`, None when unknown or of other prompts: no
    warning), or None."""
    if base is None or any(len(base[name]) != len(prompts) or len(now[name]) != len(prompts) for name in FIGURES):
        return None
    burnt = []
    for i, prompt in enumerate(prompts):
        (s0, v0, b0, d0), (s1, v1, b1, d1) = ([figures[name][i] for name in FIGURES] for figures in (base, now))
        garish = s1 - s0 >= SATURATION_RISE and v1 - v0 >= VIVID_RISE
        noise = d1 >= DETAIL_FACTOR * d0 and d1 - d0 >= DETAIL_RISE
        if garish or noise or b1 - b0 >= BLOWN_RISE:
            burnt.append(
                f'{i} ("{prompt}": mean saturation {s0:.2f} -> {s1:.2f}, fully saturated pixels {v0:.0%} -> '
                f"{v1:.0%}, blown-out pixels {b0:.0%} -> {b1:.0%}, neighbour difference {d0:.3f} -> {d1:.3f})"
            )
    if not burnt:
        return None
    return (
        f"the colours of validation video {'; '.join(burnt)} at step {step} have left the base model's far "
        f"behind. Unless the training clips look like that, the learning rate ({lr:g}) is likely too high for "
        "this model: look at the videos, and if they are burnt, resume from an earlier checkpoint (delete the "
        "newer ones in checkpoints/) with a lower lr (or use a lower LoRA scale at generation)"
    )


def base_colours(records: list[dict], settings: dict | None = None) -> dict[str, list[float]] | None:
    """The base model's figures from a run's log: its step-0 validation round (the latest, when a restart
    made it again) made with these validation `settings` (a round logged without any counts as made
    with them), or None."""
    for record in reversed(records):
        if record["step"] == 0 and all(isinstance(record.get(name), list) for name in FIGURES):
            if settings is None or record.get("validation", settings) == settings:
                return {name: record[name] for name in FIGURES}
    return None

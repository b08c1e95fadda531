"""A watch on the colours of the validation videos, for the burn a learning rate too high gives.

Users of the official trainer report it for CogVideoX-5B LoRAs: past some rate the videos turn garish,
colours saturate and blow out, long before the loss says anything. Each validation round here measures
its videos' colours; the log keeps the figures (`validation_saturation`, `validation_vivid`), and a round
whose colours have left the base model's far behind (its videos of the same prompts and seed, made at
step 0 before any training) gets a warning that names the levers. Fine-tuning towards a vivid style moves
the figures too, so the warning says what it measured and leaves the judgement to the eye.
"""

from __future__ import annotations

import numpy as np

# A burn: the mean saturation up by this much over the base model's, and this much more of the picture
# fully saturated. Natural video sits near 0.3 and a few per cent; a burnt one well above 0.5 and a quarter.
SATURATION_RISE = 0.15
VIVID_RISE = 0.10
_VIVID = 0.9  # a pixel this saturated counts as fully so (its weakest channel under a tenth of its strongest)
_DARK = 0.1  # pixels darker than this are left out: their hue is noise
_STRIDE = 4  # every 4th pixel of every 2nd frame is plenty for a mean


def measure(videos: list[np.ndarray]) -> dict[str, float]:
    """Mean HSV saturation and the share of fully saturated pixels over uint8 videos [F, H, W, 3] (pixels
    darker than a tenth left out), as the log records them."""
    saturation, vivid, count = 0.0, 0.0, 0
    for frames in videos:
        pixels = frames[::2, ::_STRIDE, ::_STRIDE].reshape(-1, 3).astype(np.float32) / 255.0
        value = pixels.max(axis=1)
        lit = value >= _DARK
        s = (value[lit] - pixels[lit].min(axis=1)) / value[lit]
        saturation += float(s.sum())
        vivid += float((s >= _VIVID).sum())
        count += int(lit.sum())
    if count == 0:  # black videos: no colour to speak of
        return {"validation_saturation": 0.0, "validation_vivid": 0.0}
    return {"validation_saturation": round(saturation / count, 4), "validation_vivid": round(vivid / count, 4)}


def burn_warning(base: dict[str, float] | None, now: dict[str, float], step: int, lr: float) -> str | None:
    """The warning for a validation round at `step` whose colours `now` have burnt against the base
    model's (`base`, None when unknown: no warning), or None."""
    if base is None:
        return None
    saturation = now["validation_saturation"] - base["validation_saturation"]
    vivid = now["validation_vivid"] - base["validation_vivid"]
    if saturation < SATURATION_RISE or vivid < VIVID_RISE:
        return None
    return (
        f"the validation videos at step {step} are far more saturated than the base model's: mean saturation "
        f"{base['validation_saturation']:.2f} -> {now['validation_saturation']:.2f}, fully saturated pixels "
        f"{base['validation_vivid']:.0%} -> {now['validation_vivid']:.0%}. Unless the training clips are this "
        f"vivid, the learning rate ({lr:g}) is likely too high for this model: look at the videos, and if they "
        "are burnt, resume from an earlier checkpoint with a lower lr (or a lower LoRA scale at generation)"
    )


def base_colours(records: list[dict]) -> dict[str, float] | None:
    """The base model's figures from a run's log: its step-0 validation round, or None."""
    for record in records:
        if record["step"] == 0 and "validation_saturation" in record:
            return {k: record[k] for k in ("validation_saturation", "validation_vivid")}
    return None

"""How a video was made, kept in the video file itself: the record `generate` and `batch` write, what
`cogvideox info` prints, and the command that makes the same video again.

The record holds what decides the video (the model, the prompt and seed, the sampling settings as
`batch.video_settings` names them, the inputs, the LoRAs and the levers that change the video) and the
version that made it. Settings that change only how a video is computed (device, offloading, tiling,
compilation, the processes of a torchrun `--parallel` run) are left out, as in the batch manifest: a
parallel video is the single-process one up to summation order (docs/parallel.md), so the command again
makes it on one process, and a batch resumed under another number of processes keeps its videos.
"""

from __future__ import annotations

import os
import shlex

from cogvideox import __version__
from cogvideox.values import is_finite_number

# The key that marks a record as ours, with the version that wrote it.
MARK = "cogvideox"


def lever_settings(pipe) -> dict:
    """The speed levers of a loaded pipeline that change the video: {"quantize", "attention", "cache",
    "quantize_text"}
    for those in use (8-bit attention only; the exact kernels change nothing worth recording)."""
    from cogvideox.batch import LOSSY_ATTENTION

    done = getattr(pipe, "acceleration", None)
    if done is None:
        return {}
    levers = {"quantize": done.quantize, "attention": done.attention if done.attention in LOSSY_ATTENTION else None,
              "quantize_text": done.quantize_text}  # fmt: skip
    if done.cache is not None and done.cache.threshold:
        levers["cache"] = done.cache.threshold
    return {k: v for k, v in levers.items() if v is not None}


def record(prompt: str, seed: int, settings: dict, **inputs) -> dict:
    """The record of one video: `settings` as `batch.video_settings` gives them, and `inputs` such as
    image, video and strength, extend, lora ([[path, scale], ...]), prompt_idea (the prompt before the
    enhancer rewrote it), video_number ([i, n] of --num-videos) and the levers of `lever_settings`
    (None values are left out)."""
    entry = {MARK: __version__, "prompt": prompt, "seed": seed, **settings}
    entry.update({k: v for k, v in inputs.items() if v is not None and v != []})
    return entry


def is_record(metadata: dict) -> bool:
    return isinstance(metadata.get(MARK), str) and isinstance(metadata.get("prompt"), str)


# The commands that remake a video from latents rather than generate one: their videos record what
# made them and from what, not a generation.
REMADE_BY = ("encode", "invert", "regenerate")


def remade_record(made_by: str, source: str | os.PathLike, **details) -> dict:
    """The record of a video that `cogvideox made_by` remade from `source` (the video encoded or inverted,
    or the inversion file regenerated); `details` such as the regeneration's prompt (None values left
    out)."""
    return {MARK: __version__, "remade_by": made_by, "source": str(source),
            **{k: v for k, v in details.items() if v is not None}}  # fmt: skip


def describe_remade(path: str | os.PathLike, metadata: dict) -> str | None:
    """What `cogvideox info` says of a video `remade_record` describes; None for any other."""
    made_by, source = metadata.get("remade_by"), metadata.get("source")
    if not isinstance(metadata.get(MARK), str) or made_by not in REMADE_BY or not isinstance(source, str):
        return None
    if made_by == "regenerate":
        again = ["cogvideox", "regenerate", source]
        if isinstance(metadata.get("prompt_edit"), str):
            again += ["--prompt", metadata["prompt_edit"]]
        return f"{path}: regenerated from the inversion {source}; make it again with: {shlex.join(again)}"
    what = "VAE round trip" if made_by == "encode" else "reconstruction"
    return f"{path}: the {what} of {source} by cogvideox {made_by} (no generation to record)"


# The record's fields that `command` writes as an option's value: each a str or a number.
_OPTION_FIELDS = ("model", "seed", "steps", "guidance", "dynamic_cfg", "scheduler", "frames", "height", "width",
                  "fps", "negative_prompt", "max_sequence_length", "windows", "image", "last_image", "video",
                  "video_fps", "strength", "extend", "resize", "quantize", "quantize_text", "attention", "cache")


_WHOLE_FIELDS = ("seed", "steps", "frames", "height", "width", "max_sequence_length", "windows")
_NUMBER_FIELDS = ("guidance", "strength", "cache")


def damage(entry: dict) -> str | None:
    """What is wrong with a record's fields (an edited or damaged file), or None: a field `command` and
    `describe` read that is not of the kind they write, named with its value."""
    for key in _OPTION_FIELDS:
        value = entry.get(key)
        if value is not None and not isinstance(value, str | int | float):
            return f"{key} is {value!r}, not a string or a number"
    for key in ("dynamic_cfg", "resize", "model"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            return f"{key} is {entry[key]!r}, not a string"
    # What the parser reads as a whole number or as a number: `--seed True` or `--steps 4.5` in the command
    # would be refused by it (a JSON true is a Python int, and a float prints with its point).
    for key in _WHOLE_FIELDS:
        if entry.get(key) is not None and type(entry[key]) is not int:
            return f"{key} is {entry[key]!r}, not a whole number"
    for key in _NUMBER_FIELDS:
        if entry.get(key) is not None and (isinstance(entry[key], bool) or not isinstance(entry[key], int | float)):
            return f"{key} is {entry[key]!r}, not a number"
    loras = entry.get("lora", [])
    if not isinstance(loras, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and is_finite_number(pair[1])
        for pair in loras
    ):
        return f"lora is {loras!r}, not a list of [path, scale] pairs"
    number = entry.get("video_number")
    if number is not None and not (
        isinstance(number, list) and len(number) == 2 and all(type(n) is int and n > 0 for n in number)
    ):
        return f"video_number is {number!r}, not [i, n]"
    return None


def _option(name: str, value) -> list[str]:
    """`name value`, or `name=value` for a value that starts with "-" ("-blurry", a path "-x.png"): argparse
    would take it for an option of its own and stop with "expected one argument"."""
    value = str(value)  # a float as its shortest exact form
    return [f"{name}={value}"] if value.startswith("-") else [name, value]


def command(entry: dict, output: str | None = None) -> list[str]:
    """The `cogvideox generate` arguments that make the recorded video again, writing `output` (None: the
    name left to the user). Inputs are named by the paths recorded, relative to where the video was made.
    A prompt that starts with "-" comes last, after "--", so that it is read as the prompt."""
    prompt = entry["prompt"]
    dashed = prompt.startswith("-")
    args = ["cogvideox", "generate"] + ([] if dashed else [prompt])

    def flag(name: str, key: str, default=None) -> None:
        value = entry.get(key)
        if value is not None and value != default:
            args.extend(_option(name, value))

    if entry.get("model"):  # None: the demo model
        args += _option("--model", entry["model"])
    flag("--variant", "variant")  # the same weights: an fp16 file is not the bf16 one rounded
    flag("--seed", "seed")
    flag("--steps", "steps")
    flag("--guidance", "guidance")
    cfg = entry.get("dynamic_cfg")
    if cfg is not None:
        args += ["--no-dynamic-cfg"] if cfg == "off" else ["--dynamic-cfg", *_option("--dynamic-cfg-clock", cfg)]
    flag("--scheduler", "scheduler")
    flag("--frames", "frames")
    flag("--height", "height")
    flag("--width", "width")
    flag("--fps", "fps")
    flag("--negative-prompt", "negative_prompt", "")
    flag("--max-sequence-length", "max_sequence_length")
    if entry.get("riflex"):
        args.append("--riflex")
    flag("--windows", "windows")
    flag("--image", "image")
    flag("--last-image", "last_image")
    if entry.get("video"):  # a remix's source is a served video, not a file to name
        flag("--video", "video")
        flag("--video-fps", "video_fps")
        flag("--strength", "strength")
    flag("--extend", "extend")
    if entry.get("resize") not in (None, "stretch"):
        args += _option("--resize", entry["resize"])
    for path, scale in entry.get("lora", []):
        args += [*_option("--lora", path), *_option("--lora-scale", scale)]
    flag("--quantize", "quantize")
    flag("--quantize-text", "quantize_text")
    flag("--attention", "attention")
    flag("--cache", "cache")
    number = entry.get("video_number")
    if number:
        args += ["--num-videos", str(number[1])]
    if output is not None:
        args += _option("--output", output)
    return args + (["--", prompt] if dashed else [])


def describe(entry: dict, suffix: str = ".mp4") -> list[str]:
    """`cogvideox info`'s lines for a record: what made it, the settings, and the command again, writing
    the kind of file it was read from (`suffix`: .mp4, .gif, or .png for PNG frames)."""
    lines = [f"made by cogvideox {entry[MARK]} with " + (entry.get("model") or "the demo model")]
    # What is off or empty is left out ("riflex False", "negative_prompt ''").
    shown = {k: v for k, v in entry.items() if k not in (MARK, "model") and v not in (None, False, "", "none")}
    width = max(map(len, shown), default=0)
    lines += [f"  {key.ljust(width)}  {value}" for key, value in shown.items()]
    output = "again-%04d.png" if suffix == ".png" else f"again{suffix}"
    again = shlex.join(command(entry, output))
    number = entry.get("video_number")
    lines.append(f"again: {again}" + (f"  (video {number[0]} of the {number[1]})" if number else ""))
    return lines

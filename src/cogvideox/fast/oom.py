"""Running out of GPU memory anyway: the guard around each pipeline stage and what its error says.

`oom_guard` turns PyTorch's CUDA out-of-memory error into an `OutOfMemoryError` that names the stage,
the bytes asked for and the first setting that would free enough (a stronger offload mode, T5 on the
CPU, VAE tiling or slicing, a smaller request), weighed with the estimates of `memory_plan`; and it
sends offloaded weights home on any error.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping

import torch

from cogvideox.errors import OutOfMemoryError
from cogvideox.fast.memory_plan import ComponentSize, pipeline_sizes, resident_weight_bytes
from cogvideox.fast.offload import DEFAULT_LOOKAHEAD, MODES

_GIB = 2**30

_STAGE_LABELS = {
    "text": "text encoding (T5)",
    "encode": "VAE encoding of the input",
    "denoise": "denoising (transformer)",
    "decode": "VAE decoding",
}
_SIZE = re.compile(r"([\d.]+)\s*(B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_oom(message: str) -> tuple[int | None, int | None]:
    """(bytes asked, bytes free) from PyTorch's CUDA out-of-memory message, None where absent."""

    def find(pattern: str) -> int | None:
        match = re.search(pattern, message)
        if not match:
            return None
        size = _SIZE.match(match.group(1))
        return int(float(size.group(1)) * _UNITS[size.group(2)]) if size else None

    asked = find(r"[Tt]ried to allocate ([\d.]+\s*[KMGT]?i?B)")
    free = find(r"of which ([\d.]+\s*[KMGT]?i?B) is free")
    return asked, free


def suggest(
    stage: str,
    mode: str,
    sizes: Mapping[str, ComponentSize],
    deficit: int | None,
    *,
    lookahead: int = DEFAULT_LOOKAHEAD,
    text_on_device: bool = True,
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    batch: int = 1,
) -> str:
    """The first setting that frees at least `deficit` bytes in `stage` (output unchanged ones first)."""
    now = resident_weight_bytes(mode, stage, sizes, lookahead, text_on_device)
    stronger = MODES[MODES.index(mode) + 1 :] if mode in MODES else ()
    for candidate in stronger:
        freed = now - resident_weight_bytes(candidate, stage, sizes, lookahead, text_on_device)
        if freed > 0 and (deficit is None or freed >= deficit):
            return f"--offload {candidate}"
    if stage == "text" and text_on_device:
        return "--text-device cpu"
    if stage in ("decode", "encode"):
        return vae_advice(vae_tiling, vae_slicing, batch)
    return _smaller_request(batch)


def vae_advice(vae_tiling: bool, vae_slicing: bool, batch: int = 1) -> str:
    """The setting that lowers the VAE's memory in an encode or decode that ran out of it."""
    if not vae_tiling:
        return "--vae-tiling"
    if batch > 1 and not vae_slicing:
        return "--vae-slicing"
    return _smaller_request(batch)


def _smaller_request(batch: int) -> str:
    return "fewer --frames, a smaller --height/--width" + (" or fewer --num-videos" if batch > 1 else "")


@contextlib.contextmanager
def oom_guard(stage: str, pipe, batch: int = 1, explain=None) -> Iterator[None]:
    """Turn a CUDA out-of-memory error in `stage` into an `OutOfMemoryError` that says the stage, how
    much was asked and which setting would fit. Offloaded weights go home on any error. `explain(stage,
    message, pipe, batch)` builds the error: `out_of_memory` by default, for a pipeline; `out_of_vae_memory`
    for a VAE loaded on its own."""
    offload = getattr(pipe, "offload", None)
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        message = str(error)
        # The traceback's frames hold the activations that filled the device; let them go.
        error.__traceback__ = None
    except BaseException:
        if offload is not None:
            offload.release_all()
        raise
    else:
        return
    if offload is not None:
        offload.release_all()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise (explain or out_of_memory)(stage, message, pipe, batch)


def out_of_memory(stage: str, message: str, pipe, batch: int = 1) -> OutOfMemoryError:
    """The `OutOfMemoryError` for PyTorch's `message` raised in `stage` of `pipe`."""
    asked, free = parse_oom(message)
    offload = getattr(pipe, "offload", None)
    mode = offload.mode if offload is not None else "none"
    lookahead = offload.lookahead if offload is not None else DEFAULT_LOOKAHEAD
    managed = offload is not None and "text_encoder" in offload.components
    text_on_device = managed or pipe.text_encoder.model.device == pipe.device
    deficit = None if asked is None else asked - (free or 0)
    advice = suggest(
        stage,
        mode,
        pipeline_sizes(pipe),
        deficit,
        lookahead=lookahead,
        text_on_device=text_on_device,
        vae_tiling=pipe.vae.use_tiling,
        vae_slicing=pipe.vae.use_slicing,
        batch=batch,
    )
    where = _STAGE_LABELS.get(stage, stage)
    text = f"out of GPU memory in {where}{_amounts(asked, free)} (offload {mode}); try {advice}"
    return OutOfMemoryError(text, stage=stage, requested_bytes=asked, suggestion=advice)


def out_of_vae_memory(stage: str, message: str, vae, batch: int = 1) -> OutOfMemoryError:
    """The `OutOfMemoryError` for PyTorch's `message` in an encode or decode of a VAE loaded on its own."""
    asked, free = parse_oom(message)
    advice = vae_advice(vae.use_tiling, vae.use_slicing, batch)
    text = f"out of GPU memory in {_STAGE_LABELS.get(stage, stage)}{_amounts(asked, free)}; try {advice}"
    return OutOfMemoryError(text, stage=stage, requested_bytes=asked, suggestion=advice)


def _amounts(asked: int | None, free: int | None) -> str:
    if asked is None:
        return ""
    more = f": it asked for {asked / _GIB:.2f} GiB more"
    return more if free is None else f"{more} with {free / _GIB:.2f} GiB free"

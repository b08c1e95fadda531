"""Memory planning for offloading: what the weights weigh and which mode fits.

The bytes of each component's weights (as a whole, outside its streamed blocks, per block, per layer)
come from a built pipeline or, before anything is loaded, from a model folder's safetensors headers.
From them and a rough activation estimate per stage, `estimated_peak` gives each offload mode's device
peak, and `choose_mode` (behind "auto") takes the fastest mode whose peak fits the free device memory
(turning VAE tiling on when only the decode is in the way) and whose host share fits the host's.
`check_host_memory` refuses, before loading, a setting whose weights cannot fit in host memory (a
process the kernel kills for memory gets no error message at all).
These are estimates for choosing; nothing here moves a weight (that is `cogvideox.fast.offload`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cogvideox import weights
from cogvideox.errors import OutOfMemoryError
from cogvideox.fast.offload import DEFAULT_LOOKAHEAD, MODES

_GIB = 2**30
log = logging.getLogger("cogvideox.offload")


@dataclass(frozen=True)
class ComponentSize:
    """Bytes of one component's weights: all, outside its streamed blocks, its largest block (and how
    many blocks), and its largest single weight-owning module."""

    total: int
    rest: int
    block: int
    blocks: int
    layer: int


def size_from_tensors(nbytes: Mapping[str, int], block_prefix: str | None = None) -> ComponentSize:
    """The `ComponentSize` of a state dict given as {key: bytes}; blocks are the keys `{block_prefix}.{i}.`."""
    pattern = re.compile(rf"^{re.escape(block_prefix)}\.(\d+)\.") if block_prefix else None
    per_block: dict[str, int] = {}
    per_layer: dict[str, int] = {}
    rest = 0
    for key, size in nbytes.items():
        per_layer[key.rpartition(".")[0]] = per_layer.get(key.rpartition(".")[0], 0) + size
        match = pattern.match(key) if pattern else None
        if match:
            per_block[match.group(1)] = per_block.get(match.group(1), 0) + size
        else:
            rest += size
    return ComponentSize(
        total=sum(nbytes.values()),
        rest=rest,
        block=max(per_block.values(), default=0),
        blocks=len(per_block),
        layer=max(per_layer.values(), default=0),
    )


def _module_bytes(module: nn.Module) -> dict[str, int]:
    seen, sizes = set(), {}
    for key, t in [*module.named_parameters(), *module.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            sizes[key] = t.numel() * t.element_size()
    return sizes


def pipeline_sizes(pipe) -> dict[str, ComponentSize]:
    """The `ComponentSize` of each component of a built pipeline."""
    return {
        "text_encoder": size_from_tensors(_module_bytes(pipe.text_encoder.model), "encoder.block"),
        "transformer": size_from_tensors(_module_bytes(pipe.transformer), "transformer_blocks"),
        "vae": size_from_tensors(_module_bytes(pipe.vae)),
    }


def folder_sizes(folder: Path, dtype: torch.dtype, variant: str | None = None) -> dict[str, ComponentSize]:
    """The same, from a model folder's safetensors headers (of `variant`'s files where there are some),
    for weights loaded in `dtype` (nothing is read but the headers, so "auto" can choose before loading)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    found = {}
    for name, stem, prefix in (
        ("text_encoder", "model", "encoder.block"),
        ("transformer", weights.DIFFUSERS_WEIGHTS, "transformer_blocks"),
        ("vae", weights.DIFFUSERS_WEIGHTS, None),
    ):
        sizes = {}
        for path in weights.weight_files(Path(folder) / name, stem, variant):
            header, _ = weights.read_safetensors_header(path)
            sizes.update({key: math.prod(entry["shape"]) * itemsize for key, entry in header.items()})
        if name == "text_encoder":
            # Only the encoder runs; its token embedding is tied to `shared.weight`.
            sizes = {k: v for k, v in sizes.items() if not k.startswith(("decoder.", "encoder.embed_tokens."))}
        found[name] = size_from_tensors(sizes, prefix)
    return found


# Peak activation bytes per pixel of one decoded video for the untiled VAE decoder in a 2-byte dtype.
# Measured on an H200 (BENCHMARKS.md, bf16, 49 x 480 x 720): our decode peaks at 10.70 GiB with 0.40 GiB
# of weights, about 32 kB per pixel (the reference's decode: 15.16 GiB), and the tiled one (240 x 360
# tiles) at 3.07 GiB, which the same figure predicts to within 0.1 GiB; 34 kB keeps a small margin. The
# decoder works on a few latent frames at a time, so the frame count does not enter. It scales with the
# decoder's width at full resolution (`block_out_channels[0]`, 128 for the released VAEs): on the CPU the
# demo model's VAE (16 channels) peaks at 8.2 kB per pixel in fp32 at 480 x 720, the figure predicts 8.5.
_DECODE_BYTES_PER_PIXEL = 34_000
_DECODE_REFERENCE_WIDTH = 128
# Live [tokens, width] tensors at the transformer's peak (residual streams, q/k/v, the 4x MLP), per sample.
_TRANSFORMER_LIVE_WIDTHS = 12


def activation_bytes(
    transformer_config,
    itemsize: int,
    frames: int,
    height: int,
    width: int,
    batch: int = 1,
    guidance: bool = True,
    tile: tuple[int, int] | None = None,
    slicing: bool = False,
    temporal_compression: int = 4,
    spatial_compression: int = 8,
    decoder_width: int = _DECODE_REFERENCE_WIDTH,
) -> dict[str, int]:
    """Rough peak activation bytes per stage ("text", "denoise", "decode") for a request of that size;
    `tile` is the VAE's tile size in pixels when tiling is on, `decoder_width` the VAE's
    `block_out_channels[0]`. Estimates, for choosing a mode."""
    c = transformer_config
    samples = batch * (2 if guidance else 1)
    latent_frames = (frames - 1) // temporal_compression + 1
    pt = c.patch_size_t or 1
    tokens = c.max_text_seq_length + (-(-latent_frames // pt)) * (height // spatial_compression // c.patch_size) * (
        width // spatial_compression // c.patch_size
    )
    denoise = samples * tokens * c.inner_dim * itemsize * _TRANSFORMER_LIVE_WIDTHS
    text = samples * c.max_text_seq_length * c.text_embed_dim * itemsize * 8
    decode = _decode_bytes(height, width, tile, itemsize, decoder_width, 1 if slicing else batch)
    return {"text": text, "denoise": denoise, "decode": decode}


def _decode_bytes(height: int, width: int, tile, itemsize: int, decoder_width: int, videos: int) -> int:
    pixels = height * width if tile is None else min(height * width, tile[0] * tile[1])
    per_pixel = _DECODE_BYTES_PER_PIXEL * decoder_width / _DECODE_REFERENCE_WIDTH * itemsize / 2
    return int(pixels * per_pixel) * videos


_STAGE_COMPONENT = {"text": "text_encoder", "denoise": "transformer", "decode": "vae", "encode": "vae"}


def resident_weight_bytes(
    mode: str, stage: str, sizes: Mapping[str, ComponentSize], lookahead: int = DEFAULT_LOOKAHEAD,
    text_on_device: bool = True,
) -> int:
    """Weight bytes on the device while `stage` runs in `mode`."""
    on_device = [n for n in sizes if n != "text_encoder" or text_on_device]
    if mode == "none":
        return sum(sizes[n].total for n in on_device)
    name = _STAGE_COMPONENT[stage]
    if name not in on_device:
        return 0
    size = sizes[name]
    if mode == "model" or (mode == "stream" and not size.blocks):
        return size.total
    if mode == "stream":
        return size.rest + min(size.blocks, lookahead + 1) * size.block
    return size.layer


def estimated_peak(mode, sizes, activations, lookahead=DEFAULT_LOOKAHEAD, text_on_device=True) -> int:
    """Weights on the device plus activations, at the worst stage."""
    return max(
        resident_weight_bytes(mode, stage, sizes, lookahead, text_on_device) + activations[stage]
        for stage in ("text", "denoise", "decode")
    )


def host_weight_bytes(
    mode: str, sizes: Mapping[str, ComponentSize], computes_on_cpu: bool, text_on_cpu: bool
) -> int:
    """Weight bytes that live in host memory: all of them on the CPU or when offloaded (page-locked on a
    GPU machine); with `--offload none` on a GPU, only T5's when it runs on the CPU."""
    if computes_on_cpu or mode != "none":
        return sum(size.total for size in sizes.values())
    return sizes["text_encoder"].total if text_on_cpu else 0


def available_host_memory(swap: bool) -> int | None:
    """Bytes the kernel could give this process now: MemAvailable (plus SwapFree with `swap`; page-locked
    memory cannot be swapped) from /proc/meminfo, and no more than the room left under a container's
    memory limit (cgroup), which /proc/meminfo does not show. None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
    except (OSError, ValueError):
        return None
    if "MemAvailable" not in info:
        return None
    available = info["MemAvailable"] + (info.get("SwapFree", 0) if swap else 0)
    room = cgroup_room()
    return available if room is None else min(available, room)


def cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this container's cgroup memory limit (its reclaimable file cache counted as
    free), cgroup v2 or v1; None when there is no limit or no cgroup to read."""
    layouts = (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),  # v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
         "total_inactive_file"),  # v1
    )  # fmt: skip
    for limit_name, usage_name, stat_name, inactive_key in layouts:
        try:
            limit_text = (root / limit_name).read_text().strip()
            usage = int((root / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 2**60:  # v1 writes "no limit" as a huge number
            return None
        inactive = 0
        try:
            for line in (root / stat_name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
        except (OSError, ValueError):
            pass
        return max(int(limit_text) - usage + inactive, 0)
    return None


def _on_cpu(device, text_device) -> tuple[bool, bool]:
    """(the model computes on the CPU, T5 runs on the CPU)."""
    return torch.device(device).type == "cpu", text_device is not None and torch.device(text_device).type == "cpu"


def host_shortfall(mode: str, sizes: Mapping[str, ComponentSize], device, text_device) -> tuple[int, int] | None:
    """(bytes needed, bytes available) when the weights that would live in host memory do not fit there;
    None when they fit (or where the available memory cannot be read)."""
    on_cpu, text_on_cpu = _on_cpu(device, text_device)
    need = host_weight_bytes(mode, sizes, on_cpu, text_on_cpu)
    available = available_host_memory(swap=on_cpu)
    if available is None or need <= available:
        return None
    return need, available


def check_host_memory(
    mode: str, sizes: Mapping[str, ComponentSize], device, text_device, dtype: torch.dtype
) -> None:
    """Raise `OutOfMemoryError` (stage "load") when the weights that would live in host memory exceed what
    the host has available, with the setting that would fit."""
    shortfall = host_shortfall(mode, sizes, device, text_device)
    if shortfall is None:
        return
    need, available = shortfall
    on_cpu, text_on_cpu = _on_cpu(device, text_device)
    have = f"{need / _GIB:.1f} GiB of weights, and this machine has {available / _GIB:.1f} GiB available"
    if on_cpu:
        if dtype == torch.float32 and need // 2 <= available:
            why, suggestion = f"in fp32 on the CPU the model takes {have}", "--dtype bf16 (half the memory)"
        else:
            why, suggestion = f"on the CPU the model takes {have}", "a GPU (--device cuda), or more memory"
    elif mode != "none":
        why = f"offload {mode!r} keeps the weights in page-locked host memory: {have}"
        suggestion = "--offload none, if the GPU can hold the whole model"
        if text_on_cpu:
            suggestion += " (and T5 on the GPU, without --text-device cpu)"
    else:
        why, suggestion = f"T5 on the CPU takes {have}", "T5 on the GPU (no --text-device cpu)"
    raise OutOfMemoryError(
        f"not enough host memory to load the model: {why}; try {suggestion}",
        stage="load", requested_bytes=need, suggestion=suggestion,
    )


@dataclass(frozen=True)
class Choice:
    """What "auto" chose: the offload mode, whether the VAE must decode in tiles to fit, and why."""

    mode: str
    vae_tiling: bool
    reason: str


def choose_mode(
    sizes: Mapping[str, ComponentSize],
    activations: Mapping[str, int],
    free_bytes: int,
    lookahead: int = DEFAULT_LOOKAHEAD,
    text_on_device: bool = True,
    headroom: float = 0.9,
    vae_tiling: bool = False,
    host_bytes: int | None = None,
    tiled_activations: Mapping[str, int] | None = None,
) -> Choice:
    """The fastest mode whose estimated peak fits in `headroom` x `free_bytes`.

    With `tiled_activations` (the same estimate with the VAE in tiles), a mode whose decode alone does
    not fit is taken with tiling before a slower mode is: tiling costs about a second of decoding and
    moves pixels near tile seams slightly, a slower mode costs every step. With `host_bytes` (what the
    host has available), a mode that offloads must also fit its weights there.
    """
    budget = int(free_bytes * headroom)
    peaks = {m: estimated_peak(m, sizes, activations, lookahead, text_on_device) for m in MODES}
    tiled = {}
    if tiled_activations is not None:
        tiled = {m: estimated_peak(m, sizes, tiled_activations, lookahead, text_on_device) for m in MODES}
    needs = ", ".join(f"{m!r} ~{peaks[m] / _GIB:.1f} GiB" for m in MODES)
    if tiled:
        needs += " (" + ", ".join(f"{m!r} ~{tiled[m] / _GIB:.1f}" for m in MODES) + " with VAE tiling)"
    offloaded = host_weight_bytes("model", sizes, False, not text_on_device)
    host_fits = host_bytes is None or offloaded <= host_bytes
    host = "" if host_fits else (
        f"; the host's {host_bytes / _GIB:.1f} GiB available cannot hold the {offloaded / _GIB:.1f} GiB of "
        "weights offloading keeps there"
    )
    free = f"{free_bytes / _GIB:.1f} GiB free on the device"
    for mode in MODES if host_fits else ("none",):
        if peaks[mode] <= budget:
            return Choice(mode, False, f"offload {mode!r}: {free}; estimated peaks {needs}{host}")
        if tiled and tiled[mode] <= budget:
            return Choice(mode, True, f"offload {mode!r} with VAE tiling: {free}; estimated peaks {needs}{host}")
    if not host_fits:
        raise OutOfMemoryError(
            f"the model fits neither on the device ({free_bytes / _GIB:.1f} GiB free, 'none' needs "
            f"~{min(peaks['none'], tiled.get('none', peaks['none'])) / _GIB:.1f} GiB) nor in host memory for "
            f"offloading ({host_bytes / _GIB:.1f} GiB available, the weights take {offloaded / _GIB:.1f} GiB); "
            "try a smaller model, or a machine with more memory",
            stage="load", requested_bytes=offloaded, suggestion="a smaller model",
        )
    hint = "" if vae_tiling or tiled else "; --vae-tiling cuts the VAE decoder's share"
    return Choice("sequential", bool(tiled), (
        f"offload 'sequential'{' with VAE tiling' if tiled else ''}: {free} is less than even "
        f"'sequential' is estimated to need (peaks {needs}){hint}"
    ))


def free_device_memory(device: torch.device) -> int:
    """Bytes the device has free now, counting what PyTorch's allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def default_activations(transformer_config, vae_config, dtype, tile=None, slicing=False) -> dict[str, int]:
    """`activation_bytes` for one video of the model's default size with guidance (what "auto" plans for)."""
    from cogvideox.request import default_size

    height, width = default_size(transformer_config, vae_config)
    return activation_bytes(
        transformer_config,
        torch.empty((), dtype=dtype).element_size(),
        transformer_config.sample_frames,
        height,
        width,
        tile=tile,
        slicing=slicing,
        temporal_compression=vae_config.temporal_compression,
        spatial_compression=vae_config.spatial_compression,
        decoder_width=vae_config.block_out_channels[0],
    )


def decode_bytes(vae, batch: int, height: int, width: int, dtype: torch.dtype, tiled: bool) -> int:
    """`activation_bytes`' decode estimate for a built VAE decoding `batch` videos of height x width."""
    tile = (vae.tiling.sample_height, vae.tiling.sample_width) if tiled else None
    itemsize = torch.empty((), dtype=dtype).element_size()
    return _decode_bytes(height, width, tile, itemsize, vae.config.block_out_channels[0],
                         1 if vae.use_slicing else batch)  # fmt: skip


def host_room(need: int) -> int | None:
    """The host memory available (swap counted) when `need` bytes of activations do not fit in it, for a
    computation on the CPU: there, running out of memory is no error but the kernel killing the process,
    with no message and the work lost. None when they fit (or the available memory cannot be read)."""
    available = available_host_memory(swap=True)
    return None if available is None or need <= available else available


def _choose_on(
    device, sizes_fn, transformer_config, vae_config, dtype, text_device, tile, default_tile, slicing, lookahead
) -> Choice:
    device = torch.device(device)
    if device.type != "cuda":
        return Choice("none", False, "offload 'none': the model computes on the CPU")
    text_on_device = text_device is None or torch.device(text_device) == device
    activations = default_activations(transformer_config, vae_config, dtype, tile, slicing)
    tiled = None
    if tile is None:
        tiled = default_activations(transformer_config, vae_config, dtype, default_tile, slicing)
    choice = choose_mode(
        sizes_fn(), activations, free_device_memory(device), lookahead, text_on_device, vae_tiling=tile is not None,
        host_bytes=available_host_memory(swap=False), tiled_activations=tiled,
    )
    log.info(choice.reason)
    return choice


def choose_for_folder(
    folder: Path, configs, dtype: torch.dtype, device, text_device=None, vae_tiling: bool = False,
    vae_slicing: bool = False, lookahead: int = DEFAULT_LOOKAHEAD, variant: str | None = None,
) -> Choice:
    """"auto" for a model folder not loaded yet (`configs`: `loading.read_model_configs`)."""
    default_tile = (configs.vae.sample_height // 2, configs.vae.sample_width // 2)
    return _choose_on(
        device, lambda: folder_sizes(folder, dtype, variant), configs.transformer, configs.vae, dtype, text_device,
        default_tile if vae_tiling else None, default_tile, vae_slicing, lookahead,
    )


def choose_for_pipeline(pipe, device, text_device=None, lookahead: int = DEFAULT_LOOKAHEAD) -> Choice:
    """"auto" for a built pipeline, with its VAE's tiling and slicing settings."""
    vae = pipe.vae
    tile = (vae.tiling.sample_height, vae.tiling.sample_width)
    return _choose_on(
        device, lambda: pipeline_sizes(pipe), pipe.config, vae.config, pipe.dtype, text_device,
        tile if vae.use_tiling else None, tile, vae.use_slicing, lookahead,
    )

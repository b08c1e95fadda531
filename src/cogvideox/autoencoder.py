"""The VAE of a CogVideoX model on its own: videos to the latents the transformer sees, and back.

`decode_latents` is the pipeline's own last stage (`Pipeline.decode` calls it), so latents saved by
`generate --output name.safetensors` and decoded later by `VideoAutoencoder` give the video a direct run
gives, pixel for pixel. `VideoAutoencoder` loads the VAE alone (a few hundred MB, none of T5 or the
transformer): a video denoised on one machine can be decoded on another, or later with tiling on a small
GPU, and the official VAE demo's encode, decode and round trip run with the pipeline's normalisation
([-1, 1] pixels, latents multiplied by the scaling factor).

    vae = VideoAutoencoder.from_pretrained("THUDM/CogVideoX-5b", tiling=True)
    latents = vae.encode(frames)  # uint8 [T, H, W, 3] -> [F, C, h, w]
    video = vae.decode(latents)  # -> uint8 [T, H, W, 3]
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cogvideox import loading
from cogvideox.errors import InputError, OutOfMemoryError
from cogvideox.request import check_flag
from cogvideox.sampling import to_uint8_frames

Guard = Callable[[str, int], contextlib.AbstractContextManager]


@torch.inference_mode()  # `Pipeline.decode` called on its own too: no autograd graph of the activations
def decode_latents(vae, latents: torch.Tensor, dtype: torch.dtype, guard: Guard, progress: bool = False):
    """Latents [B, F, C, h, w] as the transformer sees them -> one uint8 video [T, H, W, 3] per sample.

    The batch goes through the VAE in one call, as in the reference: a per-sample decode picks other
    convolution kernels and moves a few pixels by 1/255 (`vae.enable_slicing()` trades that for memory).
    Out of GPU memory in an untiled decode, it decodes again in tiles (with a warning) rather than lose
    latents that took minutes. On the CPU, where running out of memory kills the process, a decode that
    would not fit in the host's memory runs in tiles from the start (with a warning).
    """
    latents = latents.permute(0, 2, 1, 3, 4)  # [B, C, F, h, w], the VAE's layout
    latents = ((1 / vae.config.scaling_factor) * latents).to(dtype)
    tiles_for_host = latents.device.type == "cpu" and not vae.use_tiling and _must_tile_on_host(vae, latents, dtype)
    if tiles_for_host:
        vae.enable_tiling()
    try:
        with tqdm(total=1, desc="decoding", disable=not progress, leave=False) as bar:
            try:
                with guard("decode", latents.shape[0]):
                    videos = vae.decode(latents)  # [B, 3, T, H, W]
            except OutOfMemoryError as error:
                if vae.use_tiling:
                    raise
                warnings.warn(f"{error}; decoding again in tiles, as --vae-tiling does", stacklevel=3)
                vae.enable_tiling()
                try:
                    with guard("decode", latents.shape[0]):
                        videos = vae.decode(latents)
                finally:
                    vae.disable_tiling()
            bar.update()
    finally:
        if tiles_for_host:
            vae.disable_tiling()
    return [to_uint8_frames(video) for video in videos]


def _must_tile_on_host(vae, latents: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether an untiled decode of `latents` [B, C, F, h, w] on the CPU would need more memory than the
    host has available (warned); `OutOfMemoryError` when even a tiled one would."""
    from cogvideox.fast.memory_plan import decode_bytes, host_room
    from cogvideox.values import in_units

    batch, scale = latents.shape[0], vae.config.spatial_compression
    height, width = latents.shape[-2] * scale, latents.shape[-1] * scale
    need = decode_bytes(vae, batch, height, width, dtype, tiled=False)
    if host_room(need) is None:
        return False
    tiled = decode_bytes(vae, batch, height, width, dtype, tiled=True)
    available = host_room(tiled)
    if available is not None:
        raise OutOfMemoryError(
            f"not enough memory to decode {width}x{height} on the CPU, even in tiles: about {in_units(tiled)}, and "
            f"this machine has {in_units(available)} available; try a smaller size",
            stage="decode", requested_bytes=tiled, suggestion="a smaller --height/--width",
        )
    warnings.warn(
        f"decoding {width}x{height} on the CPU would take about {in_units(need)}, more than this machine has "
        "available: decoding in tiles, as --vae-tiling does",
        stacklevel=4,
    )
    return True


class VideoAutoencoder:
    """A model's VAE alone, with the pipeline's conventions on both sides."""

    def __init__(self, vae: torch.nn.Module, dtype: torch.dtype) -> None:
        self.vae = vae
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        *,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool = False,
        tiling: bool = False,
        slicing: bool = False,
    ) -> VideoAutoencoder:
        """The VAE of a model folder or hub repo (None: the embedded demo model), as `Pipeline.from_pretrained`
        finds it; dtype and device default as there. Of the weights, only the VAE's are read, needed, and
        downloaded from the hub (a few hundred MB of a 5B model's 20 GB); `variant` as there."""
        tiling, slicing = check_flag(tiling, "tiling"), check_flag(slicing, "slicing")  # "false" would be truthy
        device = loading.choose_device(device)
        loading.parse_dtype(dtype)
        only = ("vae",)
        variant = loading.check_variant(variant)
        folder = loading.resolve_model_dir(path_or_repo_id, revision=revision, local_files_only=local_files_only,
                                           components=only, variant=variant)  # fmt: skip
        configs = loading.read_model_configs(folder, only, variant)
        dtype = loading.choose_dtype(dtype, device, configs.transformer)
        vae = loading.load_vae(folder, dtype, device, variant)
        if tiling:
            vae.enable_tiling()
        if slicing:
            vae.enable_slicing()
        return cls(vae, dtype)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def check_latents(self, latents: torch.Tensor) -> None:
        """An `InputError` for latents this VAE cannot decode: [F, C, h, w] or [B, F, C, h, w], C its channels."""
        shape = f"[frames, {self.latent_channels}, height/8, width/8]"
        if not isinstance(latents, torch.Tensor):
            raise InputError(f"latents must be a torch tensor {shape}, got {type(latents).__name__}")
        if latents.ndim not in (4, 5) or latents.shape[-3] != self.latent_channels:
            raise InputError(
                f"latents of shape {list(latents.shape)} do not fit this VAE: it decodes {shape} (latents of "
                "another model family?)"
            )
        if latents.numel() == 0:
            raise InputError(f"latents of shape {list(latents.shape)} are empty")
        if not latents.is_floating_point():
            raise InputError(f"latents must be floating-point, got {latents.dtype}")
        if latents.device.type not in ("cpu", "cuda"):
            raise InputError(f"latents must be on the CPU or a GPU, got them on {latents.device}")
        if not torch.isfinite(latents).all():  # decoded, they are a video of garbage, not an error
            raise InputError("the latents hold NaN or infinite values: they came from a run that failed; make them "
                             "again")

    @torch.inference_mode()
    def encode(self, frames: np.ndarray, height: int | None = None, width: int | None = None,
               resize: str = "stretch") -> torch.Tensor:  # fmt: skip
        """uint8 frames [T, H, W, 3] (or a list of frames, floats in [0, 1], a video file: what
        `conditioning.load_video` reads) -> latents [F, C, h, w] (the posterior's mean, times the scaling
        factor: what the transformer denoises), resized to `height` x `width` first when given; both must
        be multiples of the VAE's 8, as the frames' own size must be when none is given. T must be of the
        form 4k+1 (8k+1 for the released models to decode back to T frames), giving F = k+1."""
        from cogvideox.conditioning import load_video, prepare_video

        frames = load_video(frames)
        multiple, step = self.vae.config.spatial_compression, self.vae.config.temporal_compression
        if (len(frames) - 1) % step:
            lower = (len(frames) - 1) // step * step + 1
            raise InputError(f"the VAE encodes {step}k+1 frames, got {len(frames)}; use the first {lower}")
        for name, value, own in (("height", height, frames.shape[1]), ("width", width, frames.shape[2])):
            if value is None and own % multiple:
                raise InputError(f"the frames' {name} {own} is not a multiple of {multiple}: give {name}= to "
                                 "resize them")  # fmt: skip
            whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if value is not None and (not whole or value < multiple or value % multiple):
                raise InputError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
        height, width = int(height or frames.shape[1]), int(width or frames.shape[2])
        pixels = prepare_video(frames, height, width, resize).to(self.device, self.dtype)
        with self._guard("encode"):
            mean = self.vae.encode(pixels).mode()  # [1, C, F, h, w]
        return (self.vae.config.scaling_factor * mean)[0].permute(1, 0, 2, 3)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, progress: bool = False) -> np.ndarray | list[np.ndarray]:
        """Latents [F, C, h, w] -> uint8 frames [T, H, W, 3]; a batch [B, F, C, h, w] -> a list of B videos."""
        self.check_latents(latents)
        progress = check_flag(progress, "progress")
        batch = latents.ndim == 5
        videos = decode_latents(self.vae, latents.to(self.device) if batch else latents[None].to(self.device),
                                self.dtype, self._guard, progress)  # fmt: skip
        return videos if batch else videos[0]

    def _guard(self, stage: str, batch: int = 1):
        """Out of GPU memory in `stage` becomes an `OutOfMemoryError` saying which VAE setting would fit."""
        from cogvideox.fast.oom import oom_guard, out_of_vae_memory

        return oom_guard(stage, self.vae, batch, explain=out_of_vae_memory)

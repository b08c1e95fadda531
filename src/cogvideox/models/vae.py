"""The CogVideoX 3D causal VAE (paper section 2.1): 8x spatial and 4x temporal compression of a video.

The encoder and the decoder run a video a few frames at a time (8 pixel frames, 2 latent frames), with
the causal convolutions' frame caches carried across chunks. The chunking is part of the numerics:
GroupNorm statistics are taken per chunk, and the released VAE was trained to decode two latent frames
at a time. Tensors are `[B, C, T, H, W]`; attribute names are the official state-dict keys.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, VAEConfig
from .vae_blocks import ACTIVATIONS, CausalConv3d, ConvCache, DownBlock3D, MidBlock3D, SpatialNorm3D, UpBlock3D
from .vae_tiling import Tiling, tiled_decode, tiled_encode

SAMPLE_FRAMES_PER_CHUNK = 8
LATENT_FRAMES_PER_CHUNK = 2


def frame_chunks(num_frames: int, chunk: int) -> list[slice]:
    """Frame ranges processed together: `chunk` frames each, the remainder going to the first one.

    49 pixel frames in chunks of 8 -> [0, 9), [9, 17), ..., [41, 49); 13 latent frames in chunks of 2
    -> [0, 3), [3, 5), ..., [11, 13). Fewer frames than `chunk` form a single chunk.
    """
    extra = num_frames % chunk
    count = max(num_frames // chunk, 1)
    return [slice(0 if i == 0 else chunk * i + extra, min(chunk * (i + 1) + extra, num_frames)) for i in range(count)]


def temporal_levels(config: VAEConfig) -> int:
    """How many encoder (decoder) stages halve (double) the frame count."""
    return int(math.log2(config.temporal_compression_ratio))


class Encoder3D(nn.Module):
    """Video chunk [B, 3, T, H, W] -> posterior parameters [B, 2*latent, T', H/8, W/8] (mean | logvar)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        act = ACTIVATIONS[config.act_fn]
        groups, eps = config.norm_num_groups, config.norm_eps
        self.conv_in = CausalConv3d(config.in_channels, channels[0])
        self.down_blocks = nn.ModuleList(
            DownBlock3D(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block,
                groups,
                eps,
                act,
                add_downsample=i < len(channels) - 1,
                compress_time=i < temporal_levels(config),
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock3D(channels[-1], groups, eps, act)
        self.norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = CausalConv3d(channels[-1], 2 * config.latent_channels)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        h = self.conv_in(x, cache)
        for block in self.down_blocks:
            h = block(h, cache)
        h = self.mid_block(h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)


class Decoder3D(nn.Module):
    """Latent chunk [B, latent, F, h, w] -> video [B, 3, T, 8h, 8w]; every norm is conditioned on the latents."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        act = ACTIVATIONS[config.act_fn]
        groups, eps, zq = config.norm_num_groups, config.norm_eps, config.latent_channels
        self.conv_in = CausalConv3d(zq, channels[0])
        self.mid_block = MidBlock3D(channels[0], groups, eps, act, zq_channels=zq)
        self.up_blocks = nn.ModuleList(
            UpBlock3D(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block + 1,
                groups,
                eps,
                act,
                zq,
                add_upsample=i < len(channels) - 1,
                compress_time=i < temporal_levels(config),
            )
            for i in range(len(channels))
        )
        self.norm_out = SpatialNorm3D(channels[-1], zq, groups)
        self.conv_out = CausalConv3d(channels[-1], config.out_channels)

    def forward(self, z: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        h = self.conv_in(z, cache)
        h = self.mid_block(h, cache, zq=z)
        for block in self.up_blocks:
            h = block(h, z, cache)
        return self.conv_out(F.silu(self.norm_out(h, z)), cache)


class DiagonalGaussian:
    """The encoder's posterior: a Gaussian per latent element, from parameters [B, 2C, ...] = (mean | logvar)."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn as the reference draws it, so equal seeds give equal samples."""
        noise = _reference_randn(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other), other defaulting to N(0, I), summed per batch element: [B].

        Sums over every non-batch dimension (the reference sums dims 1-3 only, leaving the width of a
        video latent unsummed; summing that too gives our value).
        """
        if other is None:
            kl = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            kl = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * kl.flatten(1).sum(dim=1)


def _reference_randn(
    shape: torch.Size,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    # A CPU generator draws on the CPU and the noise moves to `device`; a list draws one batch element
    # per generator. This is how the reference draws, so seeds carry over.
    generators = generator if isinstance(generator, list) else [generator]
    first = generators[0]
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"cannot draw {device.type} noise with a {first.device.type} generator")
        draw_device = torch.device("cpu")
    if len(generators) == 1:
        return torch.randn(shape, generator=first, device=draw_device, dtype=dtype).to(device)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    one = (1, *shape[1:])
    noise = [torch.randn(one, generator=g, device=draw_device, dtype=dtype) for g in generators]
    return torch.cat(noise).to(device)


def check_config(config: VAEConfig) -> None:
    """Raise `ConfigError` for a VAE config this implementation (and the checkpoints) cannot use."""
    stages = len(config.block_out_channels)
    if stages == 0:
        raise ConfigError("block_out_channels must name at least one stage")
    if tuple(config.down_block_types) != ("CogVideoXDownBlock3D",) * stages:
        raise ConfigError(
            f"down_block_types must be 'CogVideoXDownBlock3D' once per entry of block_out_channels "
            f"({stages}), got {config.down_block_types}"
        )
    if tuple(config.up_block_types) != ("CogVideoXUpBlock3D",) * stages:
        raise ConfigError(
            f"up_block_types must be 'CogVideoXUpBlock3D' once per entry of block_out_channels "
            f"({stages}), got {config.up_block_types}"
        )
    bad = [c for c in config.block_out_channels if c % config.norm_num_groups]
    if bad:
        raise ConfigError(f"block_out_channels {bad} are not divisible by norm_num_groups={config.norm_num_groups}")
    ratio = config.temporal_compression_ratio  # a power of two (`VAEConfig` checks it)
    if temporal_levels(config) > stages - 1:
        raise ConfigError(
            f"temporal_compression_ratio {ratio} needs {temporal_levels(config)} downsampling stages, "
            f"but block_out_channels gives only {stages - 1}"
        )
    if config.act_fn not in ACTIVATIONS:
        raise ConfigError(f"act_fn {config.act_fn!r} is not one of {sorted(ACTIVATIONS)}")
    if config.use_quant_conv or config.use_post_quant_conv:
        raise ConfigError("use_quant_conv / use_post_quant_conv are not supported (no CogVideoX VAE uses them)")


class CogVideoXVAE(nn.Module):
    """The CogVideoX VAE (`AutoencoderKLCogVideoX`): `encode` videos to posteriors, `decode` latents to videos.

    Latents are unscaled here; multiplying by `config.scaling_factor` is the pipeline's job. Both
    directions are differentiable. Large frames can be processed in tiles (`enable_tiling`) and
    batches one video at a time (`enable_slicing`), both as in the reference.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)
        self.use_slicing = False
        self.use_tiling = False
        # Default tiles are half the training size, with overlaps tuned by the reference for 480x720.
        self.tiling = Tiling(
            sample_height=config.sample_height // 2,
            sample_width=config.sample_width // 2,
            overlap_height=1 / 6,
            overlap_width=1 / 5,
            spatial_compression=config.spatial_compression,
        )

    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_overlap_factor_height: float | None = None,
        tile_overlap_factor_width: float | None = None,
    ) -> None:
        """Encode and decode frames larger than a tile in overlapping tiles; unset values keep their current ones."""
        self.use_tiling = True
        self.tiling = dataclasses.replace(
            self.tiling,
            sample_height=tile_sample_min_height or self.tiling.sample_height,
            sample_width=tile_sample_min_width or self.tiling.sample_width,
            overlap_height=tile_overlap_factor_height or self.tiling.overlap_height,
            overlap_width=tile_overlap_factor_width or self.tiling.overlap_width,
        )

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode and decode the videos of a batch one at a time (same result, less memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Video [B, C_in, T, H, W] in [-1, 1] -> posterior over latents [B, latent, F, H/8, W/8].

        F = 1 + (T-1)/4 for T = 1 or 8k+1 (what the models were trained on), T/4 for T = 8k; other T
        are chunked as the reference chunks them.
        """
        _check_video(x, self.config.in_channels, "encode", "the video")
        if self.use_slicing and x.shape[0] > 1:
            return DiagonalGaussian(torch.cat([self._encode(one) for one in x.split(1)]))
        return DiagonalGaussian(self._encode(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, latent, F, h, w] (unscaled) -> video [B, C_out, T, 8h, 8w].

        T = 1 + 4(F-1) for odd F (the first latent frame is a single image), 4F for even F.
        """
        _check_video(z, self.config.latent_channels, "decode", "the latents")
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(one) for one in z.split(1)])
        return self._decode(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reconstruct `x`: decode the posterior's mode (or a sample of it)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.use_tiling and (height > self.tiling.sample_height or width > self.tiling.sample_width):
            return tiled_encode(self._encode_chunked, x, self.tiling)
        return self._encode_chunked(x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        height, width = z.shape[-2:]
        if self.use_tiling and (height > self.tiling.latent_height or width > self.tiling.latent_width):
            return tiled_decode(self._decode_chunked, z, self.tiling)
        return self._decode_chunked(z)

    def _encode_chunked(self, x: torch.Tensor) -> torch.Tensor:
        cache: ConvCache = {}
        chunks = [self.encoder(x[:, :, frames], cache) for frames in frame_chunks(x.shape[2], SAMPLE_FRAMES_PER_CHUNK)]
        return torch.cat(chunks, dim=2)

    def _decode_chunked(self, z: torch.Tensor) -> torch.Tensor:
        cache: ConvCache = {}
        chunks = [self.decoder(z[:, :, frames], cache) for frames in frame_chunks(z.shape[2], LATENT_FRAMES_PER_CHUNK)]
        return torch.cat(chunks, dim=2)


def _check_video(x: torch.Tensor, channels: int, method: str, what: str) -> None:
    if x.dim() != 5 or x.shape[1] != channels:
        raise ValueError(
            f"{method}() expects {what} as [batch, {channels} channels, frames, height, width], got shape "
            f"{tuple(x.shape)} (the pipeline's latents are [batch, frames, channels, ...]: "
            "permute(0, 2, 1, 3, 4) first)"
        )

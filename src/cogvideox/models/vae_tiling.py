"""Tiled VAE encode and decode: overlapping spatial tiles, processed one by one and blended linearly.

Memory then depends on the tile size, not on the frame size (the full-size CogVideoX decoder needs
~18 GB of fp16 conv activations at 480x720; half-size tiles about a quarter of that). Tiles are
processed independently, so the result differs from untiled processing near the seams; the sizes,
strides, blend widths and crops below are the reference's, so results match it tile for tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tiling:
    """Tile size in pixels and the fraction of a tile that overlaps the next one, per direction."""

    sample_height: int
    sample_width: int
    overlap_height: float
    overlap_width: float
    spatial_compression: int

    @property
    def latent_height(self) -> int:
        return int(self.sample_height / self.spatial_compression)

    @property
    def latent_width(self) -> int:
        return int(self.sample_width / self.spatial_compression)


def tiled_encode(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """Encode `x` [B, C, T, H, W] tile by tile: tiles are cut in pixels, blended and cropped in latents."""
    blend_h = int(tiling.latent_height * tiling.overlap_height)
    blend_w = int(tiling.latent_width * tiling.overlap_width)
    return _run_tiled(
        encode,
        x,
        size=(tiling.sample_height, tiling.sample_width),
        stride=(
            int(tiling.sample_height * (1 - tiling.overlap_height)),
            int(tiling.sample_width * (1 - tiling.overlap_width)),
        ),
        blend=(blend_h, blend_w),
        keep=(tiling.latent_height - blend_h, tiling.latent_width - blend_w),
    )


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """Decode `z` [B, C, F, h, w] tile by tile: tiles are cut in latents, blended and cropped in pixels."""
    blend_h = int(tiling.sample_height * tiling.overlap_height)
    blend_w = int(tiling.sample_width * tiling.overlap_width)
    return _run_tiled(
        decode,
        z,
        size=(tiling.latent_height, tiling.latent_width),
        stride=(
            int(tiling.latent_height * (1 - tiling.overlap_height)),
            int(tiling.latent_width * (1 - tiling.overlap_width)),
        ),
        blend=(blend_h, blend_w),
        keep=(tiling.sample_height - blend_h, tiling.sample_width - blend_w),
    )


def _run_tiled(
    process: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    size: tuple[int, int],
    stride: tuple[int, int],
    blend: tuple[int, int],
    keep: tuple[int, int],
) -> torch.Tensor:
    height, width = x.shape[-2:]
    if stride[0] < 1 or stride[1] < 1:
        raise ValueError(
            f"tile stride {stride} is empty: the tile size is too small for its overlap factor; "
            "use larger tiles or smaller overlap factors in enable_tiling()"
        )
    grid = [
        [process(x[..., i : i + size[0], j : j + size[1]]) for j in range(0, width, stride[1])]
        for i in range(0, height, stride[0])
    ]
    rows = []
    for i, row in enumerate(grid):
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend_into(grid[i - 1][j], tile, blend[0], dim=-2)
            if j > 0:
                tile = blend_into(row[j - 1], tile, blend[1], dim=-1)
            # Later neighbours blend against this blended tile (the reference blends in place).
            row[j] = tile
        rows.append(torch.cat([tile[..., : keep[0], : keep[1]] for tile in row], dim=-1))
    return torch.cat(rows, dim=-2)


def blend_into(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Fade the first `extent` entries of `tile` along `dim` in from the last ones of `prev`.

    tile[y] = prev[-extent + y] * (1 - y/extent) + tile[y] * (y/extent). Out of place, so autograd works.
    """
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return tile
    # The reference multiplies by Python floats, which act in at least fp32; do the same.
    weight_dtype = torch.promote_types(tile.dtype, torch.float32)
    ramp = torch.arange(extent, dtype=torch.float64, device=tile.device) / extent
    shape = [1] * tile.dim()
    shape[dim] = extent
    w_tile = ramp.to(weight_dtype).view(shape)
    w_prev = (1 - ramp).to(weight_dtype).view(shape)
    head_prev = prev.narrow(dim, prev.shape[dim] - extent, extent)
    head_tile = tile.narrow(dim, 0, extent)
    head = (head_prev * w_prev).to(tile.dtype) + (head_tile * w_tile).to(tile.dtype)
    return torch.cat([head, tile.narrow(dim, extent, tile.shape[dim] - extent)], dim=dim)

"""Tiled VAE encode and decode: overlapping spatial tiles, processed one by one and blended linearly.

Memory then depends on the tile size, not on the frame size (the full-size CogVideoX decoder needs
~18 GB of fp16 conv activations at 480x720; half-size tiles about a quarter of that). Tiles are
processed independently, so the result differs from untiled processing near the seams.

Tiles start every `stride` input positions; each tile keeps the output of its own stride, and its first
`overlap` outputs (what the previous tile also covers) fade in from that tile. Blend widths and crops
are derived from the strides, so the output always has the untiled size. The reference instead takes
them from the tile size times the overlap factor; where the two agree (its default tiles at 480x720 and
any tiles whose strides divide evenly) the result is the reference's, tile for tile. Elsewhere the
reference's frames come out larger than asked for, with blends between misaligned pixels.
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
    r = tiling.spatial_compression
    # Tiles and strides off the latent grid would misalign every later tile: round them to whole latents.
    return _run_tiled(
        encode,
        x,
        size=(tiling.latent_height * r, tiling.latent_width * r),
        stride=(
            int(tiling.sample_height * (1 - tiling.overlap_height)) // r * r,
            int(tiling.sample_width * (1 - tiling.overlap_width)) // r * r,
        ),
        out_length=lambda n: n // r,
    )


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """Decode `z` [B, C, F, h, w] tile by tile: tiles are cut in latents, blended and cropped in pixels."""
    r = tiling.spatial_compression
    return _run_tiled(
        decode,
        z,
        size=(tiling.latent_height, tiling.latent_width),
        stride=decode_strides(tiling),
        out_length=lambda n: n * r,
    )


def decode_strides(tiling: Tiling) -> tuple[int, int]:
    """Latent rows and columns between the starts of neighbouring decode tiles (the reference's rounding)."""
    return (
        int(tiling.latent_height * (1 - tiling.overlap_height)),
        int(tiling.latent_width * (1 - tiling.overlap_width)),
    )


def _run_tiled(
    process: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    size: tuple[int, int],
    stride: tuple[int, int],
    out_length: Callable[[int], int],
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
    # Every tile but the last of a row (column) keeps exactly its stride's worth of output, the last keeps
    # what remains (at most a stride), so the pieces add up to the untiled size.
    keep = (out_length(stride[0]), out_length(stride[1]))
    rows = []
    for i, row in enumerate(grid):
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend_into(grid[i - 1][j], tile, grid[i - 1][j].shape[-2] - keep[0], dim=-2, offset=keep[0])
            if j > 0:
                tile = blend_into(row[j - 1], tile, row[j - 1].shape[-1] - keep[1], dim=-1, offset=keep[1])
            # Later neighbours blend against this blended tile (the reference blends in place).
            row[j] = tile
        rows.append(torch.cat([tile[..., : keep[0], : keep[1]] for tile in row], dim=-1))
    return torch.cat(rows, dim=-2)


def blend_into(
    prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int, offset: int | None = None
) -> torch.Tensor:
    """Fade the first `extent` entries of `tile` along `dim` in from the `prev` entries at the same place.

    `tile` starts `offset` entries into `prev` (default: `prev`'s length - `extent`, so the last `extent`
    entries of `prev` overlap the first of `tile`). tile[y] = prev[offset + y] * (1 - y/extent) +
    tile[y] * (y/extent) for y < extent; a tile shorter than `extent` takes only its share of the ramp.
    Out of place, so autograd works.
    """
    if offset is None:
        offset = prev.shape[dim] - extent
    length = min(extent, tile.shape[dim], prev.shape[dim] - offset)
    if extent <= 0 or length <= 0:
        return tile
    # The reference multiplies by Python floats, which act in at least fp32; do the same.
    weight_dtype = torch.promote_types(tile.dtype, torch.float32)
    ramp = torch.arange(length, dtype=torch.float64, device=tile.device) / extent
    shape = [1] * tile.dim()
    shape[dim] = length
    w_tile = ramp.to(weight_dtype).view(shape)
    w_prev = (1 - ramp).to(weight_dtype).view(shape)
    head_prev = prev.narrow(dim, offset, length)
    head_tile = tile.narrow(dim, 0, length)
    head = (head_prev * w_prev).to(tile.dtype) + (head_tile * w_tile).to(tile.dtype)
    return torch.cat([head, tile.narrow(dim, length, tile.shape[dim] - length)], dim=dim)

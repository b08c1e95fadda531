"""The VAE decode split over processes by tiles.

Tiled decoding cuts the latents into overlapping spatial tiles, decodes each on its own and blends the
seams (`models/vae_tiling.py`); the tiles are independent, so process k decodes tiles k, k + N, ...,
every process receives every tile and blends them exactly as one process would. The result equals the
single-process tiled decode. (Frame chunks cannot be split this way: the causal convolutions carry a
cache from each chunk into the next, so chunk k needs chunk k - 1 first.)

5B at 480x720 with the reference's tiles (240x360 pixels, overlap 1/6 x 1/5) has 3 x 3 = 9 tiles.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cogvideox.models.vae_tiling import tiled_decode
from cogvideox.parallel.mesh import Mesh


def tile_count(vae, latent_height: int, latent_width: int) -> int:
    """How many tiles a tiled decode of latents of this size uses (1 when tiling is off or it fits)."""
    t = vae.tiling
    if not vae.use_tiling or (latent_height <= t.latent_height and latent_width <= t.latent_width):
        return 1
    rows = len(range(0, latent_height, int(t.latent_height * (1 - t.overlap_height))))
    cols = len(range(0, latent_width, int(t.latent_width * (1 - t.overlap_width))))
    return rows * cols


def enable_tile_split(vae) -> bool:
    """Turn on tiled decoding so that `split_decode` has tiles to share (tiles always keep the frame
    size); returns whether tiling is on."""
    if not vae.use_tiling:
        vae.enable_tiling()
    return vae.use_tiling


def split_decode(vae, z: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """`vae.decode(z)` for latents z [B, C, F, h, w] (unscaled), with the tiles spread over the mesh's
    group. Falls back to a whole decode on every process when there is only one tile."""
    if mesh.group is None or tile_count(vae, *z.shape[-2:]) == 1:
        return vae.decode(z)
    if vae.use_slicing and z.shape[0] > 1:
        return torch.cat([_decode_tiles(vae, one, mesh) for one in z.split(1)])
    return _decode_tiles(vae, z, mesh)


def _decode_tiles(vae, z: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    # First pass: the tiles in the order the tiled decode asks for them (row-major), without decoding
    # (the latent tile stands in for its video; that pass's blend is thrown away).
    inputs: list[torch.Tensor] = []

    def record(tile: torch.Tensor) -> torch.Tensor:
        inputs.append(tile)
        return tile

    tiled_decode(record, z, vae.tiling)

    size = mesh.layout.size
    decoded = [vae.decode(tile) if i % size == mesh.rank else None for i, tile in enumerate(inputs)]
    for i in range(len(inputs)):
        owner = mesh.ranks[i % size]
        shape = torch.tensor(decoded[i].shape if decoded[i] is not None else [0] * 5, device=mesh.device)
        dist.broadcast(shape, src=owner, group=mesh.group)
        if decoded[i] is None:
            decoded[i] = torch.empty(shape.tolist(), dtype=z.dtype, device=z.device)
        dist.broadcast(decoded[i], src=owner, group=mesh.group)

    # Second pass: the same blend, fed the decoded tiles in the same order.
    tiles = iter(decoded)
    return tiled_decode(lambda tile: next(tiles), z, vae.tiling)


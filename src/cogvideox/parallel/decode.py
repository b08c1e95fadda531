"""The VAE decode on a group of processes: split by tiles when the decode is tiled, whole otherwise.

What the group does is what one process would do with the same VAE settings, so the parallel video is
the single-process video:
- tiling on (`--vae-tiling`, or the pipeline's memory plan turned it on): tiled decoding cuts the
  latents into overlapping spatial tiles, decodes each on its own and blends the seams
  (`models/vae_tiling.py`); the tiles are independent, so process k decodes tiles k, k + N, ..., every
  process receives every tile and blends them exactly as one process would. The result equals the
  single-process tiled decode.
- tiling off: every process decodes the whole video, untiled, as one process would. This is not split:
  tiling is never turned on behind the caller's back, because tiles blend their seams and so change
  the video. Nor can it be split exactly by latent-frame chunks: the causal convolutions carry a cache
  from each chunk into the next (and the decoder normalises per chunk), so chunk k needs every chunk
  before it, and chunks on different processes would only run one after another.

The group agrees before decoding: on tiling (on for all when any process's VAE has it on, since the
memory plan is per GPU and a process left out of the tile exchange would leave the others waiting) and,
after decoding, on whether any process ran out of GPU memory (then it is raised on all of them, so that
`Pipeline.decode`'s retry in tiles runs on all together instead of on one alone).

5B at 480x720 with the reference's tiles (240x360 pixels, overlap 1/6 x 1/5) has 3 x 3 = 9 tiles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from cogvideox.models.vae_tiling import tiled_decode
from cogvideox.parallel.mesh import Mesh

T = TypeVar("T")


def tile_count(vae, latent_height: int, latent_width: int) -> int:
    """How many tiles a tiled decode of latents of this size uses (1 when tiling is off or it fits)."""
    t = vae.tiling
    if not vae.use_tiling or (latent_height <= t.latent_height and latent_width <= t.latent_width):
        return 1
    rows = len(range(0, latent_height, int(t.latent_height * (1 - t.overlap_height))))
    cols = len(range(0, latent_width, int(t.latent_width * (1 - t.overlap_width))))
    return rows * cols


def split_decode(vae, z: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """`vae.decode(z)` for latents z [B, C, F, h, w] (unscaled) on every process of the mesh's group,
    with the tiles spread over the group when the decode is tiled and has more than one tile."""
    if mesh.group is None:
        return vae.decode(z)
    with _group_tiling(vae, mesh):
        if tile_count(vae, *z.shape[-2:]) == 1:
            return _together(lambda: vae.decode(z), mesh)  # untiled (or one tile): whole, everywhere
        if vae.use_slicing and z.shape[0] > 1:
            return torch.cat([_decode_tiles(vae, one, mesh) for one in z.split(1)])
        return _decode_tiles(vae, z, mesh)


@contextlib.contextmanager
def _group_tiling(vae, mesh: Mesh) -> Iterator[None]:
    """Tiling on for this decode when it is on in any process of the group, off when in none.

    Every process builds the same pipeline, but the memory plan of `offload="auto"` looks at its own
    GPU's free memory and may turn tiling on in some processes only; the tiles (the VAE's own tile
    settings, the same in every process) must be decoded by all or by none.
    """
    flag = torch.tensor([int(vae.use_tiling)], device=mesh.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.group)
    switched = bool(flag.item()) and not vae.use_tiling
    if switched:
        vae.enable_tiling()
    try:
        yield
    finally:
        if switched:
            vae.disable_tiling()


def _together(work: Callable[[], T], mesh: Mesh) -> T:
    """`work()` on every process of the group; when it runs out of GPU memory on any of them, every one
    raises `torch.cuda.OutOfMemoryError`, so that none goes on alone to a collective the others skip."""
    try:
        result, failure = work(), None
    except torch.cuda.OutOfMemoryError as error:
        result, failure = None, error
    failed = torch.tensor([int(failure is not None)], device=mesh.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=mesh.group)
    if failure is not None:
        raise failure
    if failed.item():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory in another process of the group (VAE decode)")
    return result


def _decode_tiles(vae, z: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    # First pass: the tiles in the order the tiled decode asks for them (row-major), without decoding
    # (the latent tile stands in for its video; that pass's blend is thrown away).
    inputs: list[torch.Tensor] = []

    def record(tile: torch.Tensor) -> torch.Tensor:
        inputs.append(tile)
        return tile

    tiled_decode(record, z, vae.tiling)

    size = mesh.layout.size

    def mine() -> list[torch.Tensor | None]:
        return [vae.decode(tile) if i % size == mesh.rank else None for i, tile in enumerate(inputs)]

    decoded = _together(mine, mesh)
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

"""The step cache on a mesh: the group decides together whether a step skips the blocks.

The first-block cache (`cogvideox.fast.cache`) compares the first block's video residual with the one of
the last full step and skips the other blocks when the relative change

    mean |R - R_ref| / mean |R_ref|        over every video token of the CFG batch

is below the threshold. Spread over processes, each one holds a part of that residual: a CFG half, a
sequence shard (whose last tokens may be padding), or both. Judged on its own part, each process would
reach its own decision, and one that skips while another computes leaves the second waiting in the next
block's collective for good. So the group judges the whole video: each process sums |R - R_ref| and
|R_ref| over its real tokens, one all-reduce adds the sums (the ratio of the sums is the ratio of the
means: both count the same tokens), and a second one (a minimum of the decisions) makes sure that a step
is skipped only where every process skips it, whatever the rounding of the sums. The change equals the
single-process one up to the order of the sums; the residuals each process stands in with are its own
part of the single-process ones, so a skipped step is the single-process skipped step, split.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cogvideox.fast.cache import StepCache
from cogvideox.parallel.mesh import Mesh
from cogvideox.parallel.sequence import SequenceParallel


class GroupJudge:
    """`StepCache.judge` for one process of `mesh`'s group (see the module's docstring)."""

    def __init__(self, cache: StepCache, mesh: Mesh, sequence: SequenceParallel) -> None:
        self.cache, self.mesh, self.sequence = cache, mesh, sequence

    def __call__(self, residual: torch.Tensor, reference: torch.Tensor) -> tuple[float, bool]:
        call = self.sequence.call
        rows = call.video_rows if self.mesh.layout.sequence > 1 and call is not None else residual.shape[1]
        residual, reference = residual[:, :rows], reference[:, :rows]  # [B, tokens, D] without padding
        sums = torch.stack([(residual - reference).abs().float().sum(), reference.abs().float().sum()])
        dist.all_reduce(sums, group=self.mesh.group)
        change = (sums[0] / sums[1]).item()
        skip = torch.tensor([int(change < self.cache.threshold)], device=sums.device)
        dist.all_reduce(skip, op=dist.ReduceOp.MIN, group=self.mesh.group)
        return change, bool(skip.item())


def share_step_cache(cache: StepCache | None, mesh: Mesh, sequence: SequenceParallel) -> None:
    """Make `cache` (if any) decide with the whole group of `mesh`; `unshare_step_cache` undoes it."""
    if cache is not None and mesh.group is not None:
        cache.judge = GroupJudge(cache, mesh, sequence)


def unshare_step_cache(cache: StepCache | None) -> None:
    if cache is not None:
        cache.judge = None

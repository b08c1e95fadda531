"""Ring attention: softmax attention over keys and values spread around a ring of processes.

Each process keeps its queries and passes its key/value block to the next process while it attends to the
block it holds; after `ring` steps every query has seen every key. The partial results are merged with the
online-softmax rule (running maximum m, running denominator l, running numerator o, all fp32):

    m' = max(m, m_blk)    l' = l e^(m - m') + sum e^(s - m')    o' = o e^(m - m') + e^(s - m') V

so the result is the softmax over all keys, exact up to the order of the fp32 sums. Unlike Ulysses it
needs no relation between the degree and the head count. Padding keys (the sequence is padded to a
multiple of the shard count) are cut off each block before the scores, so they get no weight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Queries per slice of the score matrix: bounds the fp32 scores to batch x heads x 1024 x keys per block.
QUERY_CHUNK = 1024


class _Softmax:
    """Running online-softmax accumulators for queries q [B, H, Lq, d]."""

    def __init__(self, q: torch.Tensor) -> None:
        shape = q.shape[:-1] + (1,)
        self.m = torch.full(shape, float("-inf"), dtype=torch.float32, device=q.device)
        self.l = torch.zeros(shape, dtype=torch.float32, device=q.device)
        self.o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)

    def add(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
        """Fold in the keys k and values v [B, H, Lk, d] (Lk > 0)."""
        k, v = k.float(), v.float()
        for start in range(0, q.shape[2], QUERY_CHUNK):
            rows = slice(start, start + QUERY_CHUNK)
            scores = (q[:, :, rows].float() @ k.transpose(-1, -2)) * scale  # [B, H, chunk, Lk]
            m_old = self.m[:, :, rows]
            m_new = torch.maximum(m_old, scores.amax(dim=-1, keepdim=True))
            keep = torch.exp(m_old - m_new)  # 0 where nothing was seen yet (m_old = -inf)
            p = torch.exp(scores - m_new)
            self.l[:, :, rows] = self.l[:, :, rows] * keep + p.sum(dim=-1, keepdim=True)
            self.o[:, :, rows] = self.o[:, :, rows] * keep + p @ v
            self.m[:, :, rows] = m_new

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.o / self.l).to(dtype)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: list[int],
    index: int,
    ring_ranks: tuple[int, ...],
    group,
) -> torch.Tensor:
    """Attention of the local queries to the keys of all ring members.

    q, k, v: this member's blocks [B, H, Lb, d] (every member has the same Lb). `valid[j]` is how many
    leading keys of member j's block are real (the rest is padding). `index` is this member's place in
    `ring_ranks` (global ranks, in ring order). Returns [B, H, Lb, d] in q's dtype.
    """
    size = len(ring_ranks)
    scale = q.shape[-1] ** -0.5  # the scaled-dot-product default, as the single-process path uses
    acc = _Softmax(q)
    send_to, recv_from = ring_ranks[(index + 1) % size], ring_ranks[(index - 1) % size]
    kv = torch.stack([k, v]).contiguous()  # one message per step: [2, B, H, Lb, d]
    for step in range(size):
        pending = []
        if step < size - 1:
            incoming = torch.empty_like(kv)
            ops = [
                dist.P2POp(dist.isend, kv, send_to, group),
                dist.P2POp(dist.irecv, incoming, recv_from, group),
            ]
            pending = dist.batch_isend_irecv(ops)  # overlaps with the block's attention below
        owner = (index - step) % size  # whose keys we hold at this step
        n = valid[owner]
        if n > 0:
            acc.add(q, kv[0][:, :, :n], kv[1][:, :, :n], scale)
        for request in pending:
            request.wait()
        if pending:
            kv = incoming
    return acc.result(q.dtype)

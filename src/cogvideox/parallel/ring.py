"""Ring attention: softmax attention over keys and values spread around a ring of processes.

Each process keeps its queries and passes its key/value block to the next process while it attends to the
block it holds; after `ring` steps every query has seen every key. Each block's attention runs in the
fused kernel (flash attention on the GPU in bf16/fp16, its CPU counterpart on the CPU; cuDNN attention on
the GPU when asked for), which returns the block's output O_b and the log-sum-exp of its scores S_b; the
blocks are merged by the rule

    S = log(e^S_1 + e^S_2 + ...)    O = sum_b e^(S_b - S) O_b       (fp32 accumulators)

(a single block is the answer as the kernel gave it), so the result is the softmax over all keys, exact up
to the order of the sums and the rounding of each block's output to the input dtype. Where no fused kernel
takes the inputs (fp32 on the GPU), the scores are computed in fp32 and merged with the online-softmax
rule instead (running maximum m, denominator l, numerator o). Unlike Ulysses it needs no relation between
the degree and the head count. Padding keys (the sequence is padded to a multiple of the shard count)
are cut off each block, so they get no weight.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

# Queries per slice of the score matrix: bounds the fp32 scores to batch x heads x 1024 x keys per block.
QUERY_CHUNK = 1024


def _flash_cuda(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]


def _flash_cpu(q, k, v, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)


def _cudnn_cuda(q, k, v, scale):
    # (query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale).
    # Its log-sum-exp is natural-log like flash's (PyTorch's context parallelism merges the two alike) but
    # [B, H, Lq, 1] since torch 2.9 ([B, H, Lq] before): reshaped to flash's [B, H, Lq].
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    out, lse = op(q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
    return out, lse.reshape(q.shape[:-1])


KERNELS = ("flash", "cudnn")


def fused_kernel(q: torch.Tensor, prefer: str = "flash"):
    """The fused attention kernel `prefer` ("flash", the default, or "cudnn") for q's device and dtype,
    `(q, k, v, scale) -> (output [B, H, Lq, d] in q's dtype, log-sum-exp of the scores [B, H, Lq] fp32)`,
    or None where it does not take them. These are the kernels PyTorch's own context parallelism merges
    ring blocks with: SDPA's public call does not return the log-sum-exp. Flash runs on the GPU (bf16/fp16,
    Ampere or newer) and on the CPU; cuDNN attention (which SDPA picks on Hopper) on the GPU only."""
    if prefer not in KERNELS:
        raise ValueError(f"unknown ring attention kernel {prefer!r}: one of {', '.join(KERNELS)}")
    if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16):
        # Both need an Ampere or newer GPU; older ones take the fp32 path.
        if torch.cuda.get_device_capability(q.device) < (8, 0):
            return None
        if prefer == "cudnn":
            return _cudnn_cuda if torch.backends.cudnn.is_available() else None
        return _flash_cuda
    if q.device.type == "cpu" and prefer == "flash":
        return _flash_cpu
    return None


class _LogSumExp:
    """Running merge of block outputs by their log-sum-exp, for queries q [B, H, Lq, d].

    The first block is kept as the kernel gave it (a single block is the answer as it is); from the second
    on, the fp32 accumulator is rescaled in place: o <- o w_o + O_b w_b with w_o = e^(S - S'), w_b =
    e^(S_b - S'), S' = log(e^S + e^S_b), two passes over it per block."""

    def __init__(self, q: torch.Tensor) -> None:
        self.shape, self.device = q.shape, q.device
        self.lse: torch.Tensor | None = None  # [B, H, Lq] fp32, once a block is in
        self.o: torch.Tensor | None = None  # the first block's output as given, then the fp32 accumulator
        self.owned = False  # whether self.o is the accumulator (updated in place) rather than a kernel's output

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.lse is None:
            self.o, self.lse = out, lse.float()
            return
        new = torch.logaddexp(self.lse, lse)
        keep, take = torch.exp(self.lse - new).unsqueeze(-1), torch.exp(lse - new).unsqueeze(-1)
        if self.owned:
            self.o.mul_(keep)
        else:  # the first block's output, in the kernel's dtype: the product is a new fp32 accumulator
            self.o, self.owned = torch.mul(self.o, keep), True
        self.o.addcmul_(out, take)  # out in its own dtype, computed in fp32
        self.lse = new

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        if self.o is None:
            return torch.zeros(self.shape, dtype=dtype, device=self.device)
        return self.o.to(dtype)


class _Softmax:
    """Running online-softmax accumulators for queries q [B, H, Lq, d], with the scores in fp32: the path
    for inputs no fused kernel takes."""

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
    kernel: str = "flash",
) -> torch.Tensor:
    """Attention of the local queries to the keys of all ring members.

    q, k, v: this member's blocks [B, H, Lb, d] (every member has the same Lb). `valid[j]` is how many
    leading keys of member j's block are real (the rest is padding). `index` is this member's place in
    `ring_ranks` (global ranks, in ring order). `kernel` names the fused kernel of each block (see
    `fused_kernel`); where it does not take the inputs, the blocks go through the fp32 online softmax.
    Returns [B, H, Lb, d] in q's dtype.
    """
    size = len(ring_ranks)
    scale = q.shape[-1] ** -0.5  # the scaled-dot-product default, as the single-process path uses
    fused = fused_kernel(q, kernel)
    acc = _LogSumExp(q) if fused is not None else _Softmax(q)
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
        if n > 0 and fused is not None:
            acc.add(*fused(q, kv[0][:, :, :n], kv[1][:, :, :n], scale))
        elif n > 0:
            acc.add(q, kv[0][:, :, :n], kv[1][:, :, :n], scale)
        for request in pending:
            request.wait()
        if pending:
            kv = incoming
    return acc.result(q.dtype)


# The rings of this process, by key: (index, ring_ranks, group) as `ring_attention` takes them.
_RINGS: dict[int, tuple[int, tuple[int, ...], object]] = {}
_keys = itertools.count()


def register_ring(index: int, ring_ranks: tuple[int, ...], group) -> int:
    """A key under which `ring_attention_op` finds this process's ring (`unregister_ring` forgets it)."""
    key = next(_keys)
    _RINGS[key] = (index, tuple(ring_ranks), group)
    return key


def unregister_ring(key: int) -> None:
    _RINGS.pop(key, None)


@torch.library.custom_op("cogvideox::ring_attention", mutates_args=())
def ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: list[int], ring: int) -> torch.Tensor:
    """`ring_attention` as one operator, for compiled blocks: Dynamo cannot trace the ring's point-to-point
    messages, so the graph holds the whole ring as one opaque node. `ring` is a key from `register_ring`
    (an int, the same for every block, so the blocks still share one graph). Returns a contiguous tensor."""
    index, ring_ranks, group = _RINGS[ring]
    return ring_attention(q, k, v, valid, index, ring_ranks, group).contiguous()


@ring_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: list[int], ring: int) -> torch.Tensor:
    return q.new_empty(q.shape)

"""Sequence parallelism: each process runs the transformer blocks on 1/N of the joint [text ; video] sequence.

Everything in an expert block is per token except the attention's softmax: the AdaLN modulation (text
or video), the projections, QK-norm, RoPE (a function of the token's position) and the feed-forward. So
the sequence is cut once, before the first block, into N contiguous shards (padded at the end to a
multiple of N), and gathered once, after the last. Because text comes first, any contiguous shard is
some text tokens followed by some video tokens: the block's own code runs on it unchanged, with the
shard's text length and the RoPE rows of the shard's video positions (padding rows rotate by 0).

Only attention crosses shards; it is replaced on each block's `attn1.attend` seam:
- Ulysses (degree U, must divide the heads): an all-to-all turns [heads, shard] into [heads/U, U shards],
  the original attention runs on whole sequences for a subset of heads, a second all-to-all turns it back.
- Ring (degree R, any): see `ring.py`; with both, Ulysses runs inside each ring member (USP layout), so
  the ring passes blocks of U shards over heads/U heads.
Padding keys are removed before the softmax (sliced off), so the result is exact; padding queries are
computed and dropped at the gather.

Per layer and process the sequence work is 1/N; the all-to-alls carry 4 x B x L x hidden / N elements
in total per layer (q, k, v in, the output back) and the ring R - 1 key/value blocks.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cogvideox.parallel.mesh import Mesh
from cogvideox.parallel.ring import register_ring, ring_attention, ring_attention_op, unregister_ring


@dataclass
class _Call:
    """What one forward pass's hooks share: the lengths and this shard's RoPE rows."""

    text_len: int  # L
    total: int  # L + N, the real sequence length
    shard: int  # tokens per shard, ceil(total / S)
    rope: tuple[torch.Tensor, torch.Tensor] | None
    video_rows: int  # real video tokens in this shard: its leading ones (padding follows them)


class SequenceParallel:
    """Hooks that shard the transformer's blocks over the mesh's sequence group (Ulysses x ring).

    `SequenceParallel(transformer, mesh)` installs them; `remove()` restores the exact model. The model's
    weights and state-dict keys are untouched.
    """

    def __init__(self, transformer: nn.Module, mesh: Mesh) -> None:
        self.mesh = mesh
        self.call: _Call | None = None
        self._handles = []
        self._attends = []
        blocks = list(transformer.transformer_blocks)
        if mesh.layout.sequence == 1 or not blocks:
            return
        if getattr(transformer, "_sequence_parallel", None) is not None:
            raise RuntimeError("this transformer is already sequence-parallel: remove() the first hooks")
        self._transformer = transformer
        transformer._sequence_parallel = self
        self._ring = register_ring(mesh.ring_index, mesh.ring_ranks, mesh.ring_group) if mesh.layout.ring > 1 else None
        first, last = blocks[0], blocks[-1]
        self._handles.append(first.register_forward_pre_hook(self._shard, with_kwargs=True))
        for block in blocks[1:]:
            self._handles.append(block.register_forward_pre_hook(self._local_rope, with_kwargs=True))
        self._handles.append(last.register_forward_hook(self._gather))
        for block in blocks:
            attn = block.attn1
            previous = attn.__dict__.get("attend")  # an attention backend installed on the instance
            inner = attn.attend
            attn.attend = types.MethodType(_make_attend(self, inner), attn)
            self._attends.append((attn, previous))

    def remove(self) -> None:
        """Take the hooks off: the transformer runs on whole sequences in one process again."""
        for handle in self._handles:
            handle.remove()
        for attn, previous in self._attends:
            if previous is None:
                del attn.attend
            else:
                attn.attend = previous
        if self._handles:
            self._transformer._sequence_parallel = None
            if self._ring is not None:
                unregister_ring(self._ring)
        self._handles, self._attends = [], []

    # ------------------------------------------------------------------------------------------------
    # Block hooks

    def _shard(self, block, args, kwargs):
        """Before the first block: cut (video [B, N, D], text [B, L, D]) to this process's shard."""
        video, text, emb, rope = _block_args(args, kwargs)
        S, s = self.mesh.layout.sequence, self.mesh.sequence_index
        B, L, D = text.shape
        N = video.shape[1]
        total = L + N
        shard = -(-total // S)
        joint = torch.cat([text, video], dim=1)  # [B, L + N, D]
        if shard * S > total:
            joint = torch.cat([joint, joint.new_zeros(B, shard * S - total, D)], dim=1)
        local = joint[:, s * shard : (s + 1) * shard]  # [B, shard, D]
        local_text = min(max(L - s * shard, 0), shard)
        first_video = s * shard + local_text - L  # video position of the shard's first video token
        real = min(max(total - s * shard, 0), shard)  # tokens of this shard that are not padding
        rope_rows = _rope_rows(rope, first_video, shard - local_text, N)
        self.call = _Call(L, total, shard, rope_rows, video_rows=real - local_text)
        return (local[:, local_text:].contiguous(), local[:, :local_text].contiguous(), emb, self.call.rope), {}

    def _local_rope(self, block, args, kwargs):
        video, text, emb, _ = _block_args(args, kwargs)
        return (video, text, emb, self.call.rope), {}

    def _gather(self, block, args, output):
        """After the last block: all shards back on every process, padding dropped."""
        video, text = output
        local = torch.cat([text, video], dim=1).contiguous()  # [B, shard, D]
        parts = [torch.empty_like(local) for _ in range(self.mesh.layout.sequence)]
        dist.all_gather(parts, local, group=self.mesh.sequence_group)
        joint = torch.cat(parts, dim=1)[:, : self.call.total]
        L = self.call.text_len
        return joint[:, L:], joint[:, :L]

    # ------------------------------------------------------------------------------------------------
    # Attention across shards

    def attend(self, inner, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [B, H, shard, d] of this shard -> attention output [B, H, shard, d] over all shards."""
        layout, mesh, call = self.mesh.layout, self.mesh, self.call
        U = layout.ulysses
        if U > 1:
            q, k, v = (_seq_to_heads(t, U, mesh.ulysses_group) for t in (q, k, v))  # [B, H/U, U*shard, d]
        span = U * call.shard  # tokens per ring member
        if layout.ring == 1:
            keys = call.total  # the span is the whole padded sequence: cut the padding keys
            out = inner(q, k[:, :, :keys], v[:, :, :keys]) if keys < span else inner(q, k, v)
        else:
            valid = [min(max(call.total - j * span, 0), span) for j in range(layout.ring)]
            if torch.compiler.is_compiling():  # a compiled block: the ring as one opaque operator
                out = ring_attention_op(q, k, v, valid, self._ring)
            else:
                out = ring_attention(q, k, v, valid, mesh.ring_index, mesh.ring_ranks, mesh.ring_group)
        if U > 1:
            out = _heads_to_seq(out, U, mesh.ulysses_group)
        return out


def _make_attend(parallel: SequenceParallel, inner):
    def attend(attn, q, k, v):
        return parallel.attend(inner, q, k, v)

    return attend


def _block_args(args: tuple, kwargs: dict):
    """(video, text, emb, rope) of an ExpertBlock call, however they were passed."""
    names = ("video", "text", "emb", "rope")
    values = dict(zip(names, args)) | {k: kwargs[k] for k in names if k in kwargs}
    return values["video"], values["text"], values["emb"], values.get("rope")


def _rope_rows(rope, start: int, count: int, num_video: int):
    """RoPE rows [count, head_dim] for video positions start ... start + count - 1; positions past the
    last video token (padding) get the identity rotation (cos 1, sin 0)."""
    if rope is None:
        return None
    cos, sin = rope
    real = cos[start : min(start + count, num_video)], sin[start : min(start + count, num_video)]
    pad = count - real[0].shape[0]
    if pad == 0:
        return real
    return (
        torch.cat([real[0], cos.new_ones(pad, cos.shape[1])]),
        torch.cat([real[1], sin.new_zeros(pad, sin.shape[1])]),
    )


def _seq_to_heads(x: torch.Tensor, U: int, group) -> torch.Tensor:
    """[B, H, l, d] (my shard, all heads) -> [B, H/U, U*l, d] (the group's shards, my heads)."""
    B, H, l, d = x.shape
    send = x.reshape(B, U, H // U, l, d).transpose(0, 1).contiguous()  # [U, B, H/U, l, d]: piece j for rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i] = rank i's shard of my heads
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // U, U * l, d)


def _heads_to_seq(x: torch.Tensor, U: int, group) -> torch.Tensor:
    """Inverse of `_seq_to_heads`: [B, H/U, U*l, d] -> [B, H, l, d]."""
    B, h, L, d = x.shape
    l = L // U
    send = x.reshape(B, h, U, l, d).permute(2, 0, 1, 3, 4).contiguous()  # [U, B, H/U, l, d]: shard j for rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i] = my shard of rank i's heads
    return recv.transpose(0, 1).reshape(B, U * h, l, d)

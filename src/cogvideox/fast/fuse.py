"""Fused QKV projection: one matrix product of [q ; k ; v] instead of three.

The three projections read the same input, so one GEMM of three times the width does the work of three
launches and reads the activations once (and an fp8 layer quantises them once). The fused layer owns the
only copy of the weights; state-dict hooks split it back into `to_q` / `to_k` / `to_v` on save and join
the three on load, so checkpoints keep the official layout.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from cogvideox.models.attention import JointAttention

_PARTS = ("to_q", "to_k", "to_v")


def _fused_project_qkv(attn: JointAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return attn.to_qkv(x).chunk(3, dim=-1)  # [B, L, 3*inner] -> 3 x [B, L, inner]


def _split_on_save(attn, state_dict, prefix, local_metadata) -> None:
    # Every tensor of the fused layer is stacked along its output rows (weight, bias, and the per-row
    # scales of a quantised layer), so thirds of dim 0 are the official q, k and v tensors. They are
    # copies: safetensors refuses to write tensors that share memory.
    fused = prefix + "to_qkv."
    for key in [k for k in state_dict if k.startswith(fused)]:
        name = key[len(fused) :]
        for part, chunk in zip(_PARTS, state_dict.pop(key).chunk(3, dim=0)):
            state_dict[f"{prefix}{part}.{name}"] = chunk.clone()


def _join_on_load(attn, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    names = [n for n, _ in attn.to_qkv.named_parameters()] + [n for n, _ in attn.to_qkv.named_buffers()]
    for name in names:
        keys = [f"{prefix}{part}.{name}" for part in _PARTS]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}to_qkv.{name}"] = torch.cat([state_dict.pop(k) for k in keys], dim=0)


def fuse_attention(attn: JointAttention) -> None:
    """Replace `to_q`, `to_k`, `to_v` of one attention layer by a single linear `to_qkv` (in place)."""
    if hasattr(attn, "to_qkv"):
        return
    q, k, v = (getattr(attn, name) for name in _PARTS)
    if not all(type(p) is nn.Linear for p in (q, k, v)):
        raise TypeError("fuse QKV before quantising or adding adapters: to_q/to_k/to_v must be nn.Linear")
    weight = q.weight
    fused = nn.Linear(q.in_features, 3 * q.out_features, bias=q.bias is not None, device="meta")
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([q.weight, k.weight, v.weight]), requires_grad=weight.requires_grad)
        if q.bias is not None:
            fused.bias = nn.Parameter(torch.cat([q.bias, k.bias, v.bias]), requires_grad=weight.requires_grad)
    for name in _PARTS:
        delattr(attn, name)  # the separate weights are freed once the caller drops its references
    attn.to_qkv = fused
    attn.project_qkv = types.MethodType(_fused_project_qkv, attn)
    attn.register_state_dict_post_hook(_split_on_save)
    attn.register_load_state_dict_pre_hook(_join_on_load)


def fuse_qkv(model: nn.Module) -> int:
    """Fuse the QKV projections of every `JointAttention` in `model`; returns how many were fused."""
    layers = [m for m in model.modules() if isinstance(m, JointAttention)]
    for attn in layers:
        fuse_attention(attn)
    return len(layers)

"""3D full attention over the joint [text ; video] sequence (CogVideoX section 2.2).

Text and video tokens share one attention: the same projections, QK-LayerNorm and softmax, with no
mask (padded text tokens are attended to, as in training). Only video tokens carry 3D RoPE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, heads, S, head_dim] by the angles whose cos/sin
    are given as [S, head_dim] (each value repeated for both channels of its pair).

    The rotation is done in float32 and cast back, so bf16 activations get fp32 RoPE.
    """
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, heads, S, head_dim/2] each
    rotated = torch.stack([-odd, even], dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class JointAttention(nn.Module):
    """Multi-head self-attention over [text ; video] with QK-LayerNorm and RoPE on the video part.

    Keys: `to_q`, `to_k`, `to_v`, `norm_q`, `norm_k`, `to_out.0` (`to_out.1` is a parameter-free
    dropout, kept so the output projection has the official key).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool = True, out_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        # One LayerNorm per projection, shared by all heads; it keeps the logits bounded at scale.
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias), nn.Dropout(0.0)])

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> q, k, v, each [B, L, heads*head_dim].

        A seam for optimisations applied from outside (a fused QKV projection replaces this method on
        the instance); the exact path is three separate linears, as the checkpoint stores them.
        """
        return self.to_q(x), self.to_k(x), self.to_v(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention of q, k, v [B, heads, L, head_dim] -> [B, heads, L, head_dim].

        A seam for attention backends and sequence parallelism applied from outside (they replace this
        method on the instance and may call the original).
        """
        return F.scaled_dot_product_attention(q, k, v)

    def forward(
        self,
        x: torch.Tensor,
        text_len: int,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, text_len + N, D] -> [B, text_len + N, D]; `rope` = (cos, sin), each [N, head_dim]."""
        B, L, _ = x.shape
        # [B, L, heads*head_dim] -> [B, heads, L, head_dim]
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in self.project_qkv(x))
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            cos, sin = rope
            q = torch.cat([q[:, :, :text_len], apply_rope(q[:, :, text_len:], cos, sin)], dim=2)
            k = torch.cat([k[:, :, :text_len], apply_rope(k[:, :, text_len:], cos, sin)], dim=2)
        out = self.attend(q, k, v)  # [B, heads, L, head_dim]
        out = out.transpose(1, 2).reshape(B, L, -1)
        project, dropout = self.to_out
        return dropout(project(out))

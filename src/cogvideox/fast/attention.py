"""The attention kernel: which scaled-dot-product backend runs the joint attention.

At the 5B shape (B=2, 48 heads, 17,776 tokens, head_dim 64) PyTorch's cuDNN backend is the fastest on
Hopper (about 428 TFLOP/s against about 326 for flash on an H100), and attention is half of the FLOPs of a
step, so the choice matters. The backends compute the same softmax attention; they differ in the order of
the sums, so outputs agree to rounding.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cogvideox.errors import InputError
from cogvideox.models.attention import JointAttention

# Tried in this order; PyTorch takes the first one that supports the inputs.
BACKENDS: dict[str, list[SDPBackend]] = {
    "auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
CUDA_ONLY = ("cudnn", "flash", "efficient")


def check_backend(name: str, device: torch.device | str) -> None:
    """Raise `InputError` for an unknown backend, or a CUDA-only one on another device."""
    if name not in BACKENDS:
        raise InputError(f"unknown attention backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name in CUDA_ONLY and torch.device(device).type != "cuda":
        raise InputError(f"the {name} attention backend needs a CUDA GPU; use 'auto' or 'math' on {device}")


def _attend_with(backends: list[SDPBackend]):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backends, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)

    return attend


def use_attention_backend(model: nn.Module, name: str = "auto") -> int:
    """Make every `JointAttention` in `model` run SDPA with the named backend(s); returns how many.

    "auto" prefers cuDNN, then flash, then memory-efficient, then the math fallback (which is what
    runs on the CPU); a single name forces that backend and fails loudly where it cannot run.
    """
    device = next(model.parameters()).device
    check_backend(name, device)
    layers = [m for m in model.modules() if isinstance(m, JointAttention)]
    for attn in layers:
        attn.attend = types.MethodType(_attend_with(BACKENDS[name]), attn)
    return len(layers)

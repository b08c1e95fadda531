"""The attention kernel: which scaled-dot-product backend runs the joint attention.

At the 5B shape (B=2, 48 heads, 17,776 tokens, head_dim 64) attention is half of the FLOPs of a step, so
the choice matters. Of PyTorch's SDPA backends cuDNN is the fastest on Hopper (measured on an H200: 17.7
ms, 439 TFLOP/s, against 24.3 ms for flash); they compute the same softmax attention in different orders
of the sums, so outputs agree to rounding. "fa3" is exact too: FlashAttention-3's forward kernel for
Hopper (`flash3.py`), an installed package outside PyTorch's SDPA, 13.9 ms (559 TFLOP/s) at that shape
with the same error against fp32 as cuDNN, and 13% off the compiled 5B step. So "auto" runs it where it
can (inference on a compute capability 9.0 GPU with a build installed, a bf16 model, or fp16 with a
source build) and SDPA's backends, cuDNN first, elsewhere and wherever autograd records (the kernel has
no backward). "sage" computes Q·K^T in INT8 and P·V in fp16 (`sage.py`), a lossy kernel like the fp8
linears, and "sage-emulated" runs its math in plain PyTorch on any device. "fa3-fp8" runs
FlashAttention-3's FP8 forward kernel on e4m3 q, k, v with one scale per head (`fp8_attention.py`),
lossy too, and "fa3-fp8-emulated" its math in plain PyTorch.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cogvideox.errors import InputError
from cogvideox.models.attention import JointAttention

from . import flash3, fp8_attention
from .sage import check_inputs, sage_attention, sage_attention_emulated_op, smooth_keys
from .sage import load_kernel as load_sage_kernel

# Tried in this order; PyTorch takes the first one that supports the inputs.
BACKENDS: dict[str, list[SDPBackend]] = {
    "auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
EXACT_KERNELS = ("fa3",)  # exact, from packages of their own (CUDA)
EIGHT_BIT = ("sage", "sage-emulated", "fa3-fp8", "fa3-fp8-emulated")  # lossy: INT8 Q·K^T, fp16 P·V; e4m3 all
NAMES = (*BACKENDS, *EXACT_KERNELS, *EIGHT_BIT)
# The backends that run on CUDA GPUs alone: what their message says of the GPU, and what to use instead.
CUDA_ONLY = {
    "cudnn": ("", "Use 'auto' or 'math'"),
    "flash": ("", "Use 'auto' or 'math'"),
    "efficient": ("", "Use 'auto' or 'math'"),
    "fa3": (" (Hopper: H100, H200)", "Use 'auto'"),
    "fa3-fp8": (" (Hopper: H100, H200)", "Use 'fa3-fp8-emulated' for its math in plain PyTorch, or 'auto'"),
    "sage": (" (its kernels are Triton's)", "Use 'sage-emulated' for its math in plain PyTorch, or 'auto'"),
}
# The backends whose kernels come from a package: loading it raises `InputError` saying how to install it.
PACKAGE_KERNELS = {"fa3": flash3.load_kernel, "fa3-fp8": flash3.load_kernel, "sage": load_sage_kernel}


def check_backend(name: str, device: torch.device | str) -> None:
    """Raise `InputError` for an unknown backend, or one that cannot run on `device` (a CUDA backend
    elsewhere, a package backend whose package is missing)."""
    if name not in NAMES:
        raise InputError(f"unknown attention backend {name!r}; use one of {', '.join(NAMES)}")
    if name in CUDA_ONLY and torch.device(device).type != "cuda":
        gpu, instead = CUDA_ONLY[name]
        raise InputError(f"the {name} attention backend needs a CUDA GPU{gpu}; this run is on {device}. {instead}")
    if name in PACKAGE_KERNELS:
        PACKAGE_KERNELS[name]()


def _attend_with(backends: list[SDPBackend]):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backends, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)

    return attend


def _sage_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Smoothing here, outside the opaque op, lets a compiled block fuse it with the RoPE that makes k.
    return sage_attention(q, smooth_keys(k), v)


def _sage_emulated_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return sage_attention_emulated_op(q, k, v)


def _fa3_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return flash3.fa3_attend(q, k, v)


def _fa3_fp8_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return fp8_attention.fa3_fp8_attend(q, k, v)


def _fp8_emulated_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return fp8_attention.fp8_attention_emulated_op(q, k, v)


_sdpa_auto_attend = _attend_with(BACKENDS["auto"])


def _fa3_or_sdpa_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """"auto" where FlashAttention-3 can run: its kernel, unless autograd records (it has no backward)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _sdpa_auto_attend(self, q, k, v)
    return flash3.fa3_attend(q, k, v)


def _is_hopper(device: torch.device) -> bool:
    """Whether `device` is a GPU of compute capability 9.0 (H100, H200), the one FlashAttention-3 is for."""
    return torch.cuda.get_device_capability(device)[0] == 9


def auto_kernel(model: nn.Module, device: torch.device | str | None = None) -> str:
    """What "auto" runs for `model` on `device`: "fa3" (inference on a Hopper GPU with a FlashAttention-3
    build that takes the model's dtype and head size) or "sdpa" (PyTorch's backends, cuDNN first)."""
    device = torch.device(next(model.parameters()).device if device is None else device)
    if device.type != "cuda" or not _is_hopper(device):
        return "sdpa"
    try:
        _check_fa3_takes(model)
    except InputError:  # no build, one that does not load, or a model it does not take: SDPA's backends
        return "sdpa"
    return "fa3"


def _check_fa3_takes(model: nn.Module) -> None:
    """Raise `InputError` unless a FlashAttention-3 build loads and takes every attention layer's head size
    and dtype."""
    build = flash3.load_build()[0]
    for attn in model.modules():
        if isinstance(attn, JointAttention):
            flash3.check_inputs(attn.norm_q.normalized_shape[0], attn.norm_q.weight.dtype, build)


def auto_chose_fa3(model: nn.Module) -> bool:
    """Whether `use_attention_backend(model, "auto")` installed FlashAttention-3 (for inference; SDPA under
    autograd) in `model`'s attention layers."""
    layers = (m for m in model.modules() if isinstance(m, JointAttention))
    return any(getattr(m.attend, "__func__", None) is _fa3_or_sdpa_attend for m in layers)


def use_attention_backend(model: nn.Module, name: str = "auto", device: torch.device | str | None = None) -> int:
    """Make every `JointAttention` in `model` run attention with the named backend; returns how many.

    "auto" runs FlashAttention-3 for inference where it can (`auto_kernel`), and otherwise prefers cuDNN,
    then flash, then memory-efficient, then the math fallback (which is what runs on the CPU); a single
    SDPA name forces that backend and fails loudly where it cannot run.
    "sage" runs the sageattention package's 8-bit kernel (CUDA, bf16/fp16, heads of 64 or 128 channels),
    "sage-emulated" the same math in plain PyTorch; "fa3" FlashAttention-3's exact forward kernel (CUDA,
    bf16; inference only); "fa3-fp8" its FP8 kernel on e4m3 q, k, v (CUDA, bf16 models, heads of 64, 96,
    128, 192 or 256 channels; inference only; lossy), "fa3-fp8-emulated" that math in plain PyTorch.
    device: where the model will compute (default: where its parameters are).
    """
    device = next(model.parameters()).device if device is None else device
    check_backend(name, device)
    layers = [m for m in model.modules() if isinstance(m, JointAttention)]
    if name == "sage":
        for attn in layers:
            check_inputs(attn.norm_q.normalized_shape[0], attn.norm_q.weight.dtype)
        attend = _sage_attend
    elif name == "sage-emulated":
        attend = _sage_emulated_attend
    elif name == "fa3":
        _check_fa3_takes(model)
        attend = _fa3_attend
    elif name == "fa3-fp8":
        for attn in layers:
            fp8_attention.check_inputs(attn.norm_q.normalized_shape[0], attn.norm_q.weight.dtype)
        attend = _fa3_fp8_attend
    elif name == "fa3-fp8-emulated":
        attend = _fp8_emulated_attend
    elif name == "auto" and auto_kernel(model, device) == "fa3":
        attend = _fa3_or_sdpa_attend
    else:
        attend = _attend_with(BACKENDS[name])
    for attn in layers:
        attn.attend = types.MethodType(attend, attn)
    return len(layers)

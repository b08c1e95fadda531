"""3D convolutions of a single video on the CPU through oneDNN.

PyTorch picks a CPU convolution kernel by shape. A 3D convolution of one sample (batch 1) whose
`C * T * H` is at most 20480 runs on its own im2col kernel (`slow_conv3d`, see `use_mkldnn` in
ATen's Convolution.cpp): the causal VAE decodes a few frames at a time with few channels, so nearly all
of its convolutions land there. oneDNN runs the same convolutions 5-9x faster forward (measured on the
demo model's VAE, one thread: 2.2 s of convolutions in a decode become 0.45 s). Its backward pass
(`convolution_backward`) picks its kernel by the same rule, so a backward of one sample is run as a
batch of two whose second sample is zeros: it adds nothing to the gradients and takes 4x less time than
the im2col kernel on one.

The results differ from the im2col kernel's by float rounding (relative 1e-6), as a change of thread
count does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# ATen runs a one-sample 3D convolution with N * C * T * H up to this on its im2col kernel.
ATEN_IM2COL_LIMIT = 20480

_onednn = True  # False inside `aten_kernels()`


@contextlib.contextmanager
def aten_kernels() -> Iterator[None]:
    """Within: every 3D convolution on the kernel ATen picks, as the reference runs them (to compare)."""
    global _onednn
    before, _onednn = _onednn, False
    try:
        yield
    finally:
        _onednn = before


def conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
    groups: int,
) -> torch.Tensor:
    """`F.conv3d` with zero padding given as a tuple of ints; through oneDNN where ATen would use im2col."""
    if not _im2col_case(x, weight, groups):
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _OneDNNConv3d.apply(x, weight, bias, stride, padding, dilation, groups)
    return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)


def _im2col_case(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether ATen would convolve `x` on its slow im2col kernel and oneDNN can take it instead."""
    return (
        _onednn
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 5
        and x.shape[0] == 1
        and groups == 1
        # A 1x1 kernel on one thread is a plain matrix product, which ATen's kernel does well.
        and (weight.shape[-1] > 1 or weight.shape[-2] > 1)
        and x.shape[1] * x.shape[2] * x.shape[3] <= ATEN_IM2COL_LIMIT
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()  # the compiler picks its own kernels
    )


class _OneDNNConv3d(torch.autograd.Function):
    """A one-sample 3D convolution through oneDNN, forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.settings = (stride, padding, dilation, groups, bias is not None)
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.settings
        # A zero second sample makes ATen choose oneDNN; its input and gradient are zeros, so it adds
        # exact zeros to the weight's and bias's gradients, and its own input gradient is dropped.
        pair = torch.cat([x, torch.zeros_like(x)])
        grads = torch.cat([grad, torch.zeros_like(grad)])
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grads, pair, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
            False, [0, 0, 0], groups, mask,
        )  # fmt: skip
        if grad_x is not None:
            grad_x = grad_x[:1]
        return grad_x, grad_w, grad_b, None, None, None, None

"""The CPU's one-video 3D convolutions run through oneDNN and give F.conv3d's results and gradients."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from cogvideox.models import cpu_conv
from cogvideox.models.vae_blocks import CausalConv3d

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")

SETTINGS = dict(stride=(1, 1, 1), padding=(0, 1, 1), dilation=(1, 1, 1), groups=1)


def kernels(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {event.name for event in prof.events() if "conv" in event.name}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("bias", [True, False])
def test_one_video_runs_on_onednn_with_f_conv3d_results_and_gradients(bias):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 5, 12, 16, requires_grad=True)
    w = (0.1 * torch.randn(6, 8, 3, 3, 3)).requires_grad_()
    b = torch.randn(6, requires_grad=True) if bias else None
    ours = cpu_conv.conv3d(x, w, b, **SETTINGS)
    truth = F.conv3d(x, w, b, **SETTINGS)
    assert relative(ours, truth) < 1e-5
    upstream = torch.randn_like(truth)
    ours_grads = torch.autograd.grad(ours, [x, w] + ([b] if bias else []), upstream)
    truth_grads = torch.autograd.grad(truth, [x, w] + ([b] if bias else []), upstream)
    for a, t in zip(ours_grads, truth_grads):
        assert a.shape == t.shape and relative(a, t) < 1e-5

    used = kernels(lambda: cpu_conv.conv3d(x.detach(), w.detach(), b, **SETTINGS))
    assert "aten::mkldnn_convolution" in used and "aten::slow_conv3d_forward" not in used
    assert "aten::slow_conv3d_forward" in kernels(lambda: F.conv3d(x.detach(), w.detach(), b, **SETTINGS))

    def backward():
        cpu_conv.conv3d(x, w, b, **SETTINGS).sum().backward()

    used = kernels(backward)
    assert "aten::slow_conv3d_forward" not in used and not any("slow_conv3d_backward" in k for k in used)


def test_gradients_only_where_asked():
    """Frozen input (the first layer), frozen weights (a LoRA-style fine-tune): each gradient alone."""
    torch.manual_seed(1)
    x = torch.randn(1, 4, 3, 8, 8)
    w = torch.randn(4, 4, 3, 3, 3, requires_grad=True)
    (grad_w,) = torch.autograd.grad(cpu_conv.conv3d(x, w, None, **SETTINGS).square().sum(), [w])
    (truth,) = torch.autograd.grad(F.conv3d(x, w, None, **SETTINGS).square().sum(), [w])
    assert relative(grad_w, truth) < 1e-5
    x.requires_grad_()
    frozen = w.detach()
    (grad_x,) = torch.autograd.grad(cpu_conv.conv3d(x, frozen, None, **SETTINGS).square().sum(), [x])
    (truth,) = torch.autograd.grad(F.conv3d(x, frozen, None, **SETTINGS).square().sum(), [x])
    assert relative(grad_x, truth) < 1e-5


@pytest.mark.parametrize(
    "case",
    ["batch of two", "float64", "1x1 kernel", "large input", "oneDNN disabled", "ATen's choice asked for"],
)
def test_other_convolutions_are_left_to_aten(case):
    """Where ATen already uses oneDNN, or oneDNN cannot help, the call is F.conv3d's exactly."""
    torch.manual_seed(2)
    x, w = torch.randn(1, 4, 3, 8, 8), torch.randn(4, 4, 3, 3, 3)
    settings = dict(SETTINGS)
    if case == "batch of two":
        x = torch.randn(2, 4, 3, 8, 8)
    elif case == "float64":
        x, w = x.double(), w.double()
    elif case == "1x1 kernel":
        w, settings["padding"] = torch.randn(4, 4, 1, 1, 1), (0, 0, 0)
    elif case == "large input":
        x, w = torch.randn(1, 16, 10, 130, 8), torch.randn(4, 16, 3, 3, 3)  # 16 * 10 * 130 = 20800 > 20480
    aten = cpu_conv.aten_kernels() if case == "ATen's choice asked for" else contextlib.nullcontext()
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = case != "oneDNN disabled"  # (its flags() warns about Intel GPUs' TF32)
    try:
        with aten:
            assert not cpu_conv._im2col_case(x, w, 1)
            assert torch.equal(cpu_conv.conv3d(x, w, None, **settings), F.conv3d(x, w, None, **settings))
    finally:
        torch.backends.mkldnn.enabled = enabled
    assert cpu_conv._im2col_case(torch.randn(1, 4, 3, 8, 8), torch.randn(4, 4, 3, 3, 3), 1)  # restored


def test_causal_conv_chunks_still_match_one_pass():
    """The VAE's causal convolution goes through it: frame chunks with the cache equal one pass."""
    torch.manual_seed(3)
    conv = CausalConv3d(4, 4)
    x = torch.randn(1, 4, 9, 8, 8)
    assert "aten::mkldnn_convolution" in kernels(lambda: conv(x))
    whole = conv(x)
    cache = {}
    chunks = torch.cat([conv(x[:, :, :1], cache), conv(x[:, :, 1:5], cache), conv(x[:, :, 5:], cache)], dim=2)
    assert relative(chunks, whole) < 1e-6

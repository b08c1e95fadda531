"""FP8 attention through FlashAttention-3's FP8 kernel: the e4m3 quantisation per head, the emulation's
error against exact attention (and what smoothing K buys), what the kernel is handed (a stand-in for the
package: the kernel needs a Hopper GPU), the custom op under torch.compile, the backend's errors, and on
a Hopper GPU with a build the real kernel against its emulation."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_fast_flash3 import kernel_available as fa3_available
from test_fast_fuse import inputs, run, tiny_transformer
from test_fast_sage import cast, model_like, rel_l2

from cogvideox import InputError, fast
from cogvideox.batch import lossy_levers
from cogvideox.fast import fp8_attention
from cogvideox.fast.attention import use_attention_backend
from cogvideox.fast.fp8_attention import (
    E4M3,
    fa3_fp8_attend,
    fp8_attention_emulated,
    fp8_core,
    quantize_e4m3_heads,
)
from cogvideox.fast.sage import sage_attention_emulated


def test_each_head_is_scaled_to_the_e4m3_range_and_rounds_to_its_nearest_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 64, generator=g) * torch.tensor([1.0, 30.0, 1e-3])[:, None, None]
    x[1, 2] = 0  # a head of zeros
    x8, scale = quantize_e4m3_heads(x)
    assert x8.dtype == E4M3 and x8.shape == x.shape and scale.shape == (2, 3) and scale.dtype == torch.float32
    top = x8.float().abs().amax(dim=(-2, -1))
    assert torch.equal(top[scale > 1e-30], torch.full_like(top[scale > 1e-30], 448.0))  # max|x| -> 448
    assert torch.equal(x8[1, 2].float(), torch.zeros(50, 64)) and torch.isfinite(scale).all()
    back = x8.float() * scale[..., None, None]
    # e4m3 has 3 mantissa bits: round to nearest is within 2^-4 of the value for normal numbers (>= 2^-6
    # on the scaled axis), within half of 2^-9 (the subnormal step) below that
    scaled = x / scale[..., None, None]
    bound = torch.where(scaled.abs() >= 2**-6, scaled.abs() * 2**-4, torch.full_like(scaled, 2**-10))
    assert ((back - x).abs() / scale[..., None, None] <= bound * (1 + 1e-6)).all()
    # a transposed view (the model's [B, heads, L, d] from [B, L, heads, d]) keeps its memory layout
    view = torch.randn(2, 50, 3, 64, generator=g).transpose(1, 2)
    assert quantize_e4m3_heads(view)[0].transpose(1, 2).is_contiguous()


def test_the_emulation_is_within_its_measured_error_of_exact_attention_and_smoothing_is_why():
    """The error of e4m3 q, k, v (one scale per head) against exact attention, on model-like inputs whose
    keys carry norm_k's per-channel offset: about 5e-2 with K smoothed, three times that without; sage's
    INT8 Q·K^T with per-block scales is 1.2e-2 on the same inputs (BENCHMARKS.md, "FP8 attention")."""
    errors, unsmoothed, sage = [], [], []
    for seed in range(3):
        q, k, v = model_like(seed)
        truth = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        errors.append(rel_l2(fp8_attention_emulated(q, k, v), truth))
        unsmoothed.append(rel_l2(fp8_attention_emulated(q, k, v, smooth=False), truth))
        sage.append(rel_l2(sage_attention_emulated(q, k, v), truth))
    assert max(errors) < 6e-2
    assert min(unsmoothed) > 2 * max(errors)
    assert max(sage) < min(errors)  # the finer INT8 scales of sage are the more accurate


def test_the_softmax_numerators_are_rounded_to_e4m3_after_their_offset():
    """With q, k, v exactly representable (so only P rounds), the emulation differs from exact attention
    by P's rounding alone: small, and not zero."""
    g = torch.Generator().manual_seed(3)
    q8, k8, v8 = ((torch.randn(1, 2, 40, 16, generator=g) * 8).to(E4M3) for _ in range(3))
    ones = torch.ones(1, 2)
    got = fp8_core(q8, k8, v8, ones, ones, ones, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q8.double(), k8.double(), v8.double())
    assert 0 < rel_l2(got, want) < 2e-2


def stand_in(calls):
    """A module like the builds, for their FP8 path: `_flash_attn_forward` on e4m3 [B, L, heads, d] with
    [B, heads] descales, computing the emulation's core on them; it records what it was given."""

    def _flash_attn_forward(q, k, v, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
                            causal=False):  # fmt: skip
        calls.append({"dtypes": [t.dtype for t in (q, k, v)], "shape": tuple(q.shape),
                      "inner": [t.stride(-1) for t in (q, k, v)],
                      "descales": [(tuple(t.shape), t.dtype, t.is_contiguous()) for t in (q_descale, k_descale, v_descale)],
                      "scale": softmax_scale, "causal": causal})  # fmt: skip
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # the core works on [B, heads, L, d]
        out = fp8_core(qh, kh, vh, q_descale, k_descale, v_descale, dtype=torch.bfloat16)
        return out.transpose(1, 2).contiguous(), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    return types.SimpleNamespace(_flash_attn_forward=_flash_attn_forward)


def test_the_kernel_gets_e4m3_views_with_per_head_descales_and_gives_the_emulation(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn_interface", stand_in(calls))
    q, k, v = (t.to(torch.bfloat16) for t in model_like(1, tokens=96, heads=3))
    got = fa3_fp8_attend(q, k, v)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert torch.equal(got, fp8_attention_emulated(q, k, v))  # the same numbers: layouts and scales right
    (call,) = calls
    assert call["dtypes"] == [E4M3] * 3 and call["shape"] == (1, 96, 3, 64) and call["inner"] == [1, 1, 1]
    assert call["descales"] == [((1, 3), torch.float32, True)] * 3
    assert call["scale"] == 0.125 and call["causal"] is False

    # compiled (fullgraph, Inductor): the op stays one opaque call, the smoothing and quantisation compile
    # into kernels around it and quantise the same values as the eager run
    compiled = torch.compile(fa3_fp8_attend, fullgraph=True)
    assert torch.equal(compiled(q, k, v), got)


def test_a_model_with_fp8_attention_stays_close_to_exact(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn_interface", stand_in(calls))
    model = tiny_transformer(attention_head_dim=64).to(torch.bfloat16)
    exact = tiny_transformer(attention_head_dim=64).to(torch.bfloat16)
    emulated = tiny_transformer(attention_head_dim=64).to(torch.bfloat16)
    assert fast.apply(model, fuse_qkv=False, attention="fa3-fp8", device="cuda").describe() == "fa3-fp8 attention"
    use_attention_backend(exact, "math")
    use_attention_backend(emulated, "fa3-fp8-emulated")
    args = cast(inputs(model), torch.bfloat16)
    got, want = run(model, *args), run(exact, *args)
    assert len(calls) == model.config.num_layers
    assert torch.equal(got, run(emulated, *args))  # the backend and the emulated backend: the same numbers
    assert 0 < rel_l2(got, want) < 5e-2


def test_fa3_fp8_is_a_user_error_where_it_cannot_run(monkeypatch):
    with pytest.raises(InputError, match=r"the fa3-fp8 attention backend needs a CUDA GPU \(Hopper.*this run is on cpu"
                                         r".*fa3-fp8-emulated"):  # fmt: skip
        fast.check_options("cpu", attention="fa3-fp8")
    for name in ("flash_attn_interface", "fa3_fwd_interface"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(InputError, match=r"needs FlashAttention-3: pip install 'cogvideox\[fast\]'"):
        fast.check_options("cuda", attention="fa3-fp8")
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", stand_in([]))
    with pytest.raises(InputError, match="returns bf16, for bf16 models; this one is float32"):
        use_attention_backend(tiny_transformer(attention_head_dim=64), "fa3-fp8", device="cuda")
    with pytest.raises(InputError, match="takes heads of 64, 96, 128, 192, 256 channels; this model's have 32"):
        fp8_attention.check_inputs(32, torch.bfloat16)
    assert lossy_levers("fp8", "fa3-fp8") == "fp8, fa3-fp8 attention"


@pytest.mark.skipif(
    not fa3_available(),
    reason="FlashAttention-3's FP8 kernel needs a Hopper GPU and a build (pip install 'cogvideox[fast]')",
)
def test_the_kernel_matches_its_emulation_at_the_5b_head_size():
    q, k, v = (t.to(torch.bfloat16) for t in model_like(0, tokens=1024, heads=4, device="cuda"))
    with torch.no_grad():
        got = fa3_fp8_attend(q, k, v)
    truth = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert rel_l2(got, fp8_attention_emulated(q, k, v)) < 1e-2  # far closer than either is to exact
    assert rel_l2(got, truth) < 6e-2

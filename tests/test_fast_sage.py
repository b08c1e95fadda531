"""8-bit attention (SageAttention's math): its error against exact attention on inputs shaped like the
model's, why K is smoothed, the backend on a tiny transformer, the errors of "sage" where it cannot run, the
custom op under torch.compile (with a stand-in for the package), and on a GPU the real kernel."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_fast_fuse import inputs, run, tiny_transformer

from cogvideox import InputError, fast
from cogvideox.fast import sage
from cogvideox.fast.attention import NAMES, use_attention_backend
from cogvideox.fast.sage import quantize_int8_blocks, sage_attention_emulated, smooth_keys


def model_like(seed=0, tokens=700, heads=2, d=64, offset=5.0, dtype=torch.float32, device="cpu"):
    """q, k, v [1, heads, tokens, d] as the joint attention gets them: q and k out of LayerNorms (norm_q,
    norm_k) with learned-looking weights, related through a shared part so that the attention has
    structure, and norm_k's bias carrying a large per-channel offset (`offset` times a standard normal)
    shared by all tokens, the outlier SageAttention smooths away. 700 tokens: the last blocks are partial."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=g)

    shared = normal(1, heads, tokens, d)
    q = F.layer_norm(shared + normal(1, heads, tokens, d), (d,), 1 + 0.1 * normal(d), 0.1 * normal(d))
    k = F.layer_norm(shared + normal(1, heads, tokens, d), (d,), 1 + 0.1 * normal(d), offset * normal(d))
    v = normal(1, heads, tokens, d)
    return tuple(t.to(device, dtype) for t in (q, k, v))


def cast(args, dtype, device="cpu"):
    """A model's inputs (`inputs(model)`) on `device`, the video and text in `dtype` (RoPE stays fp32)."""
    x, text, t, rope = args
    return x.to(device, dtype), text.to(device, dtype), t.to(device), tuple(r.to(device) for r in rope)


def kernel_available() -> bool:
    try:
        import sageattention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def rel_l2(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def exact(q, k, v):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double())


def test_int8_blocks_scale_and_round_as_the_kernel_does():
    x = torch.zeros(1, 1, 130, 2)
    x[0, 0, 0] = torch.tensor([127.0, -2.5])  # block 0's maximum: scale exactly 1
    x[0, 0, 1] = torch.tensor([2.5, 0.49])
    x[0, 0, 128] = torch.tensor([-0.5, 0.25])  # block 1: tokens 128-129 only, scale 0.5 / 127
    q, scale = quantize_int8_blocks(x, 128)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (1, 1, 2)
    assert scale[0, 0, 0] == 1 and torch.isclose(scale[0, 0, 1], torch.tensor(0.5 / 127))
    assert q[0, 0, 0].tolist() == [127, -3] and q[0, 0, 1].tolist() == [3, 0]  # halves away from zero
    assert q[0, 0, 128].tolist() == [-127, 64]  # 0.25 / (0.5/127) = 63.5 -> 64
    assert q[0, 0, 2:128].abs().sum() == 0
    restored = q.float() * sage.expand_blocks(scale, 128, 130)[..., None]
    assert ((restored - x).abs() <= sage.expand_blocks(scale, 128, 130)[..., None] / 2 + 1e-7).all()


def test_smoothing_k_leaves_softmax_attention_unchanged():
    q, k, v = model_like(offset=5.0)
    smoothed = smooth_keys(k)
    assert smoothed.mean(dim=-2).abs().max() < 1e-5 and (k - smoothed).abs().min() > 1e-3  # the offset went
    assert rel_l2(F.scaled_dot_product_attention(q, smoothed, v), exact(q, k, v)) < 1e-5  # fp32 rounding only


def test_emulated_error_is_small_with_smoothing_and_not_without():
    # Measured (seeds 0-2): 1.2-1.3e-2 with smoothing, 3.5-3.9e-2 without. Not ~0 either: the quantisation ran.
    for seed in range(3):
        q, k, v = model_like(seed, offset=5.0)
        want = exact(q, k, v)
        smoothed = rel_l2(sage_attention_emulated(q, k, v), want)
        raw = rel_l2(sage_attention_emulated(q, k, v, smooth=False), want)
        assert 1e-3 < smoothed < 2e-2, (seed, smoothed)
        assert raw > 2.5 * smoothed, (seed, raw, smoothed)


def test_emulated_bf16_inputs_and_chunked_queries(monkeypatch):
    # bf16 in, bf16 out (the kernel's case), no further from exact than the fp32 case; the query chunks
    # that bound the emulation's memory change nothing.
    q, k, v = model_like(1, dtype=torch.bfloat16)
    whole = sage_attention_emulated(q, k, v)
    assert whole.dtype == torch.bfloat16 and rel_l2(whole, exact(q, k, v)) < 2e-2
    monkeypatch.setattr(sage, "MAX_SCORES", 2 * 700 * 100)  # 100 queries at a time, across the Q blocks
    assert torch.equal(sage_attention_emulated(q, k, v), whole)


def test_sage_emulated_backend_on_a_tiny_transformer():
    # Heads of 16 channels here (the emulation takes any size). Measured: 3.9e-4 of the output.
    want_model, model = tiny_transformer(), tiny_transformer()
    record = fast.apply(model, fuse_qkv=False, attention="sage-emulated")
    assert record.describe() == "sage-emulated attention"
    args = inputs(model)
    error = rel_l2(run(model, *args), run(want_model, *args))
    assert 1e-5 < error < 2e-3, error


def test_sage_is_a_user_error_where_it_cannot_run(monkeypatch):
    with pytest.raises(InputError, match="the sage attention backend needs a CUDA GPU .*this run is on cpu"):
        fast.check_options("cpu", attention="sage")
    with pytest.raises(InputError, match="unknown attention backend 'sage3'; use one of .*sage, sage-emulated"):
        fast.check_options("cpu", attention="sage3")
    monkeypatch.setitem(sys.modules, "sageattention", None)  # as where it is not installed
    with pytest.raises(InputError, match=r"needs the sageattention package: pip install 'cogvideox\[fast\]'"):
        fast.check_options("cuda", attention="sage")
    without_triton = types.ModuleType("sageattention")  # installed, on a PyTorch without Triton

    def first_import(name):
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    without_triton.__getattr__ = first_import
    monkeypatch.setitem(sys.modules, "sageattention", without_triton)
    with pytest.raises(InputError, match=r"could not import the sageattention package \(No module named 'triton'\)"):
        fast.check_options("cuda", attention="sage")

    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=None))
    fast.check_options("cuda", attention="sage")  # on a GPU with the package, fine before loading
    with pytest.raises(InputError, match="takes heads of 64 or 128 channels; this model's have 16"):
        use_attention_backend(tiny_transformer(), "sage", device="cuda")
    with pytest.raises(InputError, match="runs bf16 or fp16 models; this one is float32"):
        use_attention_backend(tiny_transformer(attention_head_dim=64), "sage", device="cuda")
    with pytest.raises(InputError, match="runs bf16 or fp16 models; this one is float32"):
        sage.sage_attention(*model_like(tokens=8))  # called directly, too


def test_sage_op_calls_the_package_and_stays_one_op_under_compile(monkeypatch):
    # A stand-in for the package (the kernel itself needs a GPU) that computes the emulation on the keys it
    # is given: the model's K must arrive smoothed, with smoothing off in the package, and a fullgraph
    # compilation must trace the custom op through its fake implementation, without a graph break.
    calls = []

    def sageattn(q, k, v, tensor_layout, is_causal, smooth_k):
        calls.append((tensor_layout, is_causal, smooth_k, k.mean(dim=-2).abs().max().item()))
        return sage_attention_emulated(q, k, v, smooth=False)

    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    model = tiny_transformer(attention_head_dim=64).to(torch.bfloat16)
    emulated = tiny_transformer(attention_head_dim=64).to(torch.bfloat16)
    use_attention_backend(model, "sage", device="cuda")
    use_attention_backend(emulated, "sage-emulated")
    args = cast(inputs(model), torch.bfloat16)
    assert torch.equal(run(model, *args), run(emulated, *args))
    assert len(calls) == 2 and all(c[:3] == ("HND", False, False) and c[3] < 0.05 for c in calls)

    attn, rope = model.transformer_blocks[0].attn1, args[3]  # the layer whose output shape the fake must give
    x = torch.randn(1, 16 + rope[0].shape[0], attn.to_out[0].in_features, dtype=torch.bfloat16)
    with torch.no_grad():  # inference only: the kernel has no backward
        for layer in (attn, emulated.transformer_blocks[0].attn1):  # the emulation is an opaque op too
            compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
            assert torch.equal(compiled(x, 16, rope), layer(x, 16, rope))


def test_every_cli_attention_choice_is_a_backend():
    from cogvideox.cli import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    (action,) = [a for a in generate._actions if "--attention" in a.option_strings]
    assert "sage" in action.choices and set(action.choices) <= set(NAMES)


@pytest.mark.skipif(
    not kernel_available(),
    reason="the sageattention kernel needs a CUDA GPU and the package (pip install 'cogvideox[fast]')",
)
def test_the_kernel_computes_what_the_emulation_does():
    q, k, v = model_like(0, tokens=4000, heads=4, dtype=torch.bfloat16, device="cuda")
    want = exact(q, k, v)
    kernel = sage.sage_attention(q, smooth_keys(k), v)
    emulated = sage_attention_emulated(q, k, v)
    assert kernel.dtype == torch.bfloat16 and kernel.shape == q.shape
    error = rel_l2(emulated, want)
    assert rel_l2(kernel, want) < 2e-2
    # The same quantised numbers, up to the exp2 and fp16 accumulation order: far closer to each other than
    # either is to exact attention.
    assert rel_l2(kernel, emulated) < 0.25 * error, (rel_l2(kernel, emulated), error)

    # In a compiled bf16 model: the opaque op, the same output as eager.
    model = tiny_transformer(attention_head_dim=64).to("cuda", torch.bfloat16)
    fast.apply(model, attention="sage", compile=True)
    args = cast(inputs(model), torch.bfloat16, "cuda")
    eager = tiny_transformer(attention_head_dim=64).to("cuda", torch.bfloat16)
    fast.apply(eager, attention="sage")
    assert rel_l2(run(model, *args), run(eager, *args)) < 1e-2

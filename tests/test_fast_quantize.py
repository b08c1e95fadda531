"""int8 weight-only and fp8 linears: the quantisation math with stated error bounds, the layers inside a
tiny transformer against the exact fp32 model, weight memory, and the fp8 device rules.

fp8 runs through `torch._scaled_mm` on GPUs of compute capability 8.9+; on the CPU the same math runs in
its plain-PyTorch emulation (`emulate=True`), which is what these tests check.
"""

import pytest
import torch
import torch.nn.functional as F
from test_fast_fuse import inputs, run, tiny_transformer

from cogvideox import InputError
from cogvideox.fast.fuse import fuse_qkv
from cogvideox.fast.quantize import (
    FP8_MAX,
    Fp8Linear,
    Int8WeightOnlyLinear,
    dequantize_rows,
    fp8_linear_emulated,
    fp8_linear_scaled_mm,
    fp8_supported,
    quantize,
    quantize_fp8_rows,
    quantize_int8_rows,
)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weights_and_activations(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 256, generator=g) * torch.rand(96, 1, generator=g)  # rows of different ranges
    x = torch.randn(40, 256, generator=g)
    return w, x


def test_int8_rows_round_to_nearest_within_half_a_step():
    w, x = weights_and_activations()
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    assert torch.equal(q.abs().amax(dim=1), torch.full((96,), 127, dtype=torch.int8))  # full range per row
    error = (dequantize_rows(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all()
    # the product's relative L2 error, about the rounding noise of 7 bits: < 1e-2
    assert rel_l2(F.linear(x, dequantize_rows(q, scale)), x @ w.T) < 1e-2


def test_fp8_rows_keep_the_row_maximum_and_three_mantissa_bits():
    w, x = weights_and_activations()
    q, scale = quantize_fp8_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (96,)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((96,), FP8_MAX))
    error = (dequantize_rows(q, scale) - w).abs()
    # e4m3 round to nearest: relative error <= 2^-4 for normal values, absolute <= 2^-10 (half the
    # subnormal step 2^-9) in scaled units below the smallest normal 2^-6
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10) * (1 + 1e-6)
    assert (error <= bound).all()
    assert rel_l2(dequantize_rows(q, scale), w) < 4e-2


def test_fp8_row_scales_isolate_an_outlier_token():
    _, x = weights_and_activations()
    x[3] *= 1000  # one huge token: its own scale, the others keep their resolution
    q, scale = quantize_fp8_rows(x)
    others = torch.cat([x[:3], x[4:]])
    dq = dequantize_rows(torch.cat([q[:3], q[4:]]), torch.cat([scale[:3], scale[4:]]))
    assert rel_l2(dq, others) < 4e-2


def test_fp8_emulated_linear_matches_its_definition():
    w, x = weights_and_activations()
    qw, sw = quantize_fp8_rows(w)
    bias = torch.randn(96)
    got = fp8_linear_emulated(x, qw, sw, bias)
    qx, sx = quantize_fp8_rows(x)
    want = (qx.float() * sx[:, None]) @ (qw.float() * sw[:, None]).T + bias
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert rel_l2(got - bias, x @ w.T) < 5e-2  # both operands in e4m3: a few percent


@pytest.mark.parametrize("kind, bound", [("int8", 1e-2), ("fp8", 5e-2)])
def test_quantised_transformer_stays_close_to_exact(kind, bound):
    exact = tiny_transformer(num_attention_heads=4, attention_head_dim=32)
    model = tiny_transformer(num_attention_heads=4, attention_head_dim=32)
    fuse_qkv(model)  # the fused projection is quantised like any other linear
    replaced = quantize(model, kind, emulate=True)
    # per block: fused qkv, out, ff in and out; int8 also the two AdaLN modulation linears
    assert replaced == exact.config.num_layers * (6 if kind == "int8" else 4)
    layer = Int8WeightOnlyLinear if kind == "int8" else Fp8Linear
    assert isinstance(model.transformer_blocks[0].attn1.to_qkv, layer)
    assert type(model.proj_out) is torch.nn.Linear  # outside the blocks: kept exact
    args = inputs(exact)
    error = rel_l2(run(model, *args), run(exact, *args))
    assert 0 < error < bound


def test_int8_weights_take_a_quarter_of_fp32():
    # every linear reads at least 128 features (the AdaLN ones read the timestep embedding)
    model = tiny_transformer(num_attention_heads=4, attention_head_dim=32, time_embed_dim=128)
    linears = [m for m in model.transformer_blocks.modules() if type(m) is torch.nn.Linear]
    before = sum(m.weight.nbytes for m in linears)
    quantize(model, "int8")
    layers = [m for m in model.transformer_blocks.modules() if isinstance(m, Int8WeightOnlyLinear)]
    after = sum(m.weight.nbytes + m.scale.nbytes for m in layers)
    # 1 byte per weight plus one 4-byte scale per row of at least 128 weights: <= 1/4 + 1/128
    assert len(layers) == len(linears)
    assert 0.25 < after / before <= 0.25 + 1 / 128


def test_fp8_needs_a_capable_gpu():
    model = tiny_transformer()
    with pytest.raises(InputError, match="compute capability 8.9"):
        quantize(model, "fp8")
    with pytest.raises(InputError, match="unknown quantisation 'int4'"):
        quantize(model, "int4")
    assert not fp8_supported("cpu")


@pytest.mark.skipif(not fp8_supported("cuda"), reason="fp8 tensor cores need a CUDA GPU of capability 8.9+")
def test_scaled_mm_matches_the_emulation_on_gpu():
    w, x = weights_and_activations()
    w, x = w.cuda(), x.cuda().to(torch.bfloat16)
    qw, sw = quantize_fp8_rows(w)
    got = fp8_linear_scaled_mm(x, qw, sw)
    want = fp8_linear_emulated(x, qw, sw)
    assert got.dtype == torch.bfloat16
    assert rel_l2(got.float(), want.float()) < 1e-2  # same products, bf16 output rounding


def test_fp8_activation_rows_make_no_full_size_fp32_copies():
    """The per-token quantisation of a bf16 activation runs on every fp8 linear call; uncompiled, each
    full-size fp32 intermediate is a pass over the activations (~0.4 GB per linear in a 5B block). The
    same numbers as the fp32 definition, with one fp32 buffer (the quotient, clamped in place)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 50, 64, generator=g) * torch.rand(2, 50, 1, generator=g) * 8).to(torch.bfloat16)
    x[0, 3] = 0  # an all-zero row: the clamped scale

    class FullSizeFp32(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() == x.numel():
                    self.storages.add(t.untyped_storage().data_ptr())
            return out

    with FullSizeFp32() as mode:
        q, scale = quantize_fp8_rows(x)
    assert len(mode.storages) == 1
    want_scale = x.float().abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    want_q = (x.float() / want_scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def test_the_text_encoder_in_int8_stays_close_and_keeps_its_fp32_layers(tiny_rope_dir):
    """`quantize_text="int8"`: T5's block linears become int8 weight-only (half of bf16), the text states
    move by rounding only; in fp16 the layers transformers keeps in fp32 (T5's `wo`) stay as they are."""
    from cogvideox import Pipeline
    from cogvideox.fast.quantize import Int8WeightOnlyLinear, quantize_text_encoder
    from cogvideox.text import load_t5

    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    prompts = ["a cat sits on the mat", "a dog runs in the park"]
    exact = pipe.encode_prompts(prompts, 16, 1)
    pipe.accelerate(quantize_text="int8", fuse_qkv=False, attention=None)
    quantized = [m for m in pipe.text_encoder.model.modules() if isinstance(m, Int8WeightOnlyLinear)]
    assert len(quantized) == 2 * (4 + 3)  # two blocks: q, k, v, o and wi_0, wi_1, wo
    states = pipe.encode_prompts(prompts, 16, 1)
    error = ((states - exact).norm() / exact.norm()).item()
    assert 0 < error < 2e-2, error
    assert pipe.acceleration.describe() == "int8 T5"

    half = load_t5(tiny_rope_dir / "text_encoder", torch.float16, torch.device("cpu"))
    kept = {name for name, m in half.named_modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32}
    assert kept and all(name.endswith("wo") for name in kept)
    assert quantize_text_encoder(half) == 2 * (4 + 3) - len(kept)
    assert {name for name, m in half.named_modules() if type(m) is torch.nn.Linear} == kept


def test_an_unknown_text_quantisation_leaves_the_pipeline_untouched(tiny_rope_dir):
    from cogvideox import Pipeline

    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    with pytest.raises(InputError, match="the text encoder is quantised to int8 \\(weight-only\\) only, not 'fp8'"):
        pipe.accelerate(quantize="int8", quantize_text="fp8")
    assert pipe.acceleration is None

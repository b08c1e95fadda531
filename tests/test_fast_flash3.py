"""FlashAttention-3 as an attention backend: the errors of "fa3" where it cannot run, the layouts the
kernel is handed and gives back (with a stand-in for the package: the kernel itself needs a Hopper GPU),
the custom op under torch.compile, and on a GPU with a build installed the real kernel."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_fast_fuse import inputs, run, tiny_transformer
from test_fast_sage import cast, rel_l2

from cogvideox import InputError, fast
from cogvideox.fast import flash3
from cogvideox.fast.attention import use_attention_backend


class BrokenBuild:
    """A meta-path finder under which importing `name` fails as an installed build whose CUDA library is
    missing does."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise ImportError("libcudart.so.13: cannot open shared object file", name="fa3_fwd._C")
        return None


def stand_in(calls):
    """A module like the builds: `_flash_attn_forward` on [B, L, heads, d], exact attention by SDPA's math,
    returning (out, lse) with out freshly allocated as [B, L, heads, d]; it records what it was given."""

    def _flash_attn_forward(q, k, v, softmax_scale=None, causal=False):
        calls.append({"shape": tuple(q.shape), "strides": [t.stride(-1) for t in (q, k, v)],
                      "views": [t._base is not None for t in (q, k, v)], "scale": softmax_scale, "causal": causal})  # fmt: skip
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 scale=softmax_scale)  # fmt: skip
        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])
        return out.transpose(1, 2).contiguous(), lse

    return types.SimpleNamespace(_flash_attn_forward=_flash_attn_forward)


def no_build(monkeypatch):
    for name in flash3.MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # as where it is not installed


def test_fa3_is_a_user_error_where_it_cannot_run(monkeypatch):
    with pytest.raises(InputError, match="the fa3 attention backend needs a CUDA GPU .*this run is on cpu"):
        fast.check_options("cpu", attention="fa3")
    no_build(monkeypatch)
    with pytest.raises(InputError, match=r"needs FlashAttention-3: pip install 'cogvideox\[fast\]'"):
        fast.check_options("cuda", attention="fa3")
    monkeypatch.delitem(sys.modules, "fa3_fwd_interface")
    monkeypatch.setattr(sys, "meta_path", [BrokenBuild("fa3_fwd_interface"), *sys.meta_path])
    with pytest.raises(InputError, match=r"found FlashAttention-3 but could not load it \(fa3_fwd_interface: "
                                         r"libcudart.so.13: cannot open"):  # fmt: skip
        fast.check_options("cuda", attention="fa3")

    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", stand_in([]))
    fast.check_options("cuda", attention="fa3")  # on a GPU with a build, fine before loading
    with pytest.raises(InputError, match="runs bf16 .*models; this one is float32"):
        use_attention_backend(tiny_transformer(), "fa3", device="cuda")
    with pytest.raises(InputError, match="takes heads of at most 256 channels, a multiple of 8; this model's have 20"):
        flash3.check_inputs(20, torch.bfloat16)
    with pytest.raises(InputError, match="runs bf16 .*models; this one is float32"):
        flash3.fa3_attention(*(torch.zeros(1, 8, 2, 64) for _ in range(3)))  # called directly, too
    with pytest.raises(InputError, match="the fa3 attention backend's fa3-fwd wheel has no fp16 kernels"):
        use_attention_backend(tiny_transformer(attention_head_dim=64).half(), "fa3", device="cuda")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", stand_in([]))  # a source build has them
    use_attention_backend(tiny_transformer(attention_head_dim=64).half(), "fa3", device="cuda")


def test_fa3_gets_transposed_views_and_gives_the_sdpa_attention(monkeypatch):
    # The stand-in computes exact attention, so the model must give what the math backend gives: the
    # transposes in and out must put every head and token back where it was. No copies on the way in (the
    # kernel reads strided views whose channels are contiguous), the scale 1/sqrt(d), no causal mask.
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn_interface", stand_in(calls))  # the source build comes first
    model = tiny_transformer(attention_head_dim=64).to(torch.bfloat16)
    exact = tiny_transformer(attention_head_dim=64).to(torch.bfloat16)
    assert fast.apply(model, fuse_qkv=False, attention="fa3", device="cuda").describe() == "fa3 attention"
    use_attention_backend(exact, "math")
    args = cast(inputs(model), torch.bfloat16)
    assert torch.equal(run(model, *args), run(exact, *args))
    heads, tokens = model.config.num_attention_heads, 16 + args[3][0].shape[0]
    assert len(calls) == model.config.num_layers
    assert all(c["shape"] == (2, tokens, heads, 64) and c["strides"] == [1, 1, 1] for c in calls)
    assert all(c["views"] == [True, True, True] and c["scale"] == 0.125 and c["causal"] is False for c in calls)

    attn, rope = model.transformer_blocks[0].attn1, args[3]  # the layer whose output the fake must shape
    x = torch.randn(1, 16 + rope[0].shape[0], attn.to_out[0].in_features, dtype=torch.bfloat16)
    with torch.no_grad():  # inference only: the op has no backward
        compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x, 16, rope), attn(x, 16, rope))


def test_auto_runs_fa3_for_inference_on_hopper_and_sdpa_elsewhere(monkeypatch):
    from cogvideox.fast import attention as attention_module

    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn_interface", stand_in(calls))
    monkeypatch.setattr(attention_module, "_is_hopper", lambda device: True)  # as on an H100 or H200
    model = tiny_transformer(attention_head_dim=64).to(torch.bfloat16)
    exact = tiny_transformer(attention_head_dim=64).to(torch.bfloat16)
    record = fast.apply(model, fuse_qkv=False, device="cuda")  # attention="auto", the default
    assert record.attention == "auto" and record.describe() == "auto attention (fa3)"
    use_attention_backend(exact, "math")
    args = cast(inputs(model), torch.bfloat16)
    assert torch.equal(run(model, *args), run(exact, *args)) and len(calls) == model.config.num_layers
    # where autograd records (the kernel has no backward), SDPA's backends: gradients flow, no kernel call
    calls.clear()
    x = args[0].clone().requires_grad_()
    model(x, *args[1:3], image_rotary_emb=args[3]).float().square().sum().backward()
    assert not calls and x.grad is not None and x.grad.abs().sum() > 0

    # not on the CPU, not on another GPU, not without a build, not for a model the kernel does not take
    assert attention_module.auto_kernel(model, "cpu") == "sdpa"
    assert attention_module.auto_kernel(tiny_transformer(attention_head_dim=64), "cuda") == "sdpa"  # fp32
    monkeypatch.setattr(attention_module, "_is_hopper", lambda device: False)
    assert attention_module.auto_kernel(model, "cuda") == "sdpa"
    monkeypatch.setattr(attention_module, "_is_hopper", lambda device: True)
    no_build(monkeypatch)
    other = tiny_transformer(attention_head_dim=64).to(torch.bfloat16)
    assert fast.apply(other, fuse_qkv=False, device="cuda").describe() == "auto attention"


def kernel_available() -> bool:
    try:
        flash3.load_kernel()
    except InputError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(
    not kernel_available(),
    reason="FlashAttention-3 needs a Hopper GPU and a build (pip install 'cogvideox[fast]': the fa3-fwd wheel)",
)
def test_the_kernel_matches_sdpa_at_the_5b_head_size():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    got = flash3.fa3_attend(q, k, v)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert rel_l2(got, want) < 1.5 * rel_l2(sdpa, want) + 1e-4  # bf16 rounding of the output, as SDPA's

    model = tiny_transformer(attention_head_dim=64).to("cuda", torch.bfloat16)
    fast.apply(model, attention="fa3", compile=True)
    eager = tiny_transformer(attention_head_dim=64).to("cuda", torch.bfloat16)
    fast.apply(eager, attention="cudnn")
    args = cast(inputs(model), torch.bfloat16, "cuda")
    assert rel_l2(run(model, *args), run(eager, *args)) < 1e-2

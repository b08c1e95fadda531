"""Fused QKV: the same outputs as the three separate projections, and checkpoints in the official layout."""

import pytest
import torch
from helpers import tiny_transformer_kwargs

from cogvideox import weights
from cogvideox.fast.fuse import fuse_qkv
from cogvideox.models.config import TransformerConfig
from cogvideox.models.transformer import CogVideoXTransformer


def tiny_transformer(variant="rope", seed=0, **changes):
    config = TransformerConfig.from_dict(tiny_transformer_kwargs(variant) | changes)
    torch.manual_seed(seed)
    model = CogVideoXTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero biases or unit norms: a swapped tensor must show
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(model, batch=2, seed=1):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, c.in_channels, 8, 12, generator=g)
    text = torch.randn(batch, c.max_text_seq_length, c.text_embed_dim, generator=g)
    t = torch.tensor([700, 300][:batch])
    return x, text, t, model.rotary_embedding(3, 8, 12)


def run(model, x, text, t, rope):
    with torch.no_grad():
        return model(x, text, t, image_rotary_emb=rope)


@pytest.mark.parametrize("variant", ["rope", "sincos"])
def test_fused_equals_separate_projections(variant):
    exact = tiny_transformer(variant)
    fused = tiny_transformer(variant)
    assert fuse_qkv(fused) == exact.config.num_layers
    args = inputs(exact)
    want, got = run(exact, *args), run(fused, *args)
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()
    attn = fused.transformer_blocks[0].attn1
    assert not hasattr(attn, "to_q") and attn.to_qkv.weight.shape == (3 * 32, 32)
    # the separate weights are gone: one copy of the QKV weights, not two
    n_exact = sum(p.numel() for p in exact.parameters())
    assert sum(p.numel() for p in fused.parameters()) == n_exact


def test_state_dict_keeps_the_official_layout():
    exact = tiny_transformer()
    fused = tiny_transformer()
    fuse_qkv(fused)
    want, got = exact.state_dict(), fused.state_dict()
    assert list(sorted(got)) == list(sorted(want))
    assert "transformer_blocks.1.attn1.to_k.bias" in got
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_an_official_checkpoint_loads_into_a_fused_model_and_back(tmp_path):
    source = tiny_transformer(seed=3)
    fused = tiny_transformer(seed=4)  # other weights, replaced by the load
    fuse_qkv(fused)
    fused.load_state_dict(source.state_dict(), strict=True)
    args = inputs(source)
    assert torch.allclose(run(fused, *args), run(source, *args), rtol=0, atol=1e-6)

    # saved as safetensors in the official layout, read back by an unfused model
    weights.save_weights(fused, tmp_path)
    with torch.device("meta"):
        plain = CogVideoXTransformer(source.config)
    weights.load_weights(plain, sorted(tmp_path.glob("*.safetensors")), torch.float32, torch.device("cpu"), "transformer")
    assert torch.equal(run(plain.eval(), *args), run(source, *args))


def test_fusing_twice_is_a_no_op():
    model = tiny_transformer()
    fuse_qkv(model)
    weight = model.transformer_blocks[0].attn1.to_qkv.weight
    fuse_qkv(model)
    assert model.transformer_blocks[0].attn1.to_qkv.weight is weight

"""Growing a trained transformer deeper keeps its function and lets the new blocks learn."""

import pytest
import torch
from helpers import tiny_transformer_kwargs

from cogvideox.models.config import TransformerConfig
from cogvideox.models.transformer import CogVideoXTransformer
from cogvideox.train.grow import grow_depth, old_block_positions


def models(old_layers: int, new_layers: int):
    kwargs = tiny_transformer_kwargs("rope")
    torch.manual_seed(0)
    small = CogVideoXTransformer(TransformerConfig(**{**kwargs, "num_layers": old_layers}))
    for p in small.parameters():  # trained-looking weights: no zero gates anywhere
        torch.nn.init.normal_(p, std=0.2)
    torch.manual_seed(1)
    big = CogVideoXTransformer(TransformerConfig(**{**kwargs, "num_layers": new_layers}))
    return small, big


def inputs(model: CogVideoXTransformer):
    g = torch.Generator().manual_seed(3)
    c = model.config
    x = torch.randn(2, 3, c.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 16, c.text_embed_dim, generator=g)
    rope = model.rotary_embedding(3, 8, 8, "cpu")
    return x, text, torch.tensor([999.0, 250.0]), rope


def test_old_blocks_are_spread_evenly():
    assert old_block_positions(6, 9) == [0, 1, 3, 4, 6, 7]
    assert old_block_positions(6, 10) == [0, 1, 3, 5, 6, 8]
    assert old_block_positions(2, 2) == [0, 1]
    with pytest.raises(ValueError, match="grow from 4 to 3"):
        old_block_positions(4, 3)


def test_grown_model_computes_what_the_small_one_did():
    small, big = models(2, 5)
    fresh = grow_depth(big, small.state_dict())
    assert fresh == [1, 3, 4]
    x, text, t, rope = inputs(small)
    with torch.no_grad():
        want = small(x, text, t, image_rotary_emb=rope)
        got = big(x, text, t, image_rotary_emb=rope)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the old blocks' weights moved unchanged; the new ones keep their random attention weights
    torch.testing.assert_close(big.transformer_blocks[2].attn1.to_q.weight, small.transformer_blocks[1].attn1.to_q.weight)
    assert big.transformer_blocks[1].attn1.to_q.weight.abs().sum() > 0


def test_new_blocks_open_their_gates_under_training():
    small, big = models(2, 3)
    grow_depth(big, small.state_dict())
    x, text, t, rope = inputs(small)
    loss = big(x, text, t, image_rotary_emb=rope).square().mean()
    loss.backward()
    gate_rows = big.transformer_blocks[2].norm1.linear.weight.grad.chunk(6)[2]
    assert gate_rows.abs().sum() > 0  # the zeroed gate gets a gradient, so the block can start working


def test_mismatched_configs_are_refused():
    small, _ = models(2, 3)
    kwargs = {**tiny_transformer_kwargs("rope"), "num_layers": 3, "attention_head_dim": 8}
    wider = CogVideoXTransformer(TransformerConfig(**kwargs))
    with pytest.raises(RuntimeError, match="size mismatch"):
        grow_depth(wider, small.state_dict())

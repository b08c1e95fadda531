"""The expert transformer against diffusers' CogVideoXTransformer3DModel with identical random weights."""

import dataclasses
import weakref
from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

import cogvideox.models.host_saves as host_saves
import cogvideox.models.transformer as transformer_module
from cogvideox.models.config import TransformerConfig
from cogvideox.models.transformer import TRANSFORMER_PRESETS, CogVideoXTransformer
from cogvideox.train import lora

# Tiny versions of the released variants: D = 2 heads x 16, latent grid 8x12 (4x6 patches), 3 latent
# frames (sample_frames is in pixel frames: 9 -> 3), 7 text tokens.
TINY = dict(
    num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=24, time_embed_dim=16,
    sample_height=8, sample_width=12, sample_frames=9, max_text_seq_length=7,
)
VARIANTS = {
    "2b": TransformerConfig(**TINY),
    "5b": TransformerConfig(**TINY, use_rotary_positional_embeddings=True),
    "5b-i2v": TransformerConfig(
        **TINY, in_channels=32, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True
    ),
    "1.5": TransformerConfig(**TINY, patch_size_t=2, patch_bias=False, use_rotary_positional_embeddings=True),
    "1.5-i2v": TransformerConfig(
        **TINY, patch_size_t=2, patch_bias=False, in_channels=32, ofs_embed_dim=16,
        use_rotary_positional_embeddings=True,
    ),
}


def reference_kwargs(config: TransformerConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "extra"}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every weight and saved buffer, so no default init (ones, zeros) hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.ndim >= 2 and name != "patch_embed.pos_embedding":
                std = (t[0].numel()) ** -0.5
                t.copy_(torch.randn(t.shape, generator=g) * std)
            elif name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))


def build_pair(config: TransformerConfig, seed: int = 0):
    torch.manual_seed(seed)
    theirs = CogVideoXTransformer3DModel(**reference_kwargs(config)).eval()
    randomize_(theirs, seed)
    ours = CogVideoXTransformer(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def inputs(config: TransformerConfig, frames: int = 3, height: int = 8, width: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, frames, config.in_channels, height, width, generator=g)
    text = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=g)
    t = torch.tensor([999, 37])
    return x, text, t


def pipeline_rope(config: TransformerConfig, latent_frames: int, latent_h: int, latent_w: int):
    """The reference pipeline's own RoPE helper, called on a stand-in for the pipeline object."""
    fake = SimpleNamespace(vae_scale_factor_spatial=8, transformer=SimpleNamespace(config=config))
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        fake, latent_h * 8, latent_w * 8, latent_frames, torch.device("cpu")
    )


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def run_both(ours, theirs, config, x, text, t, ofs=None):
    rope = ours.rotary_embedding(x.shape[1], x.shape[3], x.shape[4], x.device)
    with torch.no_grad():
        out = ours(x, text, t, ofs=ofs, image_rotary_emb=rope)
        expected = theirs(x, text, t, ofs=ofs, image_rotary_emb=rope, return_dict=False)[0]
    return out, expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(variant):
    config = VARIANTS[variant]
    ours, theirs = build_pair(config)
    frames = 4 if config.patch_size_t else 3
    x, text, t = inputs(config, frames=frames)
    ofs = torch.full((1,), 2.0) if config.ofs_embed_dim else None
    out, expected = run_both(ours, theirs, config, x, text, t, ofs)
    assert out.shape == (2, frames, config.latent_channels, 8, 12)
    assert expected.abs().mean() > 0.1  # a real signal, not a collapsed output
    assert rel_l2(out, expected) <= 1e-5


@pytest.mark.parametrize("variant, frames, hw", [
    ("5b", 3, (8, 12)),  # native: integer grid
    ("5b", 5, (12, 12)),  # other aspect ratio: squeezed into the 4x6 base grid, fractional positions
    ("5b", 2, (6, 14)),
    ("1.5", 4, (8, 12)),  # slice grid, native
    ("1.5", 5, (6, 8)),  # slice grid, smaller; odd frame count gives ceil(5/2) temporal positions
])
def test_rotary_embedding_matches_pipeline(variant, frames, hw):
    config = VARIANTS[variant]
    with torch.device("meta"):
        model = CogVideoXTransformer(config)
    cos, sin = model.rotary_embedding(frames, *hw, device="cpu")
    ref_cos, ref_sin = pipeline_rope(config, frames, *hw)
    assert cos.dtype == torch.float32 and cos.shape == ref_cos.shape
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)


def test_rotary_embedding_is_none_without_rope():
    assert CogVideoXTransformer(VARIANTS["2b"]).rotary_embedding(3, 8, 12, "cpu") is None


def test_5b_forward_at_non_native_resolution():
    config = VARIANTS["5b"]
    ours, theirs = build_pair(config)
    x, text, t = inputs(config, frames=2, height=12, width=12)
    out, expected = run_both(ours, theirs, config, x, text, t)
    assert rel_l2(out, expected) <= 1e-5


@pytest.mark.parametrize("frames, hw", [(2, (6, 8)), (3, (12, 8)), (4, (8, 12))])
def test_2b_recomputes_sincos_table_for_other_grids(frames, hw):
    config = VARIANTS["2b"]
    ours, theirs = build_pair(config)
    assert "patch_embed.pos_embedding" not in ours.state_dict()
    x, text, t = inputs(config, frames, *hw)
    out, expected = run_both(ours, theirs, config, x, text, t)
    assert out.shape == (2, frames, 16, *hw)
    assert rel_l2(out, expected) <= 1e-5


def test_i2v_other_frame_count_swaps_learned_table_for_sincos():
    config = VARIANTS["5b-i2v"]
    ours, theirs = build_pair(config)
    x, text, t = inputs(config, frames=2)
    out, expected = run_both(ours, theirs, config, x, text, t)
    assert rel_l2(out, expected) <= 1e-5
    # The learned table is really bypassed: changing it does not change the output.
    with torch.no_grad():
        ours.patch_embed.pos_embedding.mul_(3.0)
    out2, _ = run_both(ours, theirs, config, x, text, t)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_i2v_other_resolution_is_an_error_like_the_reference():
    config = VARIANTS["5b-i2v"]
    ours, theirs = build_pair(config)
    x, text, t = inputs(config, frames=3, height=12, width=12)
    with pytest.raises(ValueError, match="learned positional table"):
        ours(x, text, t, image_rotary_emb=ours.rotary_embedding(3, 12, 12, "cpu"))
    with pytest.raises(ValueError):
        theirs(x, text, t, image_rotary_emb=ours.rotary_embedding(3, 12, 12, "cpu"))


def test_user_mistakes_get_clear_errors():
    ours = CogVideoXTransformer(VARIANTS["2b"])
    x, text, t = inputs(VARIANTS["2b"])
    with pytest.raises(ValueError, match="exactly 7 text tokens"):
        ours(x, text[:, :5], t)
    with pytest.raises(ValueError, match="frames before channels"):
        ours(x.transpose(1, 2), text, t)
    i2v = CogVideoXTransformer(VARIANTS["1.5-i2v"])
    x, text, t = inputs(VARIANTS["1.5-i2v"], frames=4)
    with pytest.raises(ValueError, match="ofs"):
        i2v(x, text, t, image_rotary_emb=i2v.rotary_embedding(4, 8, 12, "cpu"))
    with pytest.raises(ValueError, match="divisible by 2"):
        i2v(x[:, :3], text, t, ofs=2.0, image_rotary_emb=i2v.rotary_embedding(3, 8, 12, "cpu"))


@pytest.mark.parametrize("name", list(TRANSFORMER_PRESETS))
def test_official_configs_have_the_reference_state_dict(name):
    config = TRANSFORMER_PRESETS[name]
    with torch.device("meta"):
        ours = CogVideoXTransformer(config)
        theirs = CogVideoXTransformer3DModel(**reference_kwargs(config))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert all(p.is_meta for p in ours.parameters())


def test_presets_are_the_published_configs():
    p = TRANSFORMER_PRESETS
    assert p["CogVideoX-2b"].inner_dim == 1920 and not p["CogVideoX-2b"].use_rotary_positional_embeddings
    assert p["CogVideoX-5b-I2V"].is_image_to_video and p["CogVideoX-5b-I2V"].use_learned_positional_embeddings
    assert p["CogVideoX1.5-5B"].version == "1.5" and p["CogVideoX1.5-5B"].sample_height == 300
    assert p["CogVideoX1.5-5B-I2V"].ofs_embed_dim == 512
    with torch.device("meta"):
        n = sum(t.numel() for t in CogVideoXTransformer(p["CogVideoX-5b"]).parameters())
    assert n == 5_570_283_072  # counted from the reference definition


@pytest.mark.parametrize("how", ["assign", "to_empty"])
def test_built_on_meta_then_loaded_runs(how):
    # The 2B sin-cos table is not in the checkpoint: loading must give it real values again.
    config = VARIANTS["2b"]
    _, theirs = build_pair(config)
    with torch.device("meta"):
        ours = CogVideoXTransformer(config)
    if how == "assign":
        ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    else:
        ours.to_empty(device="cpu")
        ours.load_state_dict(theirs.state_dict(), strict=True)
    ours = ours.to("cpu").eval()
    table, expected_table = ours.patch_embed.pos_embedding, theirs.patch_embed.pos_embedding
    # Held in the weights' dtype (the reference's fp32 model keeps float64 and rounds it at each use).
    assert table.dtype == ours.patch_embed.text_proj.weight.dtype == torch.float32
    torch.testing.assert_close(table, expected_table.to(table.dtype), rtol=0, atol=0)
    x, text, t = inputs(config)
    out, expected = run_both(ours, theirs, config, x, text, t)
    assert rel_l2(out, expected) <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    config = VARIANTS["5b"]
    ours, theirs = build_pair(config)
    x, text, t = inputs(config)
    rope = ours.rotary_embedding(3, 8, 12, "cpu")

    calls = []
    real_checkpoint = transformer_module.checkpoint
    monkeypatch.setattr(
        transformer_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k)
    )

    def grads(model, checkpointing, **kw):
        model.train()
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        out = model(x, text, t, image_rotary_emb=rope, **kw)
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads(ours, False)
    assert not calls
    checkpointed = grads(ours, True)
    assert len(calls) == config.num_layers
    reference = grads(theirs, False, return_dict=False)
    assert plain.keys() == checkpointed.keys() == reference.keys()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)
        torch.testing.assert_close(plain[k], reference[k], rtol=1e-4, atol=1e-6, msg=k)


def trained_pair(mode: str):
    """A 5B-like tiny model and its inputs, trained as `mode`: "lora" (an adapter with a random B, so its
    A gets gradients too; the patch embedding is frozen, so the first block's input needs no gradient)
    or "full"."""
    config = VARIANTS["5b"]
    model, _ = build_pair(config)
    if mode == "lora":
        lora.inject_lora(model, 4, 8.0)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                w = layer.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return model, (*inputs(config), model.rotary_embedding(3, 8, 12, "cpu"))


def training_pass(model, data, checkpointing: bool, offload: bool, before_backward=None):
    """(loss, gradients of the trainable weights) of one forward and backward pass."""
    x, text, t, rope = data
    model.train()
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing, model.offload_activations = checkpointing, offload
    loss = model(x, text, t, image_rotary_emb=rope).square().mean()
    if before_backward is not None:
        before_backward()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_offloaded_activations_give_the_gradients_of_plain_checkpointing(mode):
    model, data = trained_pair(mode)
    plain_loss, plain = training_pass(model, data, False, False)
    checkpointed_loss, checkpointed = training_pass(model, data, True, False)
    offloaded_loss, offloaded = training_pass(model, data, True, True)
    assert plain.keys() == checkpointed.keys() == offloaded.keys()
    if mode == "lora":
        assert plain.keys() and all(".lora_" in k for k in plain)
    assert torch.equal(offloaded_loss, checkpointed_loss) and torch.equal(offloaded_loss, plain_loss)
    for k in plain:
        assert offloaded[k].abs().sum() > 0, k  # no silently lost gradients (as reentrant checkpoint gives)
        assert torch.equal(offloaded[k], checkpointed[k]), k  # same ops on the same values
        torch.testing.assert_close(offloaded[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)


def test_offloading_does_nothing_without_checkpointing_or_in_eval():
    model, data = trained_pair("lora")
    plain_loss, plain = training_pass(model, data, False, False)
    loss, grads = training_pass(model, data, False, True)
    assert torch.equal(loss, plain_loss) and all(torch.equal(grads[k], plain[k]) for k in plain)
    x, text, t, rope = data
    model.eval()
    model.gradient_checkpointing = True
    with torch.no_grad():
        expected = model(x, text, t, image_rotary_emb=rope)
        model.offload_activations = True
        torch.testing.assert_close(model(x, text, t, image_rotary_emb=rope), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_offloaded_block_inputs_do_not_stay_alive_until_backward(mode, monkeypatch):
    """Plain checkpointing keeps every block's inputs for the recompute; offloading keeps host copies
    instead, so the device tensors are freed during the forward pass. Checked through weak references
    to the tensors each block was called with, and through what the hook moved."""
    model, data = trained_pair(mode)
    x, text, _, _ = data
    moved = []
    real_to_host = host_saves._to_host
    monkeypatch.setattr(host_saves, "_to_host", lambda t, *a: moved.append(t.shape) or real_to_host(t, *a))

    def held_inputs(offload: bool) -> list[bool]:
        refs = []

        def remember(block, args, kwargs):
            if len(refs) < 2 * len(model.transformer_blocks):  # the forward pass, not the recomputes
                # The first block's inputs are views: their base holds the memory.
                refs.extend(weakref.ref(a if a._base is None else a._base) for a in args)

        hooks = [b.register_forward_pre_hook(remember, with_kwargs=True) for b in model.transformer_blocks]
        alive = []
        try:
            training_pass(model, data, True, offload, lambda: alive.extend(r() is not None for r in refs))
        finally:
            for h in hooks:
                h.remove()
        assert len(alive) == 2 * len(model.transformer_blocks)
        return alive

    assert all(held_inputs(offload=False)) and not moved
    assert not any(held_inputs(offload=True))
    tokens = x.shape[1] * (x.shape[3] // 2) * (x.shape[4] // 2)
    video, text_states = (2, tokens, model.config.inner_dim), (2, text.shape[1], model.config.inner_dim)
    layers = model.config.num_layers
    assert sorted(s for s in moved if s.numel()) == sorted([video] * layers + [text_states] * layers)

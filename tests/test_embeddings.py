"""Positional and timestep embeddings against the reference functions (diffusers is a test-only import)."""

import pytest
import torch
from diffusers.models import embeddings as ref
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from cogvideox.models.attention import apply_rope
from cogvideox.models.config import TransformerConfig
from cogvideox.models.embeddings import (
    PatchEmbed,
    TimestepEmbedding,
    joint_sincos_table,
    resize_crop_region,
    rope_1d,
    rope_3d,
    rope_positions_linspace,
    rope_positions_slice,
    sincos_3d,
    timestep_sinusoid,
)


@pytest.mark.parametrize("dim, flip, shift", [(32, True, 0), (1920, True, 0), (33, False, 1)])
def test_timestep_sinusoid_matches_reference(dim, flip, shift):
    t = torch.tensor([0, 1, 37, 999])
    ours = timestep_sinusoid(t, dim, flip, shift)
    theirs = ref.get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_timestep_embedding_keys_and_math():
    torch.manual_seed(0)
    mlp = TimestepEmbedding(8, 6)
    theirs = ref.TimestepEmbedding(8, 6, "silu")
    assert mlp.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(mlp.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(mlp(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("dim, frames, height, width", [(32, 3, 4, 6), (64, 2, 5, 3), (1920, 2, 30, 45)])
def test_sincos_3d_matches_reference(dim, frames, height, width):
    ours = sincos_3d(dim, frames, height, width, spatial_scale=1.875, temporal_scale=1.0)
    # The reference takes the spatial size as (width, height).
    theirs = ref.get_3d_sincos_pos_embed(dim, (width, height), frames, 1.875, 1.0).flatten(0, 1)
    assert ours.dtype == torch.float64 and ours.shape == (frames * height * width, dim)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_sincos_3d_width_coordinate_comes_first():
    # Along a row only the width coordinate changes: the first spatial block must vary, the second not.
    table = sincos_3d(32, 1, 2, 3).reshape(2, 3, 32)  # [H, W, D]
    w_part, h_part = table[..., 8:20], table[..., 20:]
    assert not torch.equal(w_part[0, 0], w_part[0, 1]) and torch.equal(w_part[0, 0], w_part[1, 0])
    assert torch.equal(h_part[0, 0], h_part[0, 1]) and not torch.equal(h_part[0, 0], h_part[1, 0])


def test_joint_table_matches_reference_patch_embed_table():
    theirs = ref.CogVideoXPatchEmbed(
        patch_size=2, in_channels=4, embed_dim=32, text_embed_dim=8, sample_width=12, sample_height=8,
        sample_frames=9, max_text_seq_length=7, use_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    )
    ours = joint_sincos_table(32, 7, 3, 4, 6, 1.875, 1.0)
    assert ours.shape == (1, 7 + 3 * 4 * 6, 32)
    assert torch.count_nonzero(ours[:, :7]) == 0
    torch.testing.assert_close(ours, theirs.pos_embedding, rtol=0, atol=0)


def test_loaded_sincos_table_is_the_reference_table_in_the_weights_dtype(monkeypatch):
    # The 2B table is recomputed after a load, on the CPU (a GPU's float64 sine can round the other way),
    # and held in the weights' dtype, as the reference's model holds it after from_pretrained(bf16).
    config = TransformerConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                               text_embed_dim=8, sample_width=12, sample_height=8, sample_frames=9,
                               max_text_seq_length=7, use_rotary_positional_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        embed = PatchEmbed(config)
    devices = []
    compute = PatchEmbed._sincos_table
    monkeypatch.setattr(PatchEmbed, "_sincos_table", lambda self, *a, device=None: devices.append(device) or
                        compute(self, *a, device=device))  # fmt: skip
    state = {k: torch.randn(v.shape, dtype=torch.bfloat16) for k, v in embed.state_dict().items()}
    embed.load_state_dict(state, assign=True)
    assert devices == [torch.device("cpu")]
    theirs = ref.CogVideoXPatchEmbed(
        patch_size=2, in_channels=4, embed_dim=32, text_embed_dim=8, sample_width=12, sample_height=8,
        sample_frames=9, max_text_seq_length=7, use_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    ).to(torch.bfloat16)
    assert embed.pos_embedding.dtype == torch.bfloat16
    torch.testing.assert_close(embed.pos_embedding, theirs.pos_embedding, rtol=0, atol=0)


@pytest.mark.parametrize("dim", [4, 16, 24])
def test_rope_1d_matches_reference(dim):
    pos = torch.linspace(0.5, 20.25, 17)
    cos, sin = rope_1d(dim, pos)
    rcos, rsin = ref.get_1d_rotary_pos_embed(dim, pos, use_real=True, repeat_interleave_real=True)
    torch.testing.assert_close(cos, rcos, rtol=0, atol=0)
    torch.testing.assert_close(sin, rsin, rtol=0, atol=0)


@pytest.mark.parametrize("base", [(30, 45), (4, 6), (150, 150)])
def test_resize_crop_region_matches_pipeline(base):
    base_h, base_w = base
    for gh in range(1, 60, 3):
        for gw in range(1, 90, 4):
            assert resize_crop_region(gh, gw, base_h, base_w) == get_resize_crop_region_for_grid(
                (gh, gw), base_w, base_h
            ), (gh, gw)


@pytest.mark.parametrize(
    "frames, grid, base",
    [(13, (30, 45), (30, 45)), (13, (48, 85), (30, 45)), (3, (6, 6), (4, 6)), (2, (3, 7), (4, 6))],
)
def test_rope_linspace_matches_reference(frames, grid, base):
    t, h, w = rope_positions_linspace(frames, *grid, *base)
    cos, sin = rope_3d(64, t, h, w)
    crop = get_resize_crop_region_for_grid(grid, base[1], base[0])
    rcos, rsin = ref.get_3d_rotary_pos_embed(64, crop, grid, frames)
    assert cos.shape == (frames * grid[0] * grid[1], 64)
    torch.testing.assert_close(cos, rcos, rtol=0, atol=0)
    torch.testing.assert_close(sin, rsin, rtol=0, atol=0)


def test_rope_linspace_is_integer_grid_at_native_size():
    t, h, w = rope_positions_linspace(13, 30, 45, 30, 45)
    assert torch.equal(t, torch.arange(13.0)) and torch.equal(h, torch.arange(30.0))
    assert torch.equal(w, torch.arange(45.0))


@pytest.mark.parametrize("frames, grid, max_size", [(11, (48, 85), (150, 150)), (2, (3, 4), (4, 6))])
def test_rope_slice_matches_reference(frames, grid, max_size):
    cos, sin = rope_3d(64, *rope_positions_slice(frames, *grid, *max_size))
    rcos, rsin = ref.get_3d_rotary_pos_embed(
        64, None, grid, frames, grid_type="slice", max_size=max_size
    )
    torch.testing.assert_close(cos, rcos, rtol=0, atol=0)
    torch.testing.assert_close(sin, rsin, rtol=0, atol=0)


def test_rope_slice_grid_larger_than_model_is_an_error():
    with pytest.raises(ValueError, match="exceeds"):
        rope_positions_slice(2, 5, 4, 4, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_matches_reference(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 24, 16).to(dtype)
    cos, sin = rope_3d(16, *rope_positions_slice(2, 3, 4, 4, 6))
    ours = apply_rope(x, cos, sin)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref.apply_rotary_emb(x, (cos, sin)), rtol=0, atol=0)
    # A rotation keeps the norm of every channel pair.
    pairs = lambda y: y.float().unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(ours), pairs(x), rtol=1e-2, atol=1e-2)


def _reference_patch_embed(**kw):
    return ref.CogVideoXPatchEmbed(
        in_channels=4, embed_dim=32, text_embed_dim=8, sample_width=12, sample_height=8, sample_frames=9,
        max_text_seq_length=7, use_positional_embeddings=False, use_learned_positional_embeddings=False, **kw
    )


@pytest.mark.parametrize("patch_size_t", [None, 2])
def test_patch_embed_matches_reference(patch_size_t):
    torch.manual_seed(0)
    theirs = _reference_patch_embed(patch_size_t=patch_size_t, bias=False)
    config = TransformerConfig(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, text_embed_dim=8,
        patch_size_t=patch_size_t, patch_bias=False, sample_frames=9, sample_height=8, sample_width=12,
        max_text_seq_length=7,
        use_rotary_positional_embeddings=True,  # no additive table
    )
    ours = PatchEmbed(config)
    # 1.5's Linear keeps its bias even with bias=False, like the checkpoints.
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict())
    text, video = torch.randn(2, 7, 8), torch.randn(2, 4, 4, 8, 12)
    torch.testing.assert_close(ours(text, video), theirs(text, video), rtol=0, atol=1e-6)

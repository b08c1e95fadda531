"""The 3D causal VAE against the reference `AutoencoderKLCogVideoX` (same weights, fp32 on CPU)."""

import pytest
import torch

from cogvideox.models import vae_blocks
from cogvideox.models.config import ConfigError, VAEConfig
from cogvideox.models.vae import CogVideoXVAE, frame_chunks
from cogvideox.models.vae_blocks import CausalConv3d, SafeConv3d

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def vae_config(block_out_channels: tuple[int, ...], **fields) -> VAEConfig:
    stages = len(block_out_channels)
    return VAEConfig(
        block_out_channels=block_out_channels,
        down_block_types=("CogVideoXDownBlock3D",) * stages,
        up_block_types=("CogVideoXUpBlock3D",) * stages,
        **fields,
    )


TINY = vae_config((32, 32, 64, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4)
# Narrower still, for the tests that run the VAE many times (tiles) or backwards.
SLIM = vae_config((8, 8, 16, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).norm() / ref.norm()).item()


def build_pair(config: VAEConfig, seed: int = 0):
    """The reference and our VAE with the same random weights (norm affines perturbed so they matter)."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKLCogVideoX.from_config(config.to_dict()).eval()
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    ours = CogVideoXVAE(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def tiny():
    return build_pair(TINY)


def test_frame_chunks():
    assert frame_chunks(49, 8) == [slice(0, 9)] + [slice(i, i + 8) for i in range(9, 49, 8)]
    assert frame_chunks(13, 2) == [slice(0, 3)] + [slice(i, i + 2) for i in range(3, 13, 2)]
    assert frame_chunks(4, 8) == [slice(0, 4)]
    assert frame_chunks(16, 8) == [slice(0, 8), slice(8, 16)]


@pytest.mark.parametrize("frames", [1, 9, 17])
def test_encode_matches_reference(tiny, frames):
    ref, ours = tiny
    x = torch.randn(1, 3, frames, 16, 24, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        got, want = ours.encode(x), ref.encode(x).latent_dist
    assert got.mean.shape == (1, 4, 1 + (frames - 1) // 4, 2, 3)
    assert rel_err(got.mean, want.mean) <= TOL
    assert rel_err(got.logvar, want.logvar) <= TOL
    assert rel_err(got.std, want.std) <= TOL


@pytest.mark.parametrize("latent_frames", [1, 3, 4, 5])
def test_decode_matches_reference(tiny, latent_frames):
    ref, ours = tiny
    z = torch.randn(1, 4, latent_frames, 2, 3, generator=torch.Generator().manual_seed(latent_frames))
    with torch.no_grad():
        got, want = ours.decode(z), ref.decode(z).sample
    # Odd counts start with a single-image latent frame; even counts are all pairs.
    frames = 1 + 4 * (latent_frames - 1) if latent_frames % 2 else 4 * latent_frames
    assert got.shape == (1, 3, frames, 16, 24)
    assert rel_err(got, want) <= TOL


def test_other_depth_and_groups_match_reference():
    # Three stages (4x spatial), two resnets per stage, 4 groups, 16 latent channels.
    config = vae_config((16, 32, 32), norm_num_groups=4, layers_per_block=2)
    ref, ours = build_pair(config, seed=1)
    x = torch.randn(1, 3, 9, 8, 12, generator=torch.Generator().manual_seed(0))
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours.encode(x).mean, ref.encode(x).latent_dist.mean) <= TOL
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= TOL


TILING = dict(
    tile_sample_min_height=32, tile_sample_min_width=64, tile_overlap_factor_height=0.5, tile_overlap_factor_width=0.25
)


@pytest.fixture(scope="module")
def slim():
    return build_pair(SLIM, seed=3)


@pytest.fixture
def tiled(slim):
    ref, ours = slim
    ref.enable_tiling(**TILING)
    ours.enable_tiling(**TILING)
    yield ref, ours
    ref.disable_tiling()
    ours.disable_tiling()


def test_tiled_decode_matches_reference(tiled):
    ref, ours = tiled
    z = torch.randn(1, 4, 3, 6, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = ours.decode(z), ref.decode(z).sample
        ours.disable_tiling()
        untiled = ours.decode(z)
    assert got.shape == (1, 3, 9, 48, 80)
    assert rel_err(got, want) <= TOL
    assert rel_err(got, untiled) > 1e-3  # the tiled path really ran


def test_tiled_encode_matches_reference(tiled):
    ref, ours = tiled
    x = torch.randn(1, 3, 9, 48, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = ours.encode(x), ref.encode(x).latent_dist
        ours.disable_tiling()
        untiled = ours.encode(x)
    assert got.mean.shape == (1, 4, 3, 6, 10)
    assert rel_err(got.mean, want.mean) <= TOL
    assert rel_err(got.logvar, want.logvar) <= TOL
    assert rel_err(got.mean, untiled.mean) > 1e-3


def test_slicing_matches_reference_and_batched(tiny):
    ref, ours = tiny
    x = torch.randn(2, 3, 9, 16, 16, generator=torch.Generator().manual_seed(4))
    z = torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        batched_mean, batched_video = ours.encode(x).mean, ours.decode(z)
        ref.enable_slicing()
        ours.enable_slicing()
        try:
            mean, video = ours.encode(x).mean, ours.decode(z)
            assert rel_err(mean, ref.encode(x).latent_dist.mean) <= TOL
            assert rel_err(video, ref.decode(z).sample) <= TOL
        finally:
            ref.disable_slicing()
            ours.disable_slicing()
    # GroupNorm is per sample, so one video at a time gives the batched result.
    assert rel_err(mean, batched_mean) <= TOL
    assert rel_err(video, batched_video) <= TOL


def test_posterior_sample_and_kl_match_reference(tiny):
    ref, ours = tiny
    x = torch.randn(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got, want = ours.encode(x), ref.encode(x).latent_dist
    sample = got.sample(torch.Generator().manual_seed(42))
    assert rel_err(sample, want.sample(torch.Generator().manual_seed(42))) <= TOL
    assert rel_err(sample, got.sample(torch.Generator().manual_seed(43))) > 1e-3
    seeds = [torch.Generator().manual_seed(s) for s in (1, 2)]
    ref_seeds = [torch.Generator().manual_seed(s) for s in (1, 2)]
    assert rel_err(got.sample(seeds), want.sample(ref_seeds)) <= TOL
    assert torch.equal(got.mode(), got.mean)
    # The reference sums dims 1-3 only, leaving the latent width; ours sums it too.
    assert rel_err(got.kl(), want.kl().sum(-1)) <= TOL


def test_gradients_flow_through_encode_and_decode():
    _, vae = build_pair(SLIM, seed=2)
    vae.train()
    x = torch.randn(1, 3, 17, 16, 16, generator=torch.Generator().manual_seed(7))
    posterior = vae.encode(x)  # two 8-frame chunks: caches carried with gradients
    video = vae.decode(posterior.sample(torch.Generator().manual_seed(0)))  # three latent chunks
    loss = (video - x).pow(2).mean() + 1e-3 * posterior.kl().mean()
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_tiled_decode_is_differentiable(tiled):
    _, ours = tiled
    z = torch.randn(1, 4, 1, 6, 10, generator=torch.Generator().manual_seed(8), requires_grad=True)
    ours.decode(z).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_official_keys_and_shapes_on_meta():
    with torch.device("meta"):
        ours = CogVideoXVAE(VAEConfig())
        ref = diffusers.AutoencoderKLCogVideoX()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert got["decoder.mid_block.resnets.0.norm1.conv_y.conv.weight"] == (512, 16, 1, 1, 1)
    assert got["encoder.down_blocks.0.downsamplers.0.conv.weight"] == (128, 128, 3, 3)
    assert all(p.is_meta for p in ours.parameters())


def test_safe_conv_time_chunks_equal_one_conv(monkeypatch):
    torch.manual_seed(0)
    conv = CausalConv3d(4, 6)
    x = torch.randn(1, 4, 7, 6, 6)
    whole = conv(x)
    calls = []
    original = SafeConv3d._conv_forward

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(vae_blocks, "MAX_CONV_ELEMENTS", 500)
    monkeypatch.setattr(SafeConv3d, "_conv_forward", counting)
    chunked = conv(x)  # 1296 padded elements -> 3 chunks
    assert len(calls) == 3
    assert rel_err(chunked, whole) <= 1e-6


def test_user_errors_are_explained():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        CogVideoXVAE(vae_config((32, 48), norm_num_groups=32, temporal_compression_ratio=2))
    with pytest.raises(ConfigError, match="downsampling stages"):
        CogVideoXVAE(vae_config((32, 32), norm_num_groups=8))
    with pytest.raises(ConfigError, match="once per entry"):
        CogVideoXVAE(VAEConfig(block_out_channels=(32, 32, 32), norm_num_groups=8))
    vae = CogVideoXVAE(vae_config((8, 8, 8), norm_num_groups=4, latent_channels=4))
    with pytest.raises(ValueError, match=r"permute\(0, 2, 1, 3, 4\)"):
        vae.decode(torch.zeros(1, 3, 4, 2, 2))  # [B, F, C, h, w] by mistake


# --- Tiles keep the frame size -----------------------------------------------------------------------
# A purely local stand-in for the decoder (each latent becomes an 8x8 block) and the encoder (8x8 means):
# every tile then computes exactly the untiled values where it overlaps, so any misplaced crop or blend
# shows up as a difference, not only as a wrong shape.

from cogvideox.models.vae_tiling import Tiling, tiled_decode, tiled_encode  # noqa: E402


def _blocks(z):
    return z.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)


def _means(x):
    b, c, t, h, w = x.shape
    return x.reshape(b, c, t, h // 8, 8, w // 8, 8).mean(dim=(-3, -1))


TILE_SETTINGS = [  # (tile height, tile width, overlap height, overlap width) in pixels
    (240, 360, 1 / 6, 1 / 5),  # the reference's defaults for 480x720
    (64, 64, 0.2, 0.2),  # 64-px tiles: stride 6 latents, blend 12 px by the reference's rule (16 here)
    (32, 64, 0.5, 0.25),
    (48, 80, 1 / 3, 0.3),
    (100, 72, 0.25, 0.6),  # a tile that is not whole latents, and overlaps over half a tile
]


@pytest.mark.parametrize("tile", TILE_SETTINGS)
def test_tiled_processing_equals_untiled_for_a_local_process(tile):
    tiling = Tiling(*tile, spatial_compression=8)
    g = torch.Generator().manual_seed(0)
    for h, w in [(8, 12), (13, 7), (30, 45), (31, 46), (60, 90), (9, 100), (52, 17)]:
        z = torch.randn(1, 2, 1, h, w, generator=g, dtype=torch.float64)
        got = tiled_decode(_blocks, z, tiling)
        assert got.shape == (1, 2, 1, 8 * h, 8 * w), (tile, h, w)
        torch.testing.assert_close(got, _blocks(z), rtol=0, atol=1e-12)
        x = _blocks(z) + 0.1 * torch.randn(1, 2, 1, 8 * h, 8 * w, generator=g, dtype=torch.float64)
        got = tiled_encode(_means, x, tiling)
        assert got.shape == (1, 2, 1, h, w), (tile, h, w)
        torch.testing.assert_close(got, _means(x), rtol=0, atol=1e-12)


def test_reference_tiles_overshoot_where_ours_keep_the_size(slim):
    """The demo model's 64x96 frames (8x12 latents) with 64-px tiles: the reference's tiled decode is
    larger than its untiled decode, ours is not."""
    ref, ours = slim
    z = torch.randn(1, 4, 1, 8, 12, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        untiled = ours.decode(z)
        ref.enable_tiling(64, 64, 0.2, 0.2)
        ours.enable_tiling(64, 64, 0.2, 0.2)
        try:
            theirs, got = ref.decode(z).sample, ours.decode(z)
        finally:
            ref.disable_tiling()
            ours.disable_tiling()
    assert untiled.shape == (1, 3, 1, 64, 96)
    assert theirs.shape[-2:] != untiled.shape[-2:]
    assert got.shape == untiled.shape

    # No seam: where one tile's kept pixels end and the next tile's begin (rows and columns 47|48), the
    # step between neighbouring pixels is about the untiled frame's step at the same place. (GroupNorm
    # sees only its tile, so the pixels are not the untiled ones; a random decoder's output also has a
    # period-8 texture, hence the comparison at the same row/column rather than with the frame's mean.)
    def steps(video, dim):
        return video.diff(dim=dim).abs().mean(dim=[d for d in range(5) if d != video.dim() + dim])

    assert steps(got, -2)[47] <= 1.6 * steps(untiled, -2)[47]
    assert steps(got, -1)[47] <= 1.6 * steps(untiled, -1)[47]
    assert rel_err(got, untiled) < 0.5


def test_default_tiles_match_reference_at_480x720(slim):
    ref, ours = slim
    z = torch.randn(1, 4, 1, 60, 90, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        # The defaults of a fresh model (earlier tests leave other tiles behind on these shared ones).
        ref.enable_tiling(240, 360, 1 / 6, 1 / 5)
        ours.enable_tiling(240, 360, 1 / 6, 1 / 5)
        try:
            got, want = ours.decode(z), ref.decode(z).sample
        finally:
            ref.disable_tiling()
            ours.disable_tiling()
    assert got.shape == want.shape == (1, 3, 1, 480, 720)
    assert rel_err(got, want) <= TOL

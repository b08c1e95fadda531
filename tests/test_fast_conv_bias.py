"""The resnet blocks' convolution biases folded into the norm and the shortcut after them
(cogvideox.fast.conv_bias) against the exact path: the statistics helper, the decodes and encodes with the
other VAE levers, tiled and chunked, the frame cache, and the fall-backs."""

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fast_vae import CONFIG as VAE_LEVERS_CONFIG
from test_fast_vae import applied_to_a_copy, tiled
from torch import nn

from cogvideox import fast
from cogvideox.fast.conv_bias import _folds_now, fold_conv_bias, shifted_group_norm
from cogvideox.models.vae import CogVideoXVAE
from cogvideox.models.vae_blocks import ResnetBlock3D, SafeConv3d

CONFIG = VAE_LEVERS_CONFIG  # its channel counts change between stages: some blocks project their shortcut


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture(scope="module")
def exact():
    """A VAE whose convolution biases and norm weights are far from their initial values, so that a bias
    left out or added twice shows."""
    torch.manual_seed(0)
    vae = CogVideoXVAE(CONFIG).eval()
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, nn.Conv3d) and module.bias is not None:
                module.bias.add_(0.5 * torch.randn_like(module.bias))
            if isinstance(module, nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    return vae


@pytest.fixture(scope="module")
def folded(exact):
    return applied_to_a_copy(exact, fold_conv_bias, ResnetBlock3D)


def with_levers(vae: nn.Module, *levers: str) -> nn.Module:
    vae = copy.deepcopy(vae)
    for lever in levers:
        getattr(fast, f"vae_{lever}")(vae)
    return vae


def latent(frames: int, seed: int, height: int = 3, width: int = 5) -> torch.Tensor:
    return torch.randn(1, 4, frames, height, width, generator=torch.Generator().manual_seed(seed))


def video(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 9, 24, 40, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def conv_biases():
    """Every 3D convolution call of the VAEs within: (module, the bias it adds, None for none)."""
    seen: list[tuple[nn.Module, torch.Tensor | None]] = []
    real = SafeConv3d._conv_forward

    def spy(conv, x, weight, bias):
        seen.append((conv, bias))
        return real(conv, x, weight, bias)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SafeConv3d, "_conv_forward", spy)
        yield seen


# The statistics helper


def shifted_inputs(shape: tuple[int, ...], offset: float, shift_offset: float, dtype: torch.dtype, seed: int):
    """y [B, C, *] of spread 1 around `offset` (plus a different mean per channel), a per-channel shift
    around `shift_offset` (spread 1 between channels), and affine weights."""
    g = torch.Generator().manual_seed(seed)
    channel_means = torch.randn(shape[1], generator=g).view(-1, *[1] * (len(shape) - 2))
    y = (offset + 0.5 * channel_means + torch.randn(shape, generator=g)).to(dtype)
    shift = (shift_offset + torch.randn(shape[1], generator=g)).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[1], generator=g)).to(dtype)
    bias = (0.3 * torch.randn(shape[1], generator=g)).to(dtype)
    return y, shift, weight, bias


def group_norm_of_sum(y, shift, groups, weight, bias, dtype=None) -> torch.Tensor:
    """F.group_norm(y + shift) with y + shift formed in `dtype` (y's by default)."""
    dtype = dtype or y.dtype
    per_channel = shift.view(-1, *[1] * (y.dim() - 2)).to(dtype)
    return F.group_norm(y.to(dtype) + per_channel, groups, weight.to(dtype), bias.to(dtype), 1e-6)


OFFSETS = [(0.0, 0.0), (0.0, 100.0), (100.0, 0.0), (30.0, -30.0), (100.0, 100.0)]


@pytest.mark.parametrize(("offset", "shift_offset"), OFFSETS)
@pytest.mark.parametrize("groups", [1, 4, 16])
@pytest.mark.parametrize("shape", [(2, 16, 9, 10), (2, 16, 3, 6, 10)])
def test_shifted_group_norm_is_group_norm_of_the_sum_in_fp32(shape, groups, offset, shift_offset):
    y, shift, weight, bias = shifted_inputs(shape, offset, shift_offset, torch.float32, seed=groups)
    got = shifted_group_norm(y, groups, shift, weight, bias, 1e-6)
    truth = group_norm_of_sum(y, shift, groups, weight, bias, torch.float64)
    assert got.dtype == y.dtype and got.shape == y.shape and got.is_contiguous()
    # fp32 rounding of values |offset| + |shift_offset| times their spread (y * scale + offset in one pass,
    # as GroupNorm's own kernel): F.group_norm of the fp32 sum is as far from fp64 (1e-5 at 200 times)
    tolerance = 3e-7 * (1 + abs(offset) + abs(shift_offset))
    assert rel_err(got, truth) <= tolerance
    assert rel_err(got, group_norm_of_sum(y, shift, groups, weight, bias)) <= tolerance
    if groups < shape[1]:  # (a group of one channel normalises any shift away)
        # the shift matters: the norm of y alone is far from it (a shift left out would fail the above)
        assert rel_err(F.group_norm(y, groups, weight, bias, 1e-6), truth) > 1e-2


@pytest.mark.parametrize(("offset", "shift_offset"), OFFSETS)
@pytest.mark.parametrize("shape", [(1, 32, 64, 64), (2, 16, 4, 32, 32)])
def test_shifted_group_norm_in_bf16_is_as_close_to_fp64_as_torch(shape, offset, shift_offset):
    # Welford per channel, the shift added in fp32: a mean 100 times the spread costs nothing. The exact path
    # rounds y + shift to bf16 before its norm, which costs digits where the shift dwarfs y's spread.
    y, shift, weight, bias = shifted_inputs(shape, offset, shift_offset, torch.bfloat16, seed=int(offset))
    truth = group_norm_of_sum(y, shift, 4, weight, bias, torch.float64)
    got = shifted_group_norm(y, 4, shift, weight, bias, 1e-6)
    want = group_norm_of_sum(y, shift, 4, weight, bias)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, truth) <= 1.2 * rel_err(want, truth)
    assert rel_err(got, truth) <= 4e-3  # the rounding of the output, about 2**-9 relative, and no more


def test_shifted_group_norm_keeps_channels_last_and_hands_autograd_to_torch():
    y, shift, weight, bias = shifted_inputs((2, 8, 3, 4, 5), 3.0, 2.0, torch.float32, seed=6)
    last = y.contiguous(memory_format=torch.channels_last_3d)
    got = shifted_group_norm(last, 4, shift, weight, bias)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel_err(got, shifted_group_norm(y, 4, shift, weight, bias)) <= 1e-6
    shift.requires_grad_()
    out = shifted_group_norm(y, 4, shift, weight, bias)
    out.square().sum().backward()  # the in-place write of the fast path would have no gradient
    assert shift.grad is not None and rel_err(out.detach(), got) <= 1e-5
    with pytest.raises(ValueError, match="groups"):
        shifted_group_norm(torch.randn(1, 6, 4), 4, torch.zeros(6))


# The decodes and encodes


@pytest.mark.parametrize("latent_frames", [1, 5])
def test_fold_decode_and_encode_match_exact(exact, folded, latent_frames):
    z, x = latent(latent_frames, seed=10 + latent_frames), video(10)
    with torch.no_grad():
        want, want_posterior = exact.decode(z), exact.encode(x)
        got, posterior = folded.decode(z), folded.encode(x)  # five latent frames: two chunks, a frame cache
    assert got.shape == want.shape and rel_err(got, want) <= 1e-5
    assert rel_err(posterior.mean, want_posterior.mean) <= 1e-5
    assert rel_err(posterior.logvar, want_posterior.logvar) <= 1e-5


def test_the_biases_matter_to_the_decode(exact):
    # What the tolerance of 1e-5 holds against: conv1's biases left out change the decode by far more.
    without = copy.deepcopy(exact)
    with torch.no_grad():
        for block in without.modules():
            if isinstance(block, ResnetBlock3D):
                block.conv1.conv.bias.zero_()
        z = latent(5, seed=12)
        assert rel_err(without.decode(z), exact.decode(z)) > 1e-2


def test_conv1_and_the_projected_conv2_add_no_bias(exact, folded):
    blocks = [m for m in folded.modules() if isinstance(m, ResnetBlock3D)]
    projected = [b for b in blocks if b.conv_shortcut is not None]
    assert projected and len(projected) < len(blocks)  # both kinds of shortcut are exercised
    with conv_biases() as seen, torch.no_grad():
        folded.decode(latent(5, seed=13))
        folded.encode(video(13))
    bias_of = {}
    for conv, bias in seen:
        bias_of.setdefault(conv, []).append(bias)
    for block in blocks:
        assert bias_of[block.conv1.conv] and all(b is None for b in bias_of[block.conv1.conv])
        if block.conv_shortcut is None:
            assert all(b is block.conv2.conv.bias for b in bias_of[block.conv2.conv])
        else:  # conv2's bias joins the shortcut's
            assert all(b is None for b in bias_of[block.conv2.conv])
            joint = block.conv_shortcut.bias + block.conv2.conv.bias
            assert all(torch.equal(b, joint) for b in bias_of[block.conv_shortcut])
    with conv_biases() as seen, torch.no_grad():
        exact.decode(latent(5, seed=13))
    assert all(bias is conv.bias for conv, bias in seen)  # the exact path adds every bias itself


LEAN = ("parallel_norms", "latent_modulation", "pad_in_place")


@pytest.mark.parametrize("levers", [("parallel_norms",), ("latent_modulation",), ("pad_in_place",), LEAN])
def test_fold_composes_with_the_other_decode_levers(exact, folded, levers):
    z, x = latent(5, seed=14), video(14)
    for first in (True, False):  # the levers in either order
        vae = with_levers(folded, *levers) if first else fold_with(with_levers(exact, *levers))
        with conv_biases() as seen, torch.no_grad():
            got, posterior = vae.decode(z), vae.encode(x)
        with torch.no_grad():
            want, want_posterior = exact.decode(z), exact.encode(x)
        assert rel_err(got, want) <= 1e-5
        assert rel_err(posterior.mean, want_posterior.mean) <= 1e-5
        conv1s = {m.conv1.conv for m in vae.modules() if isinstance(m, ResnetBlock3D)}
        assert all(bias is None for conv, bias in seen if conv in conv1s)  # the fold ran


def fold_with(vae: nn.Module) -> nn.Module:
    fold_conv_bias(vae)
    return vae


def test_fold_tiled_decode_matches_exact(exact, folded):
    lean = with_levers(folded, *LEAN)
    z = latent(3, seed=15, height=5, width=8)
    with tiled(exact, folded, lean), torch.no_grad():
        want = exact.decode(z)
        for vae in (folded, lean):
            got = vae.decode(z)
            assert got.shape == (1, 3, 9, 40, 64) and rel_err(got, want) <= 1e-5


def test_fold_leaves_the_frame_cache_as_it_was(exact, folded):
    # The cache holds each convolution's padded input frames, which the bias does not touch: the same
    # entries (keyed by the same convolutions) with the same frames, chunk after chunk.
    z = latent(5, seed=16)
    caches = []
    for vae in (exact, folded):
        names = {m: n for n, m in vae.decoder.named_modules()}
        cache: dict = {}
        with torch.no_grad():
            for frames in (slice(0, 3), slice(3, 5)):
                vae.decoder(z[:, :, frames], cache)
        caches.append({names[conv]: frames for conv, frames in cache.items()})
    want, got = caches
    assert got.keys() == want.keys() and len(want) > 0
    for name, frames in want.items():
        assert rel_err(got[name], frames) <= 1e-5, name


def test_fold_in_bf16_stays_within_rounding(exact, folded):
    low, low_folded = copy.deepcopy(exact).bfloat16(), copy.deepcopy(folded).bfloat16()
    z = latent(3, seed=17, height=4, width=6)
    with torch.no_grad():
        full = exact.decode(z)
        eager, got = low.decode(z.bfloat16()).float(), low_folded.decode(z.bfloat16()).float()
    # the bias enters the norm in fp32 where the exact path rounds y + b to bf16 first: no further from fp32
    assert rel_err(got, full) <= 1.2 * rel_err(eager, full) + 1e-4


def test_autograd_takes_the_exact_forward(exact, folded):
    trained = copy.deepcopy(folded).train()
    reference = copy.deepcopy(exact).train()
    z = latent(3, seed=18)
    with conv_biases() as seen:
        loss = trained.decode(z).square().mean()
    assert all(bias is conv.bias for conv, bias in seen)  # every convolution added its own bias
    loss.backward()
    reference.decode(z).square().mean().backward()
    for (name, p), q in zip(trained.decoder.named_parameters(), reference.decoder.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) <= 1e-4, name
    # a latent that needs a gradient, the weights frozen: exact too
    frozen = copy.deepcopy(folded).requires_grad_(False)
    wanted = z.clone().requires_grad_()
    with conv_biases() as seen:
        frozen.decode(wanted).sum().backward()
    assert wanted.grad is not None and all(bias is conv.bias for conv, bias in seen)


def test_blocks_under_the_fused_norms_or_2d_convolutions_keep_the_exact_forward(exact, folded):
    # Checked at each call, so the levers compose in either order; the fused norms compile on their first
    # call, which this test does not make.
    fused = with_levers(folded, "fuse_norms")
    block = next(m for m in fused.modules() if isinstance(m, ResnetBlock3D))
    x = torch.randn(1, block.conv1.conv.in_channels, 3, 4, 4)
    with torch.no_grad():
        assert not _folds_now(block, x, None)
        assert _folds_now(next(m for m in folded.modules() if isinstance(m, ResnetBlock3D)), x, None)
    as_2d = with_levers(folded, "conv2d")
    z = latent(3, seed=19)
    with conv_biases() as seen, torch.no_grad():
        got = as_2d.decode(z)
        assert rel_err(got, exact.decode(z)) <= 1e-5
    assert all(bias is conv.bias for conv, bias in seen)


def test_fold_with_channels_last_keeps_the_layout_and_the_values(exact, folded):
    vae = with_levers(folded, "channels_last", "parallel_norms", "latent_modulation")
    z = latent(3, seed=20)
    with torch.no_grad():
        assert rel_err(vae.decode(z), exact.decode(z)) <= 1e-5


def test_fold_marks_blocks_for_offloading_and_takes_a_vae_only(folded):
    assert all(m.offload_as_one for m in folded.modules() if isinstance(m, ResnetBlock3D))
    assert set(folded.state_dict()) == set(CogVideoXVAE(CONFIG).state_dict())
    with pytest.raises(TypeError, match="takes a CogVideoXVAE"):
        fold_conv_bias(nn.Linear(2, 2))


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offloaded_vae_gives_the_folded_blocks_their_norms_weights(tiny_rope_dir, mode):
    from cogvideox import Pipeline
    from cogvideox.fast import offload

    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    z = torch.randn(1, 3, pipe.vae.config.latent_channels, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # as generation decodes (outside it the weights need gradients: exact path)
        want = pipe.decode(z)
    fold_conv_bias(pipe.vae)
    pipe.offload = offload.apply(pipe, mode, torch.device("cpu"), record=True, poison=True)
    with conv_biases() as seen, torch.inference_mode():
        got = pipe.decode(z)
    conv1s = {m.conv1.conv for m in pipe.vae.modules() if isinstance(m, ResnetBlock3D)}
    assert any(conv in conv1s and bias is None for conv, bias in seen)  # the fold ran
    # Poisoned: a weight the folded blocks read without its module's hook would turn the video to NaN.
    assert np.abs(got[0].astype(int) - want[0].astype(int)).max() <= 1
    if mode == "sequential":  # a folded block moves as one group, its norms' weights with it
        assert "vae.decoder.up_blocks.0.resnets.0" in [g.name for g in pipe.offload.groups()]

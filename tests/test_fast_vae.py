"""The VAE levers (cogvideox.fast.vae: channels-last, 3D convolutions as 2D ones, fused norms; cogvideox.fast.
group_norm: GroupNorm by parallel reductions; cogvideox.fast.modulation: the decoder norms' modulation at
the latent's size; cogvideox.fast.causal_pad: activations written into the padded inputs) against the exact
path, and the memory layout along the way."""

import contextlib
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from cogvideox.fast import vae as fast_vae
from cogvideox.fast.group_norm import group_norm, parallel_norms
from cogvideox.fast.causal_pad import pad_in_place
from cogvideox.fast.modulation import latent_size_modulation
from cogvideox.fast.vae import as_conv2d, channels_last, fuse_norms
from cogvideox.models.config import VAEConfig
from cogvideox.models.vae import CogVideoXVAE
from cogvideox.models.vae_blocks import CausalConv3d, ResnetBlock3D, SpatialNorm3D

CONFIG = VAEConfig(
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    norm_num_groups=4,
    layers_per_block=1,
    latent_channels=4,
)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    exact = CogVideoXVAE(CONFIG).eval()
    with torch.no_grad():
        for module in exact.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    fast = copy.deepcopy(exact)
    convs = sum(isinstance(m, nn.Conv3d | nn.Conv2d) for m in fast.modules())
    assert channels_last(fast) == convs
    hooks = len(fast.decoder._forward_pre_hooks)
    assert channels_last(fast) == convs and len(fast.decoder._forward_pre_hooks) == hooks  # idempotent
    return exact, fast


@contextlib.contextmanager
def conv_inputs(vae: nn.Module):
    """Record, for every convolution call inside the block, whether its input was channels-last.

    cuDNN returns a channels-last result from a channels-last convolution; the CPU's 3D convolution
    returns a channels-first one. The hooks make the CPU behave as cuDNN does (a layout change only, the
    values are the same), so the check is about this project's layers: given channels-last tensors, do
    the norms, upsamplings, frame caches and per-frame convolutions between two convolutions keep that
    layout, or would the GPU pay for a conversion?
    """
    seen: list[bool] = []

    def layout(module):
        return torch.channels_last_3d if isinstance(module, nn.Conv3d) else torch.channels_last

    def record(module, args):
        seen.append(args[0].is_contiguous(memory_format=layout(module)))

    def like_cudnn(module, args, output):
        return output.contiguous(memory_format=layout(module))

    convs = [m for m in vae.modules() if isinstance(m, nn.Conv3d | nn.Conv2d)]
    handles = [m.register_forward_pre_hook(record) for m in convs]
    handles += [m.register_forward_hook(like_cudnn) for m in convs]
    try:
        with torch.no_grad():
            yield seen
    finally:
        for h in handles:
            h.remove()


def assert_all_channels_last(seen: list[bool], at_least: int) -> None:
    assert len(seen) >= at_least and all(seen), f"{seen.count(False)} of {len(seen)} convolutions got channels-first input"


@pytest.mark.parametrize("latent_frames", [1, 3, 4])
def test_decode_matches_exact_and_every_conv_reads_channels_last(pair, latent_frames):
    exact, fast = pair
    z = torch.randn(1, 4, latent_frames, 3, 5, generator=torch.Generator().manual_seed(latent_frames))
    with conv_inputs(fast) as seen:
        got, want = fast.decode(z), exact.decode(z)
    assert got.shape == want.shape and got.is_contiguous()
    assert rel_err(got, want) <= 1e-5
    if latent_frames > 1:
        # (A one-frame tensor is channels-first and channels-last at once; concatenating such tensors
        # gives channels-first, so a single image pays a few conversions. Videos pay none.)
        assert_all_channels_last(seen, 40)


def test_encode_matches_exact_and_every_conv_reads_channels_last(pair):
    exact, fast = pair
    x = torch.randn(1, 3, 9, 24, 40, generator=torch.Generator().manual_seed(9))
    with conv_inputs(fast) as seen:
        got, want = fast.encode(x), exact.encode(x)
    assert got.mean.is_contiguous()
    assert rel_err(got.mean, want.mean) <= 1e-5 and rel_err(got.logvar, want.logvar) <= 1e-5
    assert_all_channels_last(seen, 15)


def test_tiled_and_sliced_decode_match_exact(pair):
    exact, fast = pair
    z = torch.randn(2, 4, 3, 6, 10, generator=torch.Generator().manual_seed(2))
    try:
        for vae in pair:
            vae.enable_tiling(32, 48, 0.5, 0.25)
            vae.enable_slicing()
        with torch.no_grad():
            got, want = fast.decode(z), exact.decode(z)
    finally:
        for vae in pair:
            vae.disable_tiling()
            vae.disable_slicing()
    assert got.shape == (2, 3, 9, 48, 80)
    assert rel_err(got, want) <= 1e-5


def test_bf16_stays_within_rounding(pair):
    exact, fast = (copy.deepcopy(v).to(torch.bfloat16) for v in pair)
    z = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.no_grad():
        got, want = fast.decode(z).float(), exact.decode(z).float()
        full = pair[0].decode(z.float())
    # Against fp32, channels-last bf16 is as close as channels-first bf16 (both are bf16 rounding).
    assert rel_err(got, full) <= 2 * rel_err(want, full) + 1e-3
    assert rel_err(got, want) <= 2e-2


def test_refuses_other_modules():
    with pytest.raises(TypeError, match="CogVideoXVAE"):
        channels_last(nn.Linear(2, 2))


@contextlib.contextmanager
def tiled(*vaes: nn.Module):
    """`vaes` decoding in tiles of 24 x 40 pixels (3 x 2 tiles of 3 x 5 latents for 5 x 8 latents) until
    the block ends."""
    try:
        for vae in vaes:
            vae.enable_tiling(24, 40, 1 / 3, 1 / 5)
        yield
    finally:
        for vae in vaes:
            vae.disable_tiling()


def applied_to_a_copy(exact: nn.Module, lever, kind: type) -> nn.Module:
    """A copy of `exact` with `lever` applied, which reports one change per `kind` module (there are
    some), and the same count when applied again (idempotent)."""
    vae = copy.deepcopy(exact)
    count = sum(isinstance(m, kind) for m in vae.modules())
    assert lever(vae) == count > 0
    assert lever(vae) == count  # idempotent
    return vae


@pytest.fixture(scope="module")
def fused(pair):
    exact, _ = pair
    vae = copy.deepcopy(exact)
    blocks = sum(isinstance(m, ResnetBlock3D) for m in vae.modules())
    assert fuse_norms(vae) == blocks > 0
    torch._dynamo.reset()
    return vae


def test_fused_norms_match_exact_decode_and_encode_with_few_compilations(pair, fused):
    exact, _ = pair
    z = torch.randn(1, 4, 5, 3, 5, generator=torch.Generator().manual_seed(5))
    x = torch.randn(1, 3, 17, 24, 40, generator=torch.Generator().manual_seed(6))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        assert rel_err(fused.decode(z), exact.decode(z)) <= 1e-5
        fused.decode(z[:, :, :3, :2])  # other sizes: no new compilation
        # One graph for the first chunk (no frame cache) and one for the others, per channel count (the
        # decoder's norms see 32 and 16), whatever the stages' sizes.
        assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])
        got, want = fused.encode(x), exact.encode(x)
        assert rel_err(got.mean, want.mean) <= 1e-5 and rel_err(got.logvar, want.logvar) <= 1e-5
        assert counters["stats"]["unique_graphs"] == 8, dict(counters["stats"])  # the encoder's unmodulated norms


def channels_last_decodes(exact, lever, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """One latent decoded by a channels-last copy of `lever` and by `exact`: (lever's, exact's, the inputs
    of the copy's convolutions, for `assert_all_channels_last`)."""
    both = copy.deepcopy(lever)
    channels_last(both)
    z = torch.randn(1, 4, 3, 3, 5, generator=torch.Generator().manual_seed(seed))
    with conv_inputs(both) as seen:
        return both.decode(z), exact.decode(z), seen


def test_fused_norms_keep_channels_last(pair, fused):
    got, want, seen = channels_last_decodes(pair[0], fused, seed=7)
    assert rel_err(got, want) <= 1e-5
    assert_all_channels_last(seen, 40)


def bf16_decodes(exact, lever, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One latent decoded by `exact` in fp32, and by bf16 copies of `exact` and of `lever`: (fp32, eager
    bf16, lever bf16), the latter two back in fp32."""
    low, low_lever = copy.deepcopy(exact).bfloat16(), copy.deepcopy(lever).bfloat16()
    z = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return exact.decode(z), low.decode(z.bfloat16()).float(), low_lever.decode(z.bfloat16()).float()


def test_fused_norms_in_bf16_stay_within_rounding(pair, fused):
    full, eager, fast = bf16_decodes(pair[0], fused, seed=8)
    # Keeping the intermediates in fp32 can only help: no further from fp32 than the eager bf16 path.
    assert rel_err(fast, full) <= 1.2 * rel_err(eager, full) + 1e-4


def test_fuse_norms_refuses_other_modules_and_activations():
    with pytest.raises(TypeError, match="CogVideoXVAE"):
        fuse_norms(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="SiLU"):
        fuse_norms(CogVideoXVAE(dataclasses.replace(CONFIG, act_fn="relu")))


@pytest.fixture(scope="module")
def as_2d(pair):
    return applied_to_a_copy(pair[0], as_conv2d, nn.Conv3d)


@pytest.mark.parametrize("latent_frames", [1, 4])
def test_conv2d_decode_matches_exact(pair, as_2d, latent_frames):
    exact, _ = pair
    z = torch.randn(1, 4, latent_frames, 3, 5, generator=torch.Generator().manual_seed(10 + latent_frames))
    with torch.no_grad():
        got, want = as_2d.decode(z), exact.decode(z)
    assert got.shape == want.shape and got.is_contiguous()
    assert rel_err(got, want) <= 1e-5


def test_conv2d_encode_and_tiled_decode_match_exact(pair, as_2d):
    exact, _ = pair
    x = torch.randn(1, 3, 9, 24, 40, generator=torch.Generator().manual_seed(11))
    z = torch.randn(1, 4, 3, 5, 8, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        got, want = as_2d.encode(x), exact.encode(x)
        assert rel_err(got.mean, want.mean) <= 1e-5 and rel_err(got.logvar, want.logvar) <= 1e-5
        with tiled(exact, as_2d):
            got, want = as_2d.decode(z), exact.decode(z)
    assert got.shape == (1, 3, 9, 40, 64)
    assert rel_err(got, want) <= 1e-5


def test_conv2d_in_parts_matches_exact(pair, as_2d, monkeypatch):
    # Inputs whose stacked frames exceed the element cap run as several 2D convolutions over frame ranges.
    exact, _ = pair
    x = torch.randn(1, 4, 7, 3, 5, generator=torch.Generator().manual_seed(13))  # 5 output frames
    monkeypatch.setattr(fast_vae, "MAX_CONV_ELEMENTS", 2 * 3 * 4 * 3 * 5)  # two stacked frames
    batches = []
    conv2d = fast_vae.F.conv2d
    monkeypatch.setattr(fast_vae.F, "conv2d", lambda x, *a, **k: batches.append(x.shape[0]) or conv2d(x, *a, **k))
    with torch.no_grad():
        got = as_2d.decoder.conv_in.conv(x)
        want = exact.decoder.conv_in.conv(x)
    assert batches == [2, 2, 1]
    assert rel_err(got, want) <= 1e-5
    z = torch.randn(1, 4, 3, 3, 5, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        assert rel_err(as_2d.decode(z), exact.decode(z)) <= 1e-5  # every convolution in parts


def test_conv2d_bf16_stays_within_rounding(pair, as_2d):
    full, eager, fast = bf16_decodes(pair[0], as_2d, seed=14)
    # One stacked product rounds once, as the 3D kernel does: as close to fp32 as the exact bf16 path.
    assert rel_err(fast, full) <= 1.5 * rel_err(eager, full)
    assert rel_err(fast, eager) <= 2e-2


def test_conv2d_on_channels_last_keeps_the_layout(pair, as_2d):
    got, want, seen = channels_last_decodes(pair[0], as_2d, seed=15)
    assert got.is_contiguous() and rel_err(got, want) <= 1e-5
    assert_all_channels_last(seen, 40)


def test_conv2d_keeps_state_dict_keys_and_loading(pair, as_2d):
    exact, _ = pair
    state = as_2d.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in exact.state_dict().items()}
    torch.manual_seed(1)
    other = CogVideoXVAE(CONFIG).eval()
    z = torch.randn(1, 4, 2, 3, 5, generator=torch.Generator().manual_seed(16))
    loaded, assigned = copy.deepcopy(as_2d), copy.deepcopy(as_2d)
    loaded.load_state_dict(other.state_dict())
    assigned.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
    with torch.no_grad():
        want = other.decode(z)
        assert rel_err(loaded.decode(z), want) <= 1e-5 and rel_err(assigned.decode(z), want) <= 1e-5


def test_conv2d_under_fused_norms_matches_exact(pair, fused):
    # The fused blocks call the convolutions' inner Conv3d directly: the 2D path must be there too.
    exact, _ = pair
    both = copy.deepcopy(fused)
    as_conv2d(both)
    z = torch.randn(1, 4, 3, 3, 5, generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        assert rel_err(both.decode(z), exact.decode(z)) <= 1e-5


def test_conv2d_refuses_other_modules():
    with pytest.raises(TypeError, match="CogVideoXVAE"):
        as_conv2d(nn.Linear(2, 2))


# The GroupNorm statistics by parallel reductions (cogvideox.fast.group_norm).


def norm_inputs(shape: tuple[int, ...], offset: float, dtype: torch.dtype, seed: int):
    """x [B, C, *] of spread 1 around `offset` (plus a different mean per channel), and affine weights."""
    g = torch.Generator().manual_seed(seed)
    channel_means = torch.randn(shape[1], generator=g).view(-1, *[1] * (len(shape) - 2))
    x = (offset + 0.5 * channel_means + torch.randn(shape, generator=g)).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[1], generator=g)).to(dtype)
    bias = (0.3 * torch.randn(shape[1], generator=g)).to(dtype)
    return x, weight, bias


@pytest.mark.parametrize("moments", ["welford", "raw"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("groups", [1, 3, 12])
@pytest.mark.parametrize("shape", [(2, 12, 9, 10), (2, 12, 3, 6, 10)])
def test_group_norm_matches_torch_in_fp32(shape, groups, affine, moments):
    x, weight, bias = norm_inputs(shape, 0.5, torch.float32, seed=groups)
    if not affine:
        weight = bias = None
    got = group_norm(x, groups, weight, bias, 1e-6, moments)
    want = F.group_norm(x, groups, weight, bias, 1e-6)
    assert got.dtype == x.dtype and got.shape == x.shape and got.is_contiguous()
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("offset", [0.0, 30.0, 100.0])
@pytest.mark.parametrize("shape", [(1, 32, 64, 64), (2, 16, 4, 32, 32)])
def test_group_norm_in_bf16_is_as_close_to_fp64_as_torch(shape, offset):
    # Welford's variance has no cancellation: a mean 30 or 100 times the spread costs nothing.
    x, weight, bias = norm_inputs(shape, offset, torch.bfloat16, seed=int(offset))
    truth = F.group_norm(x.double(), 4, weight.double(), bias.double(), 1e-6)
    got = group_norm(x, 4, weight, bias, 1e-6)
    want = F.group_norm(x, 4, weight, bias, 1e-6)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.double(), truth) <= 1.2 * rel_err(want.double(), truth)
    if offset:  # and in fp32, the same inputs: fp32 rounding
        full = x.float(), weight.float(), bias.float()
        assert rel_err(group_norm(full[0], 4, *full[1:], 1e-6), F.group_norm(full[0], 4, *full[1:], 1e-6)) <= 1e-5


def test_group_norm_rounds_once_from_fp32():
    # The normalized values are computed in fp32 and rounded to bf16 once, as torch's kernel does.
    x, weight, bias = norm_inputs((1, 8, 5, 7, 9), 2.0, torch.bfloat16, seed=3)
    full = group_norm(x.float(), 2, weight.float(), bias.float(), 1e-6)
    got = group_norm(x, 2, weight, bias, 1e-6)
    assert (got.float() - full.bfloat16().float()).abs().max() <= 2**-7 * full.abs().max()  # one ulp at most
    assert (got == full.bfloat16()).float().mean() > 0.99  # almost always the fp32 value rounded once


def test_raw_moments_lose_digits_to_a_large_mean():
    # The raw moments' documented weakness: E[x^2] - mean^2 cancels when the mean dwarfs the spread.
    x, weight, bias = norm_inputs((1, 8, 4, 64, 64), 100.0, torch.float32, seed=5)
    want = F.group_norm(x, 2, weight, bias, 1e-6)
    welford, raw = (rel_err(group_norm(x, 2, weight, bias, 1e-6, m), want) for m in ("welford", "raw"))
    assert welford <= 1e-5 < raw


def test_group_norm_keeps_channels_last_and_hands_autograd_to_torch():
    x, weight, bias = norm_inputs((2, 8, 3, 4, 5), 0.0, torch.float32, seed=6)
    last = x.contiguous(memory_format=torch.channels_last_3d)
    got = group_norm(last, 4, weight, bias)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel_err(got, group_norm(x, 4, weight, bias)) <= 1e-6
    weight.requires_grad_()
    y = group_norm(x, 4, weight, bias)
    y.square().sum().backward()  # the in-place write of the fast path would have no gradient
    assert weight.grad is not None and rel_err(y.detach(), got) <= 1e-5


def test_group_norm_refuses_bad_groups_and_moments():
    x = torch.randn(1, 6, 4)
    with pytest.raises(ValueError, match="groups"):
        group_norm(x, 4)
    with pytest.raises(ValueError, match="moments"):
        group_norm(x, 3, moments="shifted")
    with pytest.raises(ValueError, match="moments"):
        parallel_norms(CogVideoXVAE(CONFIG), moments="shifted")
    with pytest.raises(TypeError, match="CogVideoXVAE"):
        parallel_norms(nn.Linear(2, 2))


@contextlib.contextmanager
def without_torch_group_norm(monkeypatch):
    """Fail any call of F.group_norm (what nn.GroupNorm calls): every norm must take the parallel path."""
    with monkeypatch.context() as patch:
        patch.setattr(F, "group_norm", lambda *a, **k: pytest.fail("F.group_norm was called"))
        with torch.no_grad():
            yield


@pytest.fixture(scope="module", params=["welford", "raw"])
def parallel(pair, request):
    return applied_to_a_copy(pair[0], lambda vae: parallel_norms(vae, request.param), nn.GroupNorm)


@pytest.mark.parametrize("latent_frames", [1, 5])
def test_parallel_norms_decode_and_encode_match_exact(pair, parallel, latent_frames, monkeypatch):
    exact, _ = pair
    z = torch.randn(1, 4, latent_frames, 3, 5, generator=torch.Generator().manual_seed(20 + latent_frames))
    x = torch.randn(1, 3, 9, 24, 40, generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        want, want_posterior = exact.decode(z), exact.encode(x)
    with without_torch_group_norm(monkeypatch):
        got, posterior = parallel.decode(z), parallel.encode(x)  # five latent frames: two chunks
    assert got.shape == want.shape and rel_err(got, want) <= 1e-5
    assert rel_err(posterior.mean, want_posterior.mean) <= 1e-5
    assert rel_err(posterior.logvar, want_posterior.logvar) <= 1e-5


def test_parallel_norms_tiled_decode_matches_exact(pair, parallel, monkeypatch):
    exact, _ = pair
    z = torch.randn(1, 4, 3, 5, 8, generator=torch.Generator().manual_seed(21))
    with tiled(exact, parallel):
        with torch.no_grad():
            want = exact.decode(z)
        with without_torch_group_norm(monkeypatch):
            got = parallel.decode(z)
    assert got.shape == (1, 3, 9, 40, 64) and rel_err(got, want) <= 1e-5


def test_parallel_norms_in_bf16_stay_within_rounding(pair, parallel):
    copied = copy.deepcopy(parallel)
    norm = copied.decoder.norm_out.norm_layer
    assert norm.forward.__self__ is norm  # a copy's norms read the copy's weights (bf16 below)
    full, eager, fast = bf16_decodes(pair[0], parallel, seed=22)
    assert rel_err(fast, full) <= 1.2 * rel_err(eager, full) + 1e-4


def test_parallel_norms_compose_with_channels_last_and_conv2d(pair, parallel):
    both = copy.deepcopy(parallel)
    as_conv2d(both)
    got, want, seen = channels_last_decodes(pair[0], both, seed=23)
    assert got.is_contiguous() and rel_err(got, want) <= 1e-5
    assert_all_channels_last(seen, 40)  # the norms' outputs keep the layout


def test_fused_norms_win_over_parallel_norms_where_both_apply(pair, fused):
    # The fused blocks read their norms' weights themselves; the norm_outs take the parallel path.
    exact, _ = pair
    both = copy.deepcopy(fused)
    assert parallel_norms(both) == sum(isinstance(m, nn.GroupNorm) for m in both.modules())
    z = torch.randn(1, 4, 3, 3, 5, generator=torch.Generator().manual_seed(24))
    with torch.no_grad():
        assert rel_err(both.decode(z), exact.decode(z)) <= 1e-5


@pytest.fixture(scope="module")
def modulated(pair):
    return applied_to_a_copy(pair[0], latent_size_modulation, SpatialNorm3D)


@contextlib.contextmanager
def modulation_sizes(vae: nn.Module):
    """The spatial sizes the decoder norms' 1x1x1 convolutions (y and b) see: the exact path runs them
    on the latent resized to the features; the lever on the latent itself."""
    sizes: list[tuple[int, int]] = []
    real = F.conv3d

    def spy(x, weight, *args, **kwargs):
        if weight.shape[-3:] == (1, 1, 1) and weight.shape[1] == CONFIG.latent_channels:
            sizes.append(tuple(x.shape[-2:]))
        return real(x, weight, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr(F, "conv3d", spy)
        yield sizes


@pytest.mark.parametrize("latent_frames", [1, 5])
def test_latent_size_modulation_matches_exact_with_convolutions_at_the_latent_size(pair, modulated, latent_frames):
    exact, _ = pair
    z = torch.randn(1, 4, latent_frames, 3, 5, generator=torch.Generator().manual_seed(30 + latent_frames))
    with modulation_sizes(exact) as exact_sizes:
        want = exact.decode(z)
    with modulation_sizes(modulated) as sizes:
        got = modulated.decode(z)
    assert got.shape == want.shape and rel_err(got, want) <= 1e-5
    # the exact path convolves the resized latent at every feature size; the lever only the latent's
    assert {(3, 5), (6, 10), (12, 20), (24, 40)} <= set(exact_sizes)
    assert sizes and set(sizes) == {(3, 5)}


def test_latent_size_modulation_tiled_and_in_bf16(pair, modulated):
    exact, _ = pair
    z = torch.randn(1, 4, 3, 5, 8, generator=torch.Generator().manual_seed(32))
    with tiled(exact, modulated), torch.no_grad():
        got, want = modulated.decode(z), exact.decode(z)
    assert got.shape == (1, 3, 9, 40, 64) and rel_err(got, want) <= 1e-5
    full, eager, fast = bf16_decodes(exact, modulated, seed=33)
    # one rounding of GroupNorm(f) * y + b where the exact path rounds twice: no further from fp32
    assert rel_err(fast, full) <= 1.2 * rel_err(eager, full) + 1e-4


def test_latent_size_modulation_composes_with_the_other_levers(pair, modulated, fused):
    exact, _ = pair
    both = copy.deepcopy(modulated)
    parallel_norms(both)
    as_conv2d(both)
    got, want, seen = channels_last_decodes(exact, both, seed=34)
    assert rel_err(got, want) <= 1e-5
    assert_all_channels_last(seen, 20)  # the norms' 1x1x1 convolution modules no longer run: fewer calls
    # the fused blocks take y and b through SpatialNorm3D.modulation, so from the lever too
    fused_too = copy.deepcopy(fused)
    latent_size_modulation(fused_too)
    z = torch.randn(1, 4, 3, 3, 5, generator=torch.Generator().manual_seed(35))
    with modulation_sizes(fused_too) as sizes:
        got = fused_too.decode(z)
    assert set(sizes) == {(3, 5)} and rel_err(got, exact.decode(z)) <= 1e-5


def test_latent_size_modulation_takes_a_vae_only():
    with pytest.raises(TypeError, match="takes a CogVideoXVAE"):
        latent_size_modulation(nn.Linear(2, 2))


@pytest.fixture(scope="module")
def padded(pair):
    return applied_to_a_copy(pair[0], pad_in_place, ResnetBlock3D)


@contextlib.contextmanager
def activation_concatenations():
    """How many times a decode copies a whole activation into a causal convolution's padded input (what
    `CausalConv3d.forward` does for each call with a time padding)."""
    seen = []
    real = CausalConv3d.forward

    def spy(conv, x, cache=None):
        if conv.time_pad:
            seen.append(1)
        return real(conv, x, cache)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CausalConv3d, "forward", spy)
        with torch.no_grad():
            yield seen


@pytest.mark.parametrize("latent_frames", [1, 5])
def test_pad_in_place_is_the_exact_decode_without_the_activation_copies(pair, padded, latent_frames):
    exact, _ = pair
    z = torch.randn(1, 4, latent_frames, 3, 5, generator=torch.Generator().manual_seed(40 + latent_frames))
    x = torch.randn(1, 3, 9, 24, 40, generator=torch.Generator().manual_seed(40))
    with activation_concatenations() as copies_exact:
        want, want_posterior = exact.decode(z), exact.encode(x)
    with activation_concatenations() as copies:
        got, posterior = padded.decode(z), padded.encode(x)
    # the same function of each value; on the CPU the vectorised SiLU and its scalar remainder loop round
    # exp differently, hence rounding, not bits (chunks, caches and the encoder included)
    assert got.shape == want.shape and rel_err(got, want) <= 1e-5
    assert rel_err(posterior.mean, want_posterior.mean) <= 1e-5
    assert rel_err(posterior.logvar, want_posterior.logvar) <= 1e-5
    assert len(copies) < len(copies_exact)


def test_pad_in_place_tiled_and_with_the_other_levers(pair, padded, fused):
    exact, _ = pair
    z = torch.randn(1, 4, 3, 5, 8, generator=torch.Generator().manual_seed(42))
    with tiled(exact, padded), torch.no_grad():
        assert rel_err(padded.decode(z), exact.decode(z)) <= 1e-5
    every = copy.deepcopy(padded)
    parallel_norms(every)
    latent_size_modulation(every)
    as_conv2d(every)
    got, want, seen = channels_last_decodes(exact, every, seed=43)
    assert rel_err(got, want) <= 1e-5
    assert_all_channels_last(seen, 20)  # the padded inputs keep the activations' layout
    both = copy.deepcopy(fused)
    assert pad_in_place(both) == 0  # the fused blocks pad in their own kernel
    with pytest.raises(TypeError, match="takes a CogVideoXVAE"):
        pad_in_place(nn.Linear(2, 2))

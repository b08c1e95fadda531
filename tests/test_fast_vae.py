"""The channels-last VAE (cogvideox.fast.vae) against the exact path, and its layout along the way."""

import copy

import pytest
import torch
from torch import nn

from cogvideox.fast.vae import channels_last
from cogvideox.models.config import VAEConfig
from cogvideox.models.vae import CogVideoXVAE

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


def conv_inputs(vae: nn.Module) -> tuple[list[bool], list]:
    """Hooks recording, for every convolution call, whether its input was channels-last.

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
    return seen, handles


@pytest.mark.parametrize("latent_frames", [1, 3, 4])
def test_decode_matches_exact_and_every_conv_reads_channels_last(pair, latent_frames):
    exact, fast = pair
    z = torch.randn(1, 4, latent_frames, 3, 5, generator=torch.Generator().manual_seed(latent_frames))
    seen, handles = conv_inputs(fast)
    try:
        with torch.no_grad():
            got, want = fast.decode(z), exact.decode(z)
    finally:
        for h in handles:
            h.remove()
    assert got.shape == want.shape and got.is_contiguous()
    assert rel_err(got, want) <= 1e-5
    if latent_frames > 1:
        # (A one-frame tensor is channels-first and channels-last at once; concatenating such tensors
        # gives channels-first, so a single image pays a few conversions. Videos pay none.)
        assert len(seen) > 40 and all(seen), f"{seen.count(False)} of {len(seen)} convolutions got channels-first input"


def test_encode_matches_exact_and_every_conv_reads_channels_last(pair):
    exact, fast = pair
    x = torch.randn(1, 3, 9, 24, 40, generator=torch.Generator().manual_seed(9))
    seen, handles = conv_inputs(fast)
    try:
        with torch.no_grad():
            got, want = fast.encode(x), exact.encode(x)
    finally:
        for h in handles:
            h.remove()
    assert got.mean.is_contiguous()
    assert rel_err(got.mean, want.mean) <= 1e-5 and rel_err(got.logvar, want.logvar) <= 1e-5
    assert len(seen) > 15 and all(seen), f"{seen.count(False)} of {len(seen)} convolutions got channels-first input"


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

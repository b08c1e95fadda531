"""The resnet blocks' convolution biases folded into what follows them: no pass that only adds a bias.

What. In each resnet block of the VAE (encoder and decoder), conv1's output y + b (b the convolution's
bias, one value per channel) goes only into norm2: a GroupNorm, or in the decoder a `SpatialNorm3D`, whose
GroupNorm normalises it before the latent's scale and shift. GroupNorm(y + b) is computed from y:

1. Per (sample, channel), in fp32, from y in its own dtype (group_norm.py's reductions: an fp32 sum, and
   Welford's variance): mean_c and var_c of y. The bias shifts the mean, mean_c + b_c, and leaves the
   variance.
2. Per (sample, group), its channels combined by the parallel (Chan) formula for equal counts: mu_g the
   mean of the shifted means, var_g = mean(var_c) + mean((mean_c + b_c - mu_g)^2). Exact, and free of the
   cancellation of E[x^2] - E[x]^2. rstd_g = 1 / sqrt(var_g + eps).
3. One pass over y: out = y * s_c + t_c with s_c = gamma_c * rstd_g and t_c = (b_c - mu_g) * s_c + beta_c,
   one fp32 `torch.addcmul` rounded once to y's dtype: the pass `vae_parallel_norms` runs anyway.

So conv1 convolves without its bias (`CausalConv3d.conv_padded(..., add_bias=False)`), and the pass that
would add it is gone. In the blocks that change the channel count, a 1x1x1 convolution projects the
shortcut, and conv2's bias joins the shortcut's: out = conv2(h) + (W_s x + (b_s + b_2)), the sum of the
two biases (C values) made at each call; conv2's bias add goes too. Where the shortcut is the identity,
conv2's bias stays: adding it to x or to the sum would be a pass of its own (PyTorch has no one-pass sum
of two tensors and a per-channel vector), and its output also feeds the next block's shortcut, not only
a norm.

Why. PyTorch's cuDNN path adds a convolution's bias in a separate elementwise kernel after it, which
reads and writes the whole output. In the kernel profile of a 5B decode (one H200, torch 2.11, bf16, 13
latent frames to 49 x 480 x 720, untiled; BENCHMARKS.md) those adds took 281 ms in 708 calls, of the
2199 ms of device time. By the values they add to (a decode on the meta device, each convolution's
output counted: 702 calls, 99.7 G values): the decoder norms' y and b 444 calls, 64.0 G (64%, about 181
ms; `vae_latent_modulation` already computes those at the latent's size), the resnet blocks' conv1 108
calls (18 blocks, 6 chunks), 13.8 G (13.8%, about 39 ms), their conv2 the same, the upsamplers' 18, 5.7 G
(16 ms), the shortcut projections' 12, 2.3 G (7 ms), conv_in and conv_out under 0.1 G.

Precision. The statistics are those of y + b, without y + b formed. Measured (CPU, the tests): against an
fp64 GroupNorm of y + b, in fp32 within 3e-7 * (1 + r), r the inputs' mean over their spread (9.8e-6 at
r = 200, where F.group_norm of the fp32 sum is 1.2e-5 off: the rounding of the values themselves); in
bf16 1.6-1.7e-3 (the output's rounding) at any r up to 200, where F.group_norm of the bf16 sum is 2.5e-3
at r = 0 and 0.09 to 0.23 at r = 100 to 200: the exact path rounds y + b to bf16 before its norm, here b
enters in fp32. The test VAE's decodes and encodes in fp32 (its convolution biases made large): 2.0e-7 to
2.9e-7 from the exact path, alone and with the three levers above, whole, chunked and tiled; in bf16
4.72e-3 from the fp32 decode, where the exact bf16 decode is 4.70e-3 (with the three levers, 4.59e-3 with
the fold and 4.61e-3 without).

Composition. norm2 takes this path whatever its forward is (`vae_parallel_norms`' statistics are the same
reductions; with its raw moments, norm2 keeps Welford's); in the decoder the normalised features go on
through `SpatialNorm3D.modulate`, so `vae_latent_modulation`'s one-pass combine applies. Each block's
`norm_act_conv` (the exact one, or `vae_pad_in_place`'s) gets conv1 seen without its bias and norm2 seen
with it, so the activations are written into the padded inputs as before. The frame cache holds each
convolution's padded input frames, which the bias does not touch: the same frames, under the same key
(conv1's module). With tiling and the frame-chunked decode, the statistics are per tile and per chunk as
before: this replaces one block's call and nothing around it. Blocks under `vae_fuse_norms` (a compiled
kernel that reads the norms itself) or whose convolutions `vae_conv2d` runs keep the exact forward,
checked at each call, so the levers can be applied in any order. Under autograd (the input, the latent or
a weight of the block needs a gradient) the exact forward runs: generation decodes in inference mode; a
decode outside it, on weights that need gradients, takes the exact path, as with `vae_parallel_norms`.
Offloading moves a block's weights together (`offload_as_one`): the norm's weights are read without
calling the norm.

Not measured on a GPU yet, hence off by default. Predicted, on top of `vae_parallel_norms`,
`vae_latent_modulation` and `vae_pad_in_place` ("lean"), whose decode keeps 35.6 G values of bias adds
(about 100 ms): conv1's adds (13.8 G, about 39 ms) and conv2's in the two decoder blocks with a projected
shortcut (2.3 G, about 7 ms) go; the per-channel statistics read y twice, as the per-group ones do, and
take about ten more small kernels on [B, C] tensors per norm2 call (108 calls, about 2 ms). About 40-45 ms
off the decode, 0.02x of the reference's 2.1-2.2 s: "lean"'s predicted 0.52-0.59x becomes 0.50-0.57x.
(Not half of the 281 ms: by values conv1's share is a seventh, and the modulation's adds, two thirds,
are `vae_latent_modulation`'s to remove.)
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from cogvideox.models.vae_blocks import CausalConv3d, ConvCache, ResnetBlock3D, SpatialNorm3D

from .group_norm import welford_moments
from .vae import _fused_norm_act_conv


def shifted_group_moments(
    y: torch.Tensor, groups: int, shift: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd), fp32 [B, G], of y + shift over each group's channels and positions, for y [B, C, *]
    and shift [C] (one value per channel), without forming y + shift (see the module's docstring)."""
    b, channels = y.shape[:2]
    mean, var = welford_moments(y, tuple(range(2, y.dim())))  # [B, C] fp32, of y
    mean = (mean + shift.float()).view(b, groups, channels // groups)  # of y + shift; the variance is the same
    group_mean = mean.mean(-1)
    # Chan's parallel formula, for channels of equal counts: the mean variance plus the means' variance.
    group_var = var.view(b, groups, -1).mean(-1) + (mean - group_mean[..., None]).square().mean(-1)
    return group_mean, torch.rsqrt(group_var + eps)


def shifted_group_norm(
    y: torch.Tensor,
    groups: int,
    shift: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """`F.group_norm(y + shift, groups, weight, bias, eps)` for y [B, C, *] and a per-channel shift [C], in
    one pass over y: y * scale + offset (fp32, rounded once to y's dtype, in y's memory layout). Where
    autograd records, F.group_norm of y + shift runs."""
    b, channels = y.shape[:2]
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    broadcast = (b, channels) + (1,) * (y.dim() - 2)
    tensors = (y, shift, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return F.group_norm(y + shift.view(broadcast[1:]), groups, weight, bias, eps)
    mean, rstd = shifted_group_moments(y, groups, shift, eps)

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # [B, G] -> [B, C], each group's value on its channels
        return t[:, :, None].expand(b, groups, channels // groups).reshape(b, channels)

    scale = per_channel(rstd)
    if weight is not None:
        scale = scale * weight.float()
    offset = (shift.float() - per_channel(mean)) * scale  # (b_c - mu_g) * s_c: no cancellation of two products
    if bias is not None:
        offset = offset + bias.float()
    return torch.addcmul(offset.view(broadcast), y, scale.view(broadcast), out=torch.empty_like(y))


class _WithoutBias:
    """A block's causal convolution as `norm_act_conv` sees it (called; or `time_pad` and `conv_padded`),
    convolving without its bias: the same module, weights, padding and frame-cache entry."""

    def __init__(self, conv: CausalConv3d):
        self.causal = conv
        self.time_pad = conv.time_pad

    def __call__(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        return self.causal(x, cache, add_bias=False)

    def conv_padded(self, padded: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        return self.causal.conv_padded(padded, cache, add_bias=False)


class _WithBias:
    """A block's norm2 as `norm_act_conv` sees it (called with the features, and the latent in the
    decoder), for features that lack conv1's bias: it normalises them plus the bias."""

    def __init__(self, norm: nn.Module, shift: torch.Tensor):
        self.norm = norm
        self.shift = shift

    def __call__(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        spatial = isinstance(self.norm, SpatialNorm3D)
        group_norm = self.norm.norm_layer if spatial else self.norm
        normed = shifted_group_norm(
            x, group_norm.num_groups, self.shift, group_norm.weight, group_norm.bias, group_norm.eps
        )
        return self.norm.modulate(normed, zq) if spatial else normed


def _convs(block: ResnetBlock3D) -> list[nn.Module]:
    return [block.conv1.conv, block.conv2.conv] + ([block.conv_shortcut] if block.conv_shortcut is not None else [])


def _folds_now(block: ResnetBlock3D, x: torch.Tensor, zq: torch.Tensor | None) -> bool:
    """Whether this call can fold: no autograd recording, and no other lever's path in the block that the
    fold would bypass (the fused norms, the 2D convolutions; checked per call, so any order works)."""
    if torch.is_grad_enabled() and (
        x.requires_grad or (zq is not None and zq.requires_grad) or any(p.requires_grad for p in block.parameters())
    ):
        return False
    if getattr(block.norm_act_conv, "__func__", None) is _fused_norm_act_conv:
        return False
    return not any("forward" in vars(conv) for conv in _convs(block))


def _folded_forward(
    block: ResnetBlock3D, x: torch.Tensor, cache: ConvCache | None = None, zq: torch.Tensor | None = None
) -> torch.Tensor:
    """`ResnetBlock3D.forward` with conv1's bias added inside norm2, and conv2's inside the shortcut's
    projection where there is one (see the module's docstring)."""
    if not _folds_now(block, x, zq):
        return type(block).forward(block, x, cache, zq)
    norm2 = _WithBias(block.norm2, block.conv1.conv.bias)
    h = block.norm_act_conv(block.norm1, _WithoutBias(block.conv1), x, zq, cache)
    shortcut, bias2 = block.conv_shortcut, block.conv2.conv.bias
    if shortcut is None or bias2 is None:
        return block.norm_act_conv(norm2, block.conv2, h, zq, cache) + (x if shortcut is None else shortcut(x))
    h = block.norm_act_conv(norm2, _WithoutBias(block.conv2), h, zq, cache)
    return h + shortcut(x, bias=bias2 if shortcut.bias is None else shortcut.bias + bias2)


def fold_conv_bias(vae: nn.Module) -> int:
    """Make every resnet block of `vae` (a `CogVideoXVAE`) add conv1's bias inside norm2 and, where a
    1x1x1 convolution projects its shortcut, conv2's bias in that projection, in place; returns how many
    blocks. Idempotent; the weights and their keys are unchanged (only the blocks' `forward` is replaced,
    which follows them through deepcopy)."""
    if not (hasattr(vae, "encoder") and hasattr(vae, "decoder")):
        raise TypeError("fold_conv_bias() takes a CogVideoXVAE (or a Pipeline's .vae)")
    blocks = [m for m in vae.modules() if isinstance(m, ResnetBlock3D) and m.conv1.conv.bias is not None]
    for block in blocks:
        norm = block.norm2.norm_layer if isinstance(block.norm2, SpatialNorm3D) else block.norm2
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"fold_conv_bias() needs GroupNorms after the convolutions, got {type(norm).__name__}")
    for block in blocks:
        block.forward = types.MethodType(_folded_forward, block)
        block.offload_as_one = True  # the norms' weights are read without calling them
    return len(blocks)

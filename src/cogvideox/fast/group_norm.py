"""GroupNorm with its statistics taken by PyTorch's generic reductions, which keep the whole GPU busy.

Measured (one H200, torch 2.11, bf16, 5B decoder, 13 latent frames to 49 x 480 x 720, untiled,
benchmarks/kernel_profile.py): of the exact decode's 2199 ms of device time, GroupNorm's statistics
kernel (`RowwiseMomentsCUDAKernel`) takes 803 ms in 222 calls, its normalize kernel 82 ms. The statistics
kernel gives each (sample, group) row one thread block: with one video and 32 groups, 32 blocks on a
132-SM GPU, each reducing up to 25 million values alone. The 222 calls read 64 GB: 80 GB/s, under 2%
of the memory's bandwidth. The reference (diffusers) calls the same kernel.

`group_norm(x, groups, weight, bias, eps)` computes `F.group_norm` in three steps:

1. Per (sample, group), in fp32: the mean and the variance of its values. Both are PyTorch's generic
   reduction kernel, which splits a long row over many thread blocks, and on CUDA reads bf16 and
   accumulates in fp32 in the same kernel (given an fp32 result, it makes no fp32 copy of x). Two
   passes over x: `torch.sum` for the mean, and `torch.var` (Welford's update, as GroupNorm's own
   kernel) for the variance; or, with `moments="raw"`, `torch.linalg.vector_norm` for E[x^2] and
   var = E[x^2] - mean^2, cheaper per value (a multiply-add, where Welford's update divides) but
   less precise (below). rstd = 1 / sqrt(var + eps).
2. Per (sample, channel), in fp32: scale = weight * rstd, shift = bias - mean * scale.
3. One pass over x: y = x * scale + shift (`torch.addcmul`), computed in fp32 and rounded once to x's
   dtype on the write, in x's memory layout.

Precision. With Welford's variance, the result is F.group_norm's to fp32 rounding, whatever the inputs
(measured: 1e-7 relative in fp32, a test allows 1e-5; in bf16, as far from an fp64 GroupNorm as
F.group_norm, 1.7e-3, with means of 0, 30 and 100 times the spread). The raw
moments lose digits when a group's mean is large against its spread: with r = |mean| / std, a relative
error d in the fp32 sums becomes about d * r^2 in the variance, half that in rstd, a uniform relative
error of the output. d depends on the order of the sums. A simulation of the GPU's (serial runs of 340
to 1000 bf16 values per thread, then a tree) gives rstd errors of 1e-5 to 3e-4 at r = 10, 5e-4 to 3e-3
at r = 30, 1e-3 to 4e-2 at r = 100, against a bf16 rounding of about 2e-3. PyTorch's CPU norm kernel
loses more on long rows (in bf16, 2e-2 at r = 30 against F.group_norm's 2e-3). Hence Welford by
default; the raw moments are there to measure what Welford's division costs on a GPU.

`parallel_norms(vae)` makes every `nn.GroupNorm` of a `CogVideoXVAE` (encoder and decoder: the resnet
blocks' norms, the decoder's latent-conditioned `SpatialNorm3D.norm_layer`s, both `norm_out`s) call it.
It composes with the levers of `vae.py`: `fuse_norms` replaces the resnet blocks' norm, activation and
padding by one compiled kernel that reads the norms' weights itself, so where it applies it wins (the
norm is then Inductor's, which splits its reductions too) and this lever keeps only the `norm_out`s;
channels-last inputs stay channels-last (`as_conv2d`, `channels_last`). With tiling and the
frame-chunked decode the statistics are per tile and per chunk as before: this replaces one
`F.group_norm` call and nothing around it. Under autograd (training) F.group_norm itself runs: the
write of step 3 into a preallocated output has no gradient.

Not measured on a GPU yet, hence off by default. Predicted: the statistics read the norms' 64 GB of
inputs twice (~45 ms at 3 TB/s) and the normalize pass reads and writes them once (128 GB, 45 to 85 ms:
GroupNorm's own normalize kernel took 82 ms), plus ten small kernels per call on [B, C] tensors: about
0.1 s in all, against the 885 ms of the norm kernels now.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn


def group_mean(rows: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The mean over `dims` (every axis after the group's) in fp32: an fp32 sum, divided."""
    return rows.sum(dims, dtype=torch.float32) / rows[0, 0].numel()


def welford_moments(rows: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) over `dims` in fp32; the variance by Welford's update, free of cancellation."""
    mean = group_mean(rows, dims)
    return mean, torch.var(rows, dims, correction=0, out=mean.new_empty(0))  # fp32 result: fp32 accumulation


def raw_moments(rows: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) over `dims` in fp32, as E[x^2] - mean^2: cancels when |mean| >> std."""
    mean = group_mean(rows, dims)
    mean_square = torch.linalg.vector_norm(rows, 2, dim=dims, dtype=torch.float32).square() / rows[0, 0].numel()
    return mean, (mean_square - mean.square()).clamp_min(0)


MOMENTS = {"welford": welford_moments, "raw": raw_moments}


def group_moments(
    x: torch.Tensor, groups: int, eps: float, moments: str = "welford"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd), fp32 [B, G], of x [B, C, *] over each group's channels and all positions.

    The group axis is split off the channels as a view (in any memory layout) and every axis after it
    is reduced.
    """
    rows = x.unflatten(1, (groups, -1))  # [B, G, C/G, *]
    mean, var = MOMENTS[moments](rows, tuple(range(2, rows.dim())))
    return mean, torch.rsqrt(var + eps)


def affine(
    mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), fp32 [B, C]: GroupNorm's y = (x - mean) * rstd * weight + bias as y = x * scale + shift."""
    b, groups = mean.shape

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # [B, G] -> [B, C], each group's value on its channels
        return t[:, :, None].expand(b, groups, channels // groups).reshape(b, channels)

    scale = per_channel(rstd)
    if weight is not None:
        scale = scale * weight.float()
    shift = -per_channel(mean) * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


def group_norm(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    moments: str = "welford",
) -> torch.Tensor:
    """`F.group_norm(x, groups, weight, bias, eps)` for x [B, C, *], its statistics by parallel reductions.

    The result has x's dtype and memory layout; the arithmetic is fp32 throughout. `moments`: "welford"
    (the variance by Welford's update) or "raw" (from E[x^2], see the module's docstring for its
    precision). Where autograd records (x or the affine weights need gradients), F.group_norm runs.
    """
    if moments not in MOMENTS:
        raise ValueError(f"unknown moments {moments!r}; use one of {', '.join(MOMENTS)}")
    b, channels = x.shape[:2]
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    tracked = x.requires_grad or any(t is not None and t.requires_grad for t in (weight, bias))
    if torch.is_grad_enabled() and tracked:
        return F.group_norm(x, groups, weight, bias, eps)
    mean, rstd = group_moments(x, groups, eps, moments)
    scale, shift = affine(mean, rstd, weight, bias, channels)
    broadcast = (b, channels) + (1,) * (x.dim() - 2)
    # fp32 scale and shift with x in its dtype: fp32 arithmetic, rounded once on the write.
    return torch.addcmul(shift.view(broadcast), x, scale.view(broadcast), out=torch.empty_like(x))


def _parallel_group_norm(norm: nn.GroupNorm, x: torch.Tensor, moments: str) -> torch.Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, moments)


def parallel_norms(vae: nn.Module, moments: str = "welford") -> int:
    """Make every GroupNorm of `vae` (a `CogVideoXVAE`) use `group_norm`, in place; returns how many.

    Idempotent (a second call only changes `moments`). The modules, their weights and state-dict keys
    are unchanged: only their `forward` is replaced, which follows them through deepcopy. Resnet blocks
    under `fuse_norms` keep its compiled norm (see the module's docstring).
    """
    if not (hasattr(vae, "encoder") and hasattr(vae, "decoder")):
        raise TypeError("parallel_norms() takes a CogVideoXVAE (or a Pipeline's .vae)")
    if moments not in MOMENTS:
        raise ValueError(f"unknown moments {moments!r}; use one of {', '.join(MOMENTS)}")
    norms = [m for m in vae.modules() if isinstance(m, nn.GroupNorm)]
    forward = functools.partial(_parallel_group_norm, moments=moments)
    for norm in norms:
        norm.forward = types.MethodType(forward, norm)
    return len(norms)

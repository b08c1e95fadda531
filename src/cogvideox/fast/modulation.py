"""The decoder's latent modulation at the latent's size, and its combine in one pass.

Each decoder norm is a `SpatialNorm3D`: GroupNorm(f) * y + b, where y and b are 1x1x1 convolutions of the
latent zq nearest-resized to the features' size. A 1x1x1 convolution acts on each position alone and a
nearest resize only copies positions, so the two commute: convolving the latent at its own size (13 x 60
x 90 for a 5B video, against up to 8 x 480 x 720 per chunk at the last stage) and resizing y and b gives
the same values, each the same dot product of the same 16 latent channels.

Measured (one H200, torch 2.11, bf16, 5B decoder, untiled; `benchmarks/kernel_profile.py`): the exact
decode's 2199 ms of device time include, per decoder norm, the two full-size convolution outputs y and b
with each bias added in a separate broadcasting pass (PyTorch's cuDNN path adds a bias after the
convolution: 708 such adds, 281 ms in all, 444 of them these), then a multiply and an add
(44 and about 40 ms). In passes over a full-size tensor of the norm's shape (N values), the exact path
writes y and b (2N), adds their biases (2N read, 2N written), multiplies (2N read, N written) and adds
(2N read, N written): 12N. `latent_size_modulation(vae)` makes it: one convolution of the latent to y and
b together at its size (its bias added there, on a few thousand positions), each resized (2N written),
and one `addcmul` (3N read, N written): 6N. Over a 5B decode the norms' inputs are 32 G values, so about
380 GB less memory traffic. Predicted: 0.15-0.2 s off the decode (not measured on a GPU yet; off by
default).

The values: y and b are the exact path's to rounding (the same products and bias, summed by a smaller
GEMM). `addcmul` computes GroupNorm(f) * y + b in fp32 and rounds once, where the exact path rounds the
product to the model's dtype first: in bf16 it is nearer the fp32 result, not farther; in fp32 the two
agree to 1e-6 (the tests). Composes with `vae_parallel_norms` (the GroupNorm inside stays whichever it
is), channels-last and the 2D convolutions (the latent's convolution is a small plain one either way),
tiling and the chunked decode. `vae_fuse_norms` reads the modulation through `SpatialNorm3D.modulation`,
so its compiled kernels get y and b made this way too, and combine them themselves. The one-pass combine
replaces `SpatialNorm3D.modulate`, which takes the normalised features, so it applies to whichever norm
made them (`vae_fold_conv_bias` normalises a resnet block's second norm itself, then calls it).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from cogvideox.models.vae_blocks import SpatialNorm3D, resize_latent_to


def modulation_at_latent_size(
    norm: SpatialNorm3D, zq: torch.Tensor, size: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, b) of `norm` for features of `size` (T, H, W): both 1x1x1 convolutions in one, on the latent
    at its own size, then each nearest-resized (see the module's docstring)."""
    convs = (norm.conv_y.conv, norm.conv_b.conv)
    weight = torch.cat([c.weight for c in convs])  # [2 C_f, C_z, 1, 1, 1]
    bias = torch.cat([c.bias for c in convs]) if all(c.bias is not None for c in convs) else None
    y, b = F.conv3d(zq, weight, bias).chunk(2, dim=1)
    return resize_latent_to(y, size), resize_latent_to(b, size)


def _one_pass_modulate(norm: SpatialNorm3D, normed: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
    y, b = norm.modulation(zq, normed.shape[-3:])
    # GroupNorm(f) * y + b, rounded once, in the features' memory layout (channels-last stays so)
    return torch.addcmul(b, normed, y, out=torch.empty_like(normed))


def latent_size_modulation(vae: nn.Module) -> int:
    """Make every `SpatialNorm3D` of `vae` (a `CogVideoXVAE`) compute its modulation at the latent's size
    and combine it in one pass, in place; returns how many. Idempotent; the weights and their keys are
    unchanged (only the modules' methods are replaced, which follows them through deepcopy)."""
    if not (hasattr(vae, "encoder") and hasattr(vae, "decoder")):
        raise TypeError("latent_size_modulation() takes a CogVideoXVAE (or a Pipeline's .vae)")
    norms = [m for m in vae.modules() if isinstance(m, SpatialNorm3D)]
    for norm in norms:
        norm.modulation = types.MethodType(modulation_at_latent_size, norm)
        norm.modulate = types.MethodType(_one_pass_modulate, norm)
    return len(norms)

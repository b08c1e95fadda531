"""Each resnet block's activation written straight into its causal convolution's time-padded input.

A causal 3x3x3 convolution reads its input with the k-1 frames before it in front: the last frames of
the previous chunk (the frame cache) or, at a video's start, copies of the first frame.
`CausalConv3d.forward` builds that padded input by copying the whole activation into it, which the
block's SiLU has just written: one more read and write of a full-size tensor for each of a resnet
block's two convolutions. In the kernel profile of a 5B decode (one H200, torch 2.11, bf16; BENCHMARKS.md)
those copies (then concatenations) take 98 ms of the 2199 ms, most of them these.

`pad_in_place(vae)` makes each resnet block allocate the padded input first (`padded_like`) and have
SiLU write into its tail (`aten::silu.out`), then lets the convolution fill the k-1 padding frames in
front (`CausalConv3d.conv_padded`, which its own `forward` uses too): the same tensor without the copy
of the activation, and without the activation's own allocation beside it (one full-size tensor less at
the block's peak). The frame cache keeps the same frames. SiLU is the same function of each value; where
it writes differs: on the CPU, PyTorch's vectorised loop and its scalar loop for each channel's remainder
round exp differently, so a few values differ in their last bit (measured: 1e-6 relative on the test
VAE's decodes and encodes in fp32, the tests allow 1e-5); a CUDA kernel computes every element alike, so
there the decode should be the exact path's to the bit (the GPU ladder reports the error). Predicted:
60-90 ms off a 5B decode (not measured on a GPU yet; off by default).

Composes with the other VAE levers: the norms inside are whichever they are (`vae_parallel_norms`,
`vae_latent_modulation`), the convolution whichever it is (`vae_conv2d`), channels-last activations give
a channels-last padded input; blocks under `vae_fuse_norms` keep its compiled kernel, which pads itself.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from cogvideox.models.vae_blocks import CausalConv3d, ConvCache, ResnetBlock3D, _normalize, padded_like

from .vae import _fused_norm_act_conv


def _norm_silu_into_padded(
    block: ResnetBlock3D, norm: nn.Module, conv: CausalConv3d, x: torch.Tensor, zq, cache: ConvCache | None
) -> torch.Tensor:
    """`conv(F.silu(norm(x[, zq])), cache)`, with SiLU writing into the convolution's time-padded input."""
    h = _normalize(norm, x, zq)
    padded = padded_like(h, conv.time_pad)
    torch.ops.aten.silu.out(h, out=padded[:, :, conv.time_pad :])
    return conv.conv_padded(padded, cache)


def pad_in_place(vae: nn.Module) -> int:
    """Make every resnet block of `vae` (a `CogVideoXVAE`) write its SiLU into its convolutions' padded
    inputs, in place; returns how many blocks. Idempotent; blocks under `vae_fuse_norms` are left to it."""
    if not (hasattr(vae, "encoder") and hasattr(vae, "decoder")):
        raise TypeError("pad_in_place() takes a CogVideoXVAE (or a Pipeline's .vae)")
    blocks = [m for m in vae.modules() if isinstance(m, ResnetBlock3D)]
    if any(block.act is not F.silu for block in blocks):
        raise ValueError("pad_in_place() needs the SiLU activation of the CogVideoX VAEs")
    changed = 0
    for block in blocks:
        fused = getattr(block.norm_act_conv, "__func__", None) is _fused_norm_act_conv
        if fused or any(conv.time_pad == 0 for conv in (block.conv1, block.conv2)):
            continue
        block.norm_act_conv = types.MethodType(_norm_silu_into_padded, block)
        changed += 1
    return changed

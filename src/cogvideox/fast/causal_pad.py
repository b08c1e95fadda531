"""Each resnet block's activation written straight into its causal convolution's time-padded input.

A causal 3x3x3 convolution reads its input with the k-1 frames before it in front: the last frames of
the previous chunk (the frame cache) or, at a video's start, copies of the first frame.
`CausalConv3d.forward` builds that padded input with `torch.cat`, a copy of the whole activation, which
the block's SiLU has just written: one more read and write of a full-size tensor for each of a resnet
block's two convolutions. In the kernel profile of a 5B decode (one H200, torch 2.11, bf16; BENCHMARKS.md)
the concatenations take 98 ms of the 2199 ms, most of them these.

`pad_in_place(vae)` makes each resnet block allocate the padded input first and have SiLU write into
its tail (`aten::silu.out`), then copy only the k-1 padding frames in front: the same tensor without
the copy of the activation, and without the activation's own allocation beside it (one full-size tensor
less at the block's peak). The frame cache keeps the same frames. SiLU is the same function of each
value; where it writes differs: on the CPU, PyTorch's vectorised loop and its scalar loop for each
channel's remainder round exp differently, so a few values differ in their last bit (measured: 1e-6
relative on the test VAE's decodes and encodes in fp32, the tests allow 1e-5); a CUDA kernel computes every element alike, so there the decode should be the exact
path's to the bit (the GPU ladder reports the error). Predicted: 60-90 ms off a 5B decode (not measured
on a GPU yet; off by default).

Composes with the other VAE levers: the norms inside are whichever they are (`vae_parallel_norms`,
`vae_latent_modulation`), the convolution whichever it is (`vae_conv2d`), channels-last activations give
a channels-last padded input; blocks under `vae_fuse_norms` keep its compiled kernel, which pads itself.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from cogvideox.models.vae_blocks import CausalConv3d, ConvCache, ResnetBlock3D, _normalize

from .vae import _fused_resnet_forward


def _layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format of a 5D activation (channels-last 3D where it is that and not also plain)."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def silu_then_conv(h: torch.Tensor, conv: CausalConv3d, cache: ConvCache | None) -> torch.Tensor:
    """`conv(F.silu(h), cache)`, with SiLU writing into the convolution's time-padded input."""
    pad = conv.time_pad
    b, c, t, height, width = h.shape
    padded = torch.empty((b, c, t + pad, height, width), dtype=h.dtype, device=h.device, memory_format=_layout(h))
    body = padded[:, :, pad:]
    torch.ops.aten.silu.out(h, out=body)
    past = cache.get(conv) if cache is not None else None
    if past is not None:
        padded[:, :, :pad].copy_(past)
    else:  # a video's start: the first frame repeated
        padded[:, :, :pad].copy_(body[:, :, :1].expand(-1, -1, pad, -1, -1))
    if cache is not None:
        cache[conv] = padded[:, :, -pad:].clone()  # as CausalConv3d keeps it: the last k-1 frames it saw
    return conv.conv(padded)


def _forward(block: ResnetBlock3D, x: torch.Tensor, cache: ConvCache | None = None, zq=None) -> torch.Tensor:
    h = silu_then_conv(_normalize(block.norm1, x, zq), block.conv1, cache)
    h = silu_then_conv(_normalize(block.norm2, h, zq), block.conv2, cache)
    if block.conv_shortcut is not None:
        x = block.conv_shortcut(x)
    return h + x


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
        fused = getattr(block.forward, "__func__", None) is _fused_resnet_forward
        if fused or any(conv.time_pad == 0 for conv in (block.conv1, block.conv2)):
            continue
        block.forward = types.MethodType(_forward, block)
        changed += 1
    return changed

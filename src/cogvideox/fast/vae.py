"""Channels-last VAE: the 3D convolutions run on [B, T, H, W, C] memory instead of [B, C, T, H, W].

The decoder's time is almost all convolution: 315 TFLOP of 3x3x3 and 3x3 convolutions for 49
frames at 480x720 (278 of them in the last two stages, at 256 and 128 channels on 240x360 and 480x720
frames). NVIDIA's tensor-core convolution kernels read channels-last (NDHWC) tensors; given
channels-first ones, cuDNN transposes them or picks a slower kernel. The reference decodes in 2.28 s on
an H100, about 138 TFLOP/s, a seventh of what the same GPU gives a bf16 matrix product.

`channels_last(vae)` stores every convolution weight channels-last and hands the encoder and decoder
their input chunks channels-last. The layers between the convolutions (norms, nearest upsampling, the
frame cache's concatenation, per-frame 2D convolutions) keep that layout, so no convolution converts
its input (a test checks this); the result comes back in the usual layout. The arithmetic is the same:
only the order of the sums inside a convolution may differ, so the result matches the exact path to
rounding (a test holds it at 1e-5 relative in fp32).
"""

from __future__ import annotations

import torch
from torch import nn

FORMATS = {3: torch.channels_last_3d, 2: torch.channels_last}


def channels_last(vae: nn.Module) -> int:
    """Convert `vae` (a `CogVideoXVAE`) in place to channels-last; returns how many convolutions it holds.

    Idempotent: a second call changes nothing. Moving the VAE to another device or dtype afterwards keeps
    the layout; loading a state dict by assignment replaces the weights with channels-first ones (the
    result stays right, only slower), so convert after loading.
    """
    if not (hasattr(vae, "encoder") and hasattr(vae, "decoder")):
        raise TypeError("channels_last() takes a CogVideoXVAE (or a Pipeline's .vae)")
    convs = [m for m in vae.modules() if isinstance(m, nn.Conv3d | nn.Conv2d)]
    for conv in convs:
        layout = FORMATS[3 if isinstance(conv, nn.Conv3d) else 2]
        conv.weight.data = conv.weight.data.contiguous(memory_format=layout)  # no copy when it already is
    for part in (vae.encoder, vae.decoder):
        if not getattr(part, "channels_last", False):
            # Hooks rather than a wrapped `forward`: they follow the module through deepcopy.
            part.register_forward_pre_hook(_input_channels_last)
            part.register_forward_hook(_output_contiguous)
            part.channels_last = True
    return len(convs)


def _input_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last_3d), *args[1:])


def _output_contiguous(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()

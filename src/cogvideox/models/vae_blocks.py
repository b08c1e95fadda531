"""Building blocks of the CogVideoX 3D causal VAE.

Every temporal convolution is causal: an output frame sees only its own and earlier input frames. That
is what lets the VAE encode and decode a video a few frames at a time, carrying the last input frames
of each convolution from one chunk to the next (the frame cache), and what makes the first frame of a
video an image of its own: 4k+1 frames compress to k+1 latent frames.

Tensors are `[B, C, T, H, W]` throughout. Attribute names are the official state-dict keys.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_conv

# Each causal convolution's last k-1 (padded) input frames, carried from one frame chunk to the next.
# Keyed by the convolution module; a fresh dict per video (or per tile) that is updated in place, so a
# convolution's previous cache is released as soon as it has been consumed.
ConvCache = dict[nn.Module, torch.Tensor]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "gelu": F.gelu,
    "relu": F.relu,
}

# Inputs larger than this are convolved in overlapping time chunks. The reference splits above 2 GiB of
# fp16 (2**30 elements) because cuDNN fails or over-allocates on larger 3D convolutions; the result is
# the same convolution.
MAX_CONV_ELEMENTS = 2**30


class SafeConv3d(nn.Conv3d):
    """A `Conv3d` that runs very large inputs as several convolutions over overlapping frame ranges, and
    a single video on the CPU through oneDNN (`cpu_conv`)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        return cpu_conv.conv3d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor, *, bias: torch.Tensor | None | str = "own") -> torch.Tensor:
        """The convolution of x, with the layer's own bias ("own", what `nn.Conv3d` adds), none (None) or
        `bias` [C_out] in its place: a seam for `cogvideox.fast.conv_bias`, which moves biases elsewhere."""
        bias = self.bias if isinstance(bias, str) else bias
        k = self.kernel_size[0]
        out_frames = x.shape[2] - k + 1
        time_is_plain = self.stride[0] == 1 and self.dilation[0] == 1 and self.padding[0] == 0
        if x.numel() <= MAX_CONV_ELEMENTS or not time_is_plain or out_frames < 2:
            return self._conv_forward(x, self.weight, bias)  # what `nn.Conv3d.forward` does, with `bias`
        parts = min(x.numel() // MAX_CONV_ELEMENTS + 1, out_frames)
        edges = [out_frames * i // parts for i in range(parts + 1)]
        # Output frames [a, b) read input frames [a, b + k - 1).
        outputs = [self._conv_forward(x[:, :, a : b + k - 1], self.weight, bias) for a, b in pairwise(edges)]
        return torch.cat(outputs, dim=2)


class CausalConv3d(nn.Module):
    """3D convolution over the current and past frames only.

    The k-1 frames before the input are copies of its first frame at the start of a video, or the last
    k-1 frames the same convolution saw in the previous chunk when `cache` holds them; so a video
    convolved chunk by chunk gives the same result as in one go. Height and width are zero-padded to keep
    their size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.time_pad = kernel_size - 1
        space_pad = kernel_size // 2
        self.conv = SafeConv3d(in_channels, out_channels, kernel_size, padding=(0, space_pad, space_pad))

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None, *, add_bias: bool = True) -> torch.Tensor:
        """The causal convolution of x; `add_bias=False` leaves out the layer's bias (see `conv_padded`)."""
        if self.time_pad == 0:
            return self.conv(x) if add_bias else self.conv(x, bias=None)
        padded = padded_like(x, self.time_pad)
        padded[:, :, self.time_pad :].copy_(x)
        return self.conv_padded(padded, cache, add_bias=add_bias)

    def conv_padded(
        self, padded: torch.Tensor, cache: ConvCache | None = None, *, add_bias: bool = True
    ) -> torch.Tensor:
        """The convolution of `padded` [B, C, k-1 + T, H, W] (`padded_like`), whose last T frames hold the
        input: its first k-1 frames are filled here (the previous chunk's last frames from `cache`, else
        the first input frame repeated) and `cache` takes this input's last k-1 frames. A seam for the
        decode levers (`cogvideox.fast.causal_pad` writes the activation into the input frames itself;
        `cogvideox.fast.conv_bias` convolves with `add_bias=False` and adds the bias in the norm after)."""
        pad = self.time_pad
        past = cache.get(self) if cache is not None else None
        front = past if past is not None else padded[:, :, pad : pad + 1].expand(-1, -1, pad, -1, -1)
        padded[:, :, :pad].copy_(front)
        if cache is not None:
            # A copy, so the cache does not keep the whole padded input alive until the next chunk.
            cache[self] = padded[:, :, -pad:].clone()
        return self.conv(padded) if add_bias else self.conv(padded, bias=None)


def padded_like(x: torch.Tensor, pad: int) -> torch.Tensor:
    """An uninitialised [B, C, pad + T, H, W] tensor for x [B, C, T, H, W] with `pad` frames in front, in
    x's memory layout (channels-last too, see cogvideox.fast.vae; a tensor that is both, a single frame,
    counts as channels-first)."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
    b, c, t, h, w = x.shape
    return torch.empty((b, c, pad + t, h, w), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)  # fmt: skip


def resize_latent_to(zq: torch.Tensor, size: torch.Size | tuple[int, int, int]) -> torch.Tensor:
    """Nearest-resize the latent `zq` [B, C, F, h, w] to feature size `(T, H, W)`.

    With an odd frame count above one, the first frame was encoded on its own (causally), so the first
    latent frame is resized to the first frame and the rest to the rest.
    """
    frames, height, width = size
    if frames > 1 and frames % 2 == 1:
        first = F.interpolate(zq[:, :, :1], size=(1, height, width))
        rest = F.interpolate(zq[:, :, 1:], size=(frames - 1, height, width))
        return torch.cat([first, rest], dim=2)
    return F.interpolate(zq, size=(frames, height, width))


class SpatialNorm3D(nn.Module):
    """Decoder normalization conditioned on the latent (arXiv 2209.09002): GroupNorm(f) * y(zq) + b(zq)."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, f_channels, eps=1e-6)
        # Kernel-1 causal convs need no past frames, hence no cache.
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1)

    def modulation(self, zq: torch.Tensor, size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale y and shift b [B, C_f, T, H, W] for features of `size` (T, H, W). A seam for the
        decode levers (`cogvideox.fast.modulation` computes them at the latent's size)."""
        zq = resize_latent_to(zq, size)  # [B, C_z, T, H, W]
        return self.conv_y(zq), self.conv_b(zq)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        return self.modulate(self.norm_layer(f), zq)

    def modulate(self, normed: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """`normed * y + b` for the normalised features `normed`: a seam for the decode levers
        (`cogvideox.fast.modulation` combines them in one pass; `cogvideox.fast.conv_bias` normalises
        the features itself, then calls this)."""
        y, b = self.modulation(zq, normed.shape[-3:])
        return normed * y + b


class ResnetBlock3D(nn.Module):
    """norm -> act -> causal conv, twice, plus a (1x1x1-projected when channels change) shortcut.

    Encoder blocks normalize with GroupNorm; decoder blocks (`zq_channels` set) with `SpatialNorm3D`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        eps: float,
        act: Callable[[torch.Tensor], torch.Tensor],
        zq_channels: int | None = None,
    ):
        super().__init__()
        self.act = act
        if zq_channels is None:
            self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
            self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_channels, zq_channels, groups)
            self.norm2 = SpatialNorm3D(out_channels, zq_channels, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = SafeConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm_act_conv(self.norm1, self.conv1, x, zq, cache)
        h = self.norm_act_conv(self.norm2, self.conv2, h, zq, cache)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x

    def norm_act_conv(
        self, norm: nn.Module, conv: CausalConv3d, x: torch.Tensor, zq: torch.Tensor | None, cache: ConvCache | None
    ) -> torch.Tensor:
        """`conv(act(norm(x[, zq])), cache)`: a seam for the decode levers (`cogvideox.fast.vae.fuse_norms`
        fuses the norm, activation and padding; `cogvideox.fast.causal_pad` writes the activation into the
        convolution's padded input)."""
        return conv(self.act(_normalize(norm, x, zq)), cache)


def _normalize(norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
    return norm(x) if zq is None else norm(x, zq)


def on_frames(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D layer to every frame of `x` [B, C, T, H, W]."""
    b, t = x.shape[0], x.shape[2]
    y = layer(x.transpose(1, 2).flatten(0, 1))  # [B*T, C', H', W']
    return y.unflatten(0, (b, t)).transpose(1, 2)


def halve_frames(x: torch.Tensor) -> torch.Tensor:
    """Average consecutive frame pairs; with an odd count the first frame stays alone: T -> 1 + (T-1)/2."""

    def pair_mean(v: torch.Tensor) -> torch.Tensor:
        return (v[:, :, 0::2] + v[:, :, 1::2]) / 2

    if x.shape[2] % 2 == 0:
        return pair_mean(x)
    if x.shape[2] == 1:
        return x
    return torch.cat([x[:, :, :1], pair_mean(x[:, :, 1:])], dim=2)


def double_size(x: torch.Tensor, with_time: bool) -> torch.Tensor:
    """Nearest 2x in height and width, and in time too if `with_time` (a lone first frame is not doubled)."""
    frames = x.shape[2]
    if not with_time or frames == 1:
        return F.interpolate(x, scale_factor=(1, 2, 2))
    if frames % 2 == 1:
        first = F.interpolate(x[:, :, :1], scale_factor=(1, 2, 2))
        return torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2)], dim=2)
    return F.interpolate(x, scale_factor=2)


class Downsample3D(nn.Module):
    """Halve H and W with a stride-2 3x3 conv per frame; with `compress_time`, first halve the frames."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time:
            x = halve_frames(x)
        x = F.pad(x, (0, 1, 0, 1))  # right and bottom only, as the checkpoints were trained
        return on_frames(self.conv, x)  # [B, C, T, H/2, W/2]


class Upsample3D(nn.Module):
    """Double H and W (and with `compress_time` the frames) by nearest repeat, then a 3x3 conv per frame."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return on_frames(self.conv, double_size(x, self.compress_time))


class DownBlock3D(nn.Module):
    """An encoder stage: resnet blocks at one resolution, then (except in the last stage) a downsample."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        eps: float,
        act: Callable[[torch.Tensor], torch.Tensor],
        add_downsample: bool,
        compress_time: bool,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps, act)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample3D(out_channels, compress_time)]) if add_downsample else None

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock3D(nn.Module):
    """A decoder stage: latent-conditioned resnet blocks, then (except in the last stage) an upsample."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        eps: float,
        act: Callable[[torch.Tensor], torch.Tensor],
        zq_channels: int,
        add_upsample: bool,
        compress_time: bool,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps, act, zq_channels)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels, compress_time)]) if add_upsample else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache, zq)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock3D(nn.Module):
    """Two resnet blocks at the bottleneck (latent-conditioned in the decoder)."""

    def __init__(
        self,
        channels: int,
        groups: int,
        eps: float,
        act: Callable[[torch.Tensor], torch.Tensor],
        zq_channels: int | None = None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(channels, channels, groups, eps, act, zq_channels) for _ in range(2)
        )

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None, zq: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache, zq)
        return x

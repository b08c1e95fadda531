"""Speed levers for the VAE: channels-last convolutions, 3D convolutions run as 2D ones, and the layers
between the convolutions fused.

These levers were built on the belief that the decoder's time is almost all convolution (315 TFLOP of
3x3x3 and 3x3 convolutions for 49 frames at 480x720). The kernel profile says otherwise (one H200, torch
2.11, bf16, 5B decoder; BENCHMARKS.md): cuDNN runs those convolutions in 427 ms of the 2199 ms decode,
already on its NHWC tensor-core kernels, and GroupNorm's statistics kernel alone takes 803 ms. The
levers for that are in `group_norm.py`, `modulation.py` and `causal_pad.py`; the two convolution levers
here lost.

`channels_last(vae)` stores every convolution weight channels-last and hands the encoder and decoder
their input chunks channels-last. The layers between the convolutions (norms, nearest upsampling, the
frame cache's concatenation, per-frame 2D convolutions) keep that layout, so no convolution converts
its input (a test checks this); the result comes back in the usual layout. The arithmetic is the same:
only the order of the sums inside a convolution may differ, so the result matches the exact path to
rounding (a test holds it at 1e-5 relative in fp32).

`as_conv2d(vae)` runs every 3D convolution as one 2D convolution over the frames folded into the batch,
the kt frames each output frame reads stacked on the channel axis: cuDNN's 2D implicit-GEMM kernels
are the most tuned it has, its 3D ones much less so. Composes with `channels_last`, where folding the
frames into the batch costs nothing.

`fuse_norms(vae)` replaces what each resnet block does between its convolutions (GroupNorm, the
decoder's latent scale and shift, SiLU, the causal time padding and the frame cache's copy: five eager
operators, each a pass over the activations) by one compiled function. The three levers compose.

Measured (BENCHMARKS.md, one H200, torch 2.11, 5B decoder, 13 latent frames to 49 x 480 x 720, bf16):
channels-last made the decode 2.3x slower (4.87 s against 2.16 s channels-first, the reference 2.12 s),
with cuDNN's algorithm search too; in the profile the elementwise layers between the convolutions take
the strided path on channels-last tensors (529 -> 1915 ms), the convolutions themselves unchanged. The
2D convolutions took the decode from 2.2 to 4.1 s (1.9 s of stacking copies, 26 ms less convolution).
No lever here is on by default; channels-last stays for the PyTorch and cuDNN versions where the
published gains on other causal-3D VAEs were seen, the fused norms until measured.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from cogvideox.models.vae_blocks import (
    MAX_CONV_ELEMENTS,
    CausalConv3d,
    ConvCache,
    ResnetBlock3D,
    SpatialNorm3D,
)

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


def as_conv2d(vae: nn.Module) -> int:
    """Run each 3D convolution of `vae` (a `CogVideoXVAE`) as a 2D convolution, in place; returns how many.

    Output frame t of a convolution whose kernel spans kt frames is sum over dt of conv2d(input frame
    t + dt, W[:, :, dt]). That sum is computed as one 2D convolution over the output frames folded into
    the batch, whose input holds the kt frames each output frame reads stacked on the channel axis:
    [B * T', kt * C, H, W] against the weight permuted to [C_out, kt * C, kh, kw]. Convolutions with
    kt = 1 (the 1x1x1 projections) become a plain 2D convolution of the frames stacked as rows, a view of
    the input in either layout, no copy.

    One stacked product rather than kt products added together: at the decoder's last stage (128 channels,
    480 x 720, chunks of 8 output frames from 10 padded ones, 88 MB per frame in bf16) the stacked copy
    is 2.1 GB written once and read once, while kt = 3 products would each write the 0.7 GB output and
    two additions read two and write one, nine passes over the output (6.4 GB). The stacked product also
    sums all kt * kh * kw taps in one GEMM's fp32 accumulator and rounds once, as the 3D kernel does;
    added products round each partial sum to bf16 first (three roundings), and each is a GEMM three times
    shorter (K = 9 C rather than 27 C). The price is memory: the stacked copy lives during its product,
    capped at 2**30 elements (2 GiB in bf16; larger inputs run in parts over their frames: the last
    stage's first convolution, 256 channels in at 480 x 720, runs 4 frames at a time), above a peak of
    about 10.7 GiB for the whole 480 x 720 decode. Over that decode the stacked copies read 81-192 GB
    and write 192 GB, the products read 111 GB more than the 3D ones, and on channels-first activations
    the outputs' transposing copies move 110 GB (`benchmarks/vae_work.py --conv2d`): 0.1-0.2 s of an
    H200's bandwidth, against the 284 TFLOP of 3x3x3 convolutions (of 315) that move to the 2D kernels.

    The stacked copy is written channels-last (NHWC) and the weight read so, the layout cuDNN's
    tensor-core kernels take without converting; the result has the input's layout. On channels-last
    activations (`channels_last(vae)` first or after) the output is a free view; on channels-first ones
    the output frames come back through one transposing copy (folding frames into the batch cannot be a
    view of an NCTHW tensor, whichever way the sum is split).

    The frame cache and the causal time padding are untouched (they happen before the convolution, in
    `CausalConv3d`); so are the weights, their state-dict keys and loading: the 2D weight is a copy of
    the 3D one made at each call (14 MB for the largest), so loading, casting or training the 3D
    weights works as before. Idempotent. The result matches the exact path to rounding.
    """
    if not (hasattr(vae, "encoder") and hasattr(vae, "decoder")):
        raise TypeError("as_conv2d() takes a CogVideoXVAE (or a Pipeline's .vae)")
    convs = [m for m in vae.modules() if isinstance(m, nn.Conv3d)]
    for conv in convs:
        plain_time = conv.stride[0] == 1 and conv.dilation[0] == 1 and conv.padding[0] == 0
        if not plain_time or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"as_conv2d() needs convolutions without time stride, padding or groups, got {conv}")
    for conv in convs:
        conv.forward = types.MethodType(_conv3d_as_2d, conv)
    return len(convs)


def _prefers_channels_last(t: torch.Tensor) -> bool:
    # Tensors with a single frame and pixel, or a single channel, are both layouts at once: channels-first.
    return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()


def _conv3d_as_2d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for x [B, C, T, H, W], by 2D convolutions (see `as_conv2d`)."""
    kt, kh, kw = conv.kernel_size
    b, c, frames, h, w = x.shape
    out_frames = frames - kt + 1
    layout = torch.channels_last_3d if _prefers_channels_last(x) or _prefers_channels_last(conv.weight) else None
    if kt == kh == kw == 1 and conv.stride == (1, 1, 1) and conv.padding == (0, 0, 0):
        # Frames stacked as rows: [B, C, T * H, W], a view in either layout.
        y = F.conv2d(x.flatten(2, 3), conv.weight.flatten(2, 3), conv.bias).unflatten(2, (frames, h))
        return y.contiguous(memory_format=layout or torch.contiguous_format)
    # [C_out, C, kt, kh, kw] -> [C_out, kt * C, kh, kw], channel dt * C + c (a 14 MB copy at most).
    weight = conv.weight.transpose(1, 2).flatten(1, 2).contiguous(memory_format=torch.channels_last)
    per_frame = b * kt * c * h * w
    step = max(1, MAX_CONV_ELEMENTS // per_frame)
    parts = []
    for start in range(0, out_frames, step):
        stop = min(start + step, out_frames)
        # Output frames [start, stop) read input frames [start, stop + kt - 1): their windows, stacked.
        windows = x[:, :, start : stop + kt - 1].unfold(2, kt, 1)  # [B, C, T'', H, W, kt], a view
        stacked = windows.permute(0, 2, 3, 4, 5, 1).reshape(b * (stop - start), h, w, kt * c)  # the copy
        y = F.conv2d(
            stacked.permute(0, 3, 1, 2), weight, conv.bias, conv.stride[1:], conv.padding[1:], conv.dilation[1:]
        )  # [B * T'', C_out, H', W'], NHWC in memory
        parts.append(y.unflatten(0, (b, stop - start)).transpose(1, 2))  # [B, C_out, T'', H', W']
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return y.contiguous(memory_format=layout or torch.contiguous_format)


def _norm_act_pad(
    x: torch.Tensor,
    past: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    groups: int,
    eps: float,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm (times the latent's scale plus its shift, in the decoder), SiLU, and the causal time
    padding of the convolution that follows: the padded input and its last `pad` frames for the cache.
    Compiled, its reads and writes are about half those of the eager operators."""
    h = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        h = h * scale + shift
    h = F.silu(h)
    front = [past] if past is not None else [h[:, :, :1]] * pad
    padded = torch.cat([*front, h], dim=2)
    return padded, padded[:, :, -pad:].clone()


@functools.cache
def _fused_norm_act_pad():
    """The compiled `_norm_act_pad` and the compiler settings it runs under, made on first use (importing
    the compiler takes seconds, which a run without `vae_fuse_norms` should not pay)."""
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:  # pragma: no cover - older or newer PyTorch
        fx_config = None
    # One graph per channel count (GroupNorm fixes it), frame cache or not, and layout: more than
    # Dynamo's default limit of 8 graphs per function, after which it would quietly run the eager code.
    graphs = torch._dynamo.config.patch(recompile_limit=64)
    # Without this, sizes that happen to be equal in the first call (3 frames of 3 rows) are assumed
    # equal for good, and the next size recompiles.
    # (A private setting: where a PyTorch lacks it, sizes may only recompile more often.)
    shapes = (
        fx_config.patch(use_duck_shape=False) if hasattr(fx_config, "use_duck_shape") else contextlib.nullcontext()
    )
    return torch.compile(_norm_act_pad, dynamic=True), graphs, shapes


def _norm_then_conv(norm: nn.Module, conv: CausalConv3d, x, zq, cache: ConvCache | None) -> torch.Tensor:
    """`conv(silu(norm(x, zq)), cache)` of a resnet block, with the work between them fused."""
    # One layout for every input, that of the convolution's weights: the compiled code is specialised
    # to its inputs' layouts (an upsampler's output is a transposed view, and a CPU's 3D convolution
    # returns channels-first results whatever its inputs). No copy where a tensor already has it.
    last_3d = conv.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    layout = torch.channels_last_3d if last_3d else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    if isinstance(norm, SpatialNorm3D):
        group_norm = norm.norm_layer
        scale, shift = (t.contiguous(memory_format=layout) for t in norm.modulation(zq, x.shape[-3:]))
    else:
        group_norm, scale, shift = norm, None, None
    past = cache.get(conv) if cache is not None else None
    fused, graphs, shapes = _fused_norm_act_pad()
    with graphs, shapes:
        padded, last = fused(
            x, past, group_norm.weight, group_norm.bias, scale, shift, group_norm.num_groups, group_norm.eps,
            conv.time_pad,
        )  # fmt: skip
    if cache is not None:
        cache[conv] = last
    return conv.conv(padded)


def _fused_norm_act_conv(block: ResnetBlock3D, norm: nn.Module, conv: CausalConv3d, x, zq, cache) -> torch.Tensor:
    return _norm_then_conv(norm, conv, x, zq, cache)


def fuse_norms(vae: nn.Module) -> int:
    """Fuse each resnet block's norm, activation and time padding into one compiled kernel (in place);
    returns how many blocks.

    Those layers move about 960 GB in a full-size decode (see benchmarks/vae_work.py), the fused
    function about half of that. It takes symbolic sizes, so it compiles once per channel count, with and
    without a frame cache (the first chunk has none), whatever the frame, height and width: six graphs
    for the released decoder (512, 256 and 128 channels), at the first decode. The arithmetic is that of
    the eager layers, with the intermediate results kept in fp32 rather than rounded to the model's
    dtype between layers (a test bounds the difference).
    """
    if not (hasattr(vae, "encoder") and hasattr(vae, "decoder")):
        raise TypeError("fuse_norms() takes a CogVideoXVAE (or a Pipeline's .vae)")
    blocks = [m for m in vae.modules() if isinstance(m, ResnetBlock3D)]
    if any(block.act is not F.silu for block in blocks):
        raise ValueError("fuse_norms() needs the SiLU activation of the CogVideoX VAEs")
    for block in blocks:
        block.norm_act_conv = types.MethodType(_fused_norm_act_conv, block)
        block.offload_as_one = True  # it reads its norms' weights directly: offloading moves them together
    return len(blocks)

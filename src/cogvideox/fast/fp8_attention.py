"""FP8 attention through FlashAttention-3's FP8 forward kernel (Shah et al. 2024, arXiv 2407.08608).

The exact step of 5B on an H200 is now bound by its matrix products and its attention kernel
(BENCHMARKS.md: compiled with fp8 linears and FlashAttention-3, 1047.8 ms, of which attention about
657 ms). Hopper's tensor cores run e4m3 products at twice the bf16 rate, and the FlashAttention-3 builds
(the fa3-fwd wheel included) carry FP8 forward kernels for heads of 64 channels. This backend feeds them.

The math, per (sample, head):
- K is smoothed first: its mean over the tokens is subtracted, which adds the same q·mean(k) to every
  logit of a query and so changes nothing after the softmax (as SageAttention does, `sage.smooth_keys`),
  but removes the per-channel offset that norm_k's bias gives every key, which a per-head scale would
  spend its range on.
- Q, K and V are quantised to float8 e4m3 with one scale per (sample, head): scale = max|x| / 448 (e4m3's
  largest value), x / scale rounded to the nearest e4m3 value. The kernel takes the scales back as its
  "descale" factors ([B, heads] fp32) and multiplies them into the fp32 scores and the output.
- The kernel: scores from the e4m3 products in fp32, the online softmax in fp32, P in e4m3 for the P·V
  product with fp32 accumulation, the output in bf16.

`fp8_attention_emulated(q, k, v)` computes this in plain PyTorch on any device. Its P is the kernel's:
for FP8, FlashAttention-3's softmax subtracts 8 from the running maximum before its exp2, so the
numerators lie in [0, 256] and use more of e4m3's range (numerators down to about 1e-5 of the largest
survive, rather than flushing to zero below 2e-3), and it sums the rows from the fp32 numerators. The
emulation rounds against each row's final maximum, where the kernel's online softmax rounds against the
running maximum of the key blocks seen so far: the same values up to which e4m3 neighbour a numerator
lands on. The GPU check (`benchmarks/speed.py
--attention-kernels`) compares the kernel with the emulation on a slice of the 5B shape.

Measured error of the emulation against exact attention (SDPA in float64), relative L2, on q, k, v as
the model makes them (`model_like` in tests/test_fast_fp8_attention.py: LayerNorm'd q and k of 64
channels, norm_k's bias a per-channel offset of 5 standard normals, 700 tokens, 2 heads, seeds 0-4), and
SageAttention's emulation on the same inputs, in BENCHMARKS.md ("FP8 attention"). Inference only: the
kernel has no backward.

`fa3_fp8_attend(q, k, v)`: the model's attention seam on [B, heads, L, d] bf16. The smoothing and the
quantisation are PyTorch operations outside the kernel's op, so that a compiled block (`compile.py`)
fuses them with the RoPE and norms that make q and k; the kernel is the custom op
`cogvideox::fa3_fp8_attention`, one opaque call, on transposed views (FlashAttention's [B, L, heads, d]
with the heads' channels contiguous), its output returned as a transposed view as `flash3.fa3_attend`'s.
"""

from __future__ import annotations

import torch

from cogvideox.errors import InputError

from . import flash3
from .sage import smooth_keys

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite float8 e4m3 value
P_OFFSET = 2.0**8  # the softmax numerators' scale before they are rounded to e4m3, as the kernel's
HEAD_DIMS = (64, 96, 128, 192, 256)  # the FP8 forward kernels the builds carry
MAX_SCORES = 2**24  # fp32 scores the emulation holds at once (64 MiB); queries are chunked to fit


# ----------------------------------------------------------------------------------------------------
# The math: pure functions of tensors


def quantize_e4m3_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, heads, L, d] -> (float8 e4m3 [B, heads, L, d] in x's memory layout, fp32 scale [B, heads]):
    one scale max|x| / 448 per (sample, head), and x / scale rounded to the nearest e4m3 value; x is
    about e4m3 * scale. A head of zeros gets the smallest normal scale (its values stay zeros)."""
    scale = (x.abs().amax(dim=(-2, -1)).float() / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale[..., None, None]).to(E4M3), scale


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth: bool = True):
    """q, k (smoothed unless `smooth=False`), v [B, heads, L, d] -> their e4m3 values and scales, as
    (q8, k8, v8, q_scale, k_scale, v_scale). K is smoothed in fp32 and quantised from there, with no
    rounding to its own dtype between: what a compiled block computes when it fuses the two, so that
    eager and compiled runs quantise the same values (up to the order of the mean's sums)."""
    q8, q_scale = quantize_e4m3_heads(q)
    k8, k_scale = quantize_e4m3_heads(smooth_keys(k.float()) if smooth else k)
    v8, v_scale = quantize_e4m3_heads(v)
    return q8, k8, v8, q_scale, k_scale, v_scale


def fp8_core(q8, k8, v8, q_scale, k_scale, v_scale, dtype=torch.bfloat16) -> torch.Tensor:
    """Attention of e4m3 q8, k8, v8 [B, heads, L, d] with their [B, heads] scales, as the FP8 kernel
    computes it (see the module's docstring) -> [B, heads, L, d] in `dtype`. Queries in chunks, so that
    the fp32 scores never exceed MAX_SCORES."""
    B, H, Lq, d = q8.shape
    L = k8.shape[-2]
    score_scale = (q_scale * k_scale * d**-0.5)[..., None, None]  # [B, H, 1, 1]
    k_t = k8.float().transpose(-1, -2)  # [B, H, d, L]
    v32 = v8.float()
    rows = max(1, MAX_SCORES // (B * H * L))
    out = torch.empty(B, H, Lq, d, dtype=dtype, device=q8.device)
    for start in range(0, Lq, rows):
        part = slice(start, min(start + rows, Lq))
        scores = (q8[:, :, part].float() @ k_t) * score_scale  # [B, H, n, L]
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * P_OFFSET
        total = p.sum(dim=-1, keepdim=True)  # of the fp32 numerators
        p8 = p.to(E4M3).float()
        out[:, :, part] = ((p8 @ v32) / total * v_scale[..., None, None]).to(dtype)
    return out


def fp8_attention_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth: bool = True) -> torch.Tensor:
    """The FP8 kernel's math on q, k, v [B, heads, L, d] (any device, dtype and head size) -> [B, heads, L,
    d] in q's dtype. `smooth=False` quantises K as it is (to measure what smoothing is for)."""
    return fp8_core(*quantize_qkv(q, k, v, smooth), dtype=q.dtype)


# ----------------------------------------------------------------------------------------------------
# The kernel: FlashAttention-3's FP8 forward, one custom op


def check_inputs(head_dim: int, dtype: torch.dtype) -> None:
    """Raise `InputError` for a head size or model dtype the FP8 kernels do not serve."""
    if head_dim not in HEAD_DIMS:
        raise InputError(
            f"the fa3-fp8 attention backend takes heads of {', '.join(map(str, HEAD_DIMS))} channels; this "
            f"model's have {head_dim}. Use 'fa3-fp8-emulated' for its math at any size, or 'auto'"
        )
    if dtype != torch.bfloat16:
        raise InputError(
            f"the fa3-fp8 attention backend returns bf16, for bf16 models; this one is "
            f"{str(dtype).removeprefix('torch.')} (load it with dtype bf16)"
        )


@torch.library.custom_op("cogvideox::fa3_fp8_attention", mutates_args=())
def fa3_fp8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale: torch.Tensor, k_descale: torch.Tensor,
    v_descale: torch.Tensor,
) -> torch.Tensor:
    """FP8 attention of q, k, v [B, L, heads, d] float8 e4m3 (last dimension contiguous) with their
    [B, heads] fp32 scales -> [B, L, heads, d] bf16, contiguous, softmax scale 1/sqrt(d)."""
    kernel = flash3.load_kernel()
    out = kernel(
        q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        softmax_scale=q.shape[-1] ** -0.5, causal=False,
    )[0]
    return out.contiguous()


@fa3_fp8_attention.register_fake
def _(q, k, v, q_descale, k_descale, v_descale) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=torch.bfloat16)


@torch.library.custom_op("cogvideox::fp8_attention_emulated", mutates_args=())
def fp8_attention_emulated_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`fp8_attention_emulated` as one opaque op: a compiled block runs the emulation's roundings (which a
    compiler could fuse away) without compiling the emulation."""
    return fp8_attention_emulated(q, k, v)


@fp8_attention_emulated_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


def fa3_fp8_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The model's attention seam on [B, heads, L, d]: K smoothed and q, k, v quantised in PyTorch (fused
    into a compiled block), the kernel on transposed views, its output back as one."""
    q8, k8, v8, q_scale, k_scale, v_scale = quantize_qkv(q, k, v)
    out = fa3_fp8_attention(
        q8.transpose(1, 2), k8.transpose(1, 2), v8.transpose(1, 2),
        q_scale.contiguous(), k_scale.contiguous(), v_scale.contiguous(),
    )
    return out.transpose(1, 2)


"""8-bit attention as SageAttention computes it (Zhang et al. 2024, arXiv 2410.02367): Q·K^T in INT8 with
the keys smoothed first, P·V in fp16.

Attention is half of a 5B step's FLOPs, and on tensor cores an INT8 product runs at twice the rate of a
bf16 one. The paper's observations that make 8 bits accurate enough:
- K carries a large offset shared by all tokens (per channel), which per-block INT8 scales would spend
  their resolution on. Subtracting the mean of K over the tokens (per batch and head) removes it and
  changes nothing: it adds the same q·mean(k) to every logit of a query, and softmax ignores constants.
- Q and K are quantised symmetrically per block of tokens (Q: 128, K: 64, the kernel's tiles), scale
  max|x| / 127; the softmax scale 1/sqrt(d) is folded into Q before quantising. The integer products are
  exact (|q k| <= 127^2 * d fits an int32, and an fp32 for d <= 1040), then multiplied by both scales.
- P (softmax numerators, in [0, 1]) and V go to fp16 for the P·V product: 8 bits would lose too much of
  P's small values. The kernel accumulates each 64-key block's P·V in fp16 and sums the blocks in fp32.

Two ways to run it:
- `sage_attention(q, k, v)`: the `sageattention` package's Triton kernel (version 1.0.6, CUDA), registered
  as the custom op `cogvideox::sage_attention` so that a compiled block (`fast/compile.py`, fullgraph) keeps
  it as one opaque call. K is smoothed before the op, in PyTorch (the package would smooth it in place,
  which an op may not do to its input); the package casts V to fp16 itself.
- `sage_attention_emulated(q, k, v)`: the same math in plain PyTorch on any device (fp32 products of the
  integer and fp16 values), queries in chunks so that the scores never exceed a fixed size; an opaque op
  too (`cogvideox::sage_attention_emulated`), so that compiled blocks keep its numbers. The kernel
  computes exp2 with log2(e) folded into Q's scale (the same numbers up to fp32 rounding); the emulation
  rounds each 64-key block's P·V to fp16 once, where the tensor cores may round more often (after each
  16-key instruction).

Measured error of the emulation against exact attention (SDPA in float64), relative L2, on q and k out
of LayerNorms of 64 channels as the model makes them, norm_k's bias holding a per-channel offset of 5
times a standard normal (`model_like` in tests/test_fast_sage.py: 700 tokens, 2 heads, seeds 0-4):
1.2-1.3e-2 with smoothing, 2.9-3.9e-2 without; with bf16 inputs 1.2-1.3e-2, where bf16 SDPA is 2.0e-3
from exact (2026-11-30, torch 2.13.0+cpu). Almost all of it is the INT8 Q·K^T: fp16 P·V alone is 2.4e-4.
On the demo model, generation with it against exact attention: BENCHMARKS.md. Inference only: the
kernel has no backward.
"""

from __future__ import annotations

import math

import torch

from cogvideox.errors import InputError

Q_BLOCK = 128  # tokens of Q per INT8 scale (the kernel's query tile)
K_BLOCK = 64  # tokens of K per INT8 scale (the kernel's key tile), and keys per fp16 P·V accumulation
INT8_MAX = 127
HEAD_DIMS = (64, 128)  # what the package's main kernel takes (96 has a kernel of its own, not emulated here)
MAX_SCORES = 2**24  # fp32 scores held at once by the emulation (64 MiB); queries are chunked to fit


# ----------------------------------------------------------------------------------------------------
# The math: pure functions of tensors


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """k [B, heads, L, d] minus its mean over the L tokens, in k's dtype (as the kernel's caller does)."""
    return k - k.mean(dim=-2, keepdim=True)


def quantize_int8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., L, d] -> (int8 [..., L, d], fp32 scale [..., ceil(L / block)]): each run of `block` tokens
    shares one scale max|x| / 127, and x / scale is rounded to the nearest integer, halves away from zero
    (as the kernel rounds). The last block may be shorter."""
    *lead, L, d = x.shape
    blocks = math.ceil(L / block)
    x = x.float()
    padded = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - L))  # zeros change no maximum
    scale = padded.view(*lead, blocks, block * d).abs().amax(dim=-1) / INT8_MAX  # [..., blocks]
    scaled = x / expand_blocks(scale.clamp(min=1e-30), block, L)[..., None]
    q = torch.trunc(scaled + 0.5 * torch.where(scaled >= 0, 1.0, -1.0))
    return q.to(torch.int8), scale


def expand_blocks(scale: torch.Tensor, block: int, length: int) -> torch.Tensor:
    """Per-block values [..., blocks] -> per-token values [..., length]."""
    return scale.repeat_interleave(block, dim=-1)[..., :length]


def sage_attention_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth: bool = True) -> torch.Tensor:
    """SageAttention's math on q, k, v [B, heads, L, d] (any device, any dtype, any head size) -> [B, heads,
    L, d] in q's dtype: K smoothed, Q (softmax scale folded in) and K in INT8 per block, softmax in fp32,
    P and V in fp16 with each 64-key block's product rounded to fp16 and the blocks summed in fp32.
    `smooth=False` quantises K as it is (to measure what smoothing is for)."""
    B, H, Lq, d = q.shape
    L = k.shape[-2]
    q_int, q_scale = quantize_int8_blocks(q.float() * d**-0.5, Q_BLOCK)
    k_int, k_scale = quantize_int8_blocks(smooth_keys(k) if smooth else k, K_BLOCK)
    q_rows = expand_blocks(q_scale, Q_BLOCK, Lq)[..., None]  # [B, H, Lq, 1]
    k_cols = expand_blocks(k_scale, K_BLOCK, L)[..., None, :]  # [B, H, 1, L]
    k_t = k_int.float().transpose(-1, -2)  # [B, H, d, L]
    blocks = math.ceil(L / K_BLOCK)
    # V in fp16, as [B, H, blocks, 64, d] (zero keys past the end add nothing)
    v16 = torch.nn.functional.pad(v.to(torch.float16), (0, 0, 0, blocks * K_BLOCK - L))
    v16 = v16.view(B, H, blocks, K_BLOCK, d).float()

    rows = max(1, MAX_SCORES // (B * H * L))
    out = torch.empty(B, H, Lq, d, dtype=q.dtype, device=q.device)
    for start in range(0, Lq, rows):
        part = slice(start, min(start + rows, Lq))
        scores = (q_int[:, :, part].float() @ k_t) * q_rows[:, :, part] * k_cols  # [B, H, n, L], exact integers first
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        total = p.sum(dim=-1, keepdim=True)  # of the fp32 numerators, as the kernel sums them
        p16 = torch.nn.functional.pad(p.to(torch.float16), (0, blocks * K_BLOCK - L))
        p16 = p16.view(B, H, -1, blocks, K_BLOCK).transpose(2, 3).float()  # [B, H, blocks, n, 64]
        partial = (p16 @ v16).to(torch.float16)  # [B, H, blocks, n, d]: each block's fp16 accumulator
        out[:, :, part] = (partial.float().sum(dim=2) / total).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# The kernel: the sageattention package, one custom op


def load_kernel():
    """The package's `sageattn`, or `InputError` saying how to install it."""
    try:
        from sageattention import sageattn
    except ImportError as e:
        if e.name not in (None, "sageattention"):  # installed, but what it imports is not (Triton)
            raise InputError(
                f"the sage attention backend could not import the sageattention package ({e}); its kernels "
                "run on the Triton that CUDA builds of PyTorch ship"
            ) from None
        raise InputError(
            "the sage attention backend needs the sageattention package: pip install 'cogvideox[fast]' "
            "(sageattention==1.0.6)"
        ) from None
    return sageattn


def check_inputs(head_dim: int, dtype: torch.dtype) -> None:
    """Raise `InputError` for a head size or dtype the kernel does not take."""
    if head_dim not in HEAD_DIMS:
        raise InputError(
            f"the sage attention backend takes heads of {' or '.join(map(str, HEAD_DIMS))} channels; this model's "
            f"have {head_dim}. Use 'sage-emulated' for its math at any size, or 'auto'"
        )
    if dtype not in (torch.bfloat16, torch.float16):
        raise InputError(
            f"the sage attention backend runs bf16 or fp16 models; this one is {str(dtype).removeprefix('torch.')} "
            "(load it with dtype bf16)"
        )


@torch.library.custom_op("cogvideox::sage_attention_emulated", mutates_args=())
def sage_attention_emulated_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`sage_attention_emulated` as one opaque op: a compiled block runs the emulation's exact numbers (its
    roundings are the point; a compiler could fuse them away) without compiling the emulation itself."""
    return sage_attention_emulated(q, k, v)


@sage_attention_emulated_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("cogvideox::sage_attention", mutates_args=())
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The package's kernel on q, k, v [B, heads, L, d] bf16/fp16 (k smoothed already: `smooth_keys`) ->
    [B, heads, L, d], contiguous, in q's dtype."""
    check_inputs(q.shape[-1], q.dtype)
    return load_kernel()(q, k, v, tensor_layout="HND", is_causal=False, smooth_k=False)


@sage_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)

"""FlashAttention-3's forward kernel (Shah et al. 2024, arXiv 2407.08608) as an attention backend.

The same exact softmax attention as the SDPA backends (bf16 in and out, fp32 scores and accumulators, the
sums in another order), written for Hopper: producer warps feed the tensor cores through the bulk-copy
engine while consumer warps run the asynchronous wgmma products, and the softmax of one tile overlaps the
products of the next. At a 5B step's shape (B=2, 48 heads, 17,776 tokens, heads of 64 channels) attention
is about 767 ms of the 1414 ms compiled step on an H200 at cuDNN's 425 TFLOP/s, so every 10% the kernel
gains is about 5% of the step. PyTorch 2.11's SDPA has no FlashAttention-3 (its "flash" backend is
FlashAttention-2, 326 TFLOP/s on an H100 here).

Two builds provide it, both with `_flash_attn_forward(q, k, v, ..., softmax_scale=, causal=)` on
[B, L, heads, d] tensors whose last dimension is contiguous, returning the output first:
- `flash_attn_interface`: the flash-attention repository's `hopper/` folder, built from source;
- `fa3_fwd_interface`: the `fa3-fwd` wheel (PyPI; Linux x86-64, CUDA 13, PyTorch 2.10 or newer through
  its stable ABI): that code's forward kernels alone, bf16 only (no fp16).

`fa3_attention` wraps the kernel as the custom op `cogvideox::fa3_attention`, so that a compiled block
(`compile.py`, fullgraph) keeps it as one opaque call. The model's attention works on [B, heads, L, d];
the backend hands the kernel transposed views of them (no copy: the heads' channels stay contiguous) and
returns the kernel's [B, L, heads, d] output as a transposed view, which the model's output projection
reads back as [B, L, heads x d] without a copy either. Inference only: the op has no backward.
"""

from __future__ import annotations

import torch

from cogvideox.errors import InputError

MODULES = ("flash_attn_interface", "fa3_fwd_interface")  # the source build first, then the wheel
INSTALL = (
    "pip install 'cogvideox[fast]' (the fa3-fwd wheel: Linux x86-64, CUDA 13), or build the hopper/ folder of "
    "the flash-attention repository"
)
MAX_HEAD_DIM = 256


def load_kernel():
    """The first FlashAttention-3 build that imports: its `_flash_attn_forward`, or `InputError` saying how
    to install one (and why an installed one did not import)."""
    return load_build()[1]


def load_build():
    """(module name, `_flash_attn_forward`) of the first build that imports; `InputError` as `load_kernel`."""
    broken = []
    for name in MODULES:
        try:
            module = __import__(name)
        except ImportError as e:
            if e.name != name:  # installed, but what it loads is not (its CUDA library, PyTorch's ABI)
                broken.append(f"{name}: {e}")
            continue
        except Exception as e:  # a shared library that does not load, an operator that does not register
            broken.append(f"{name}: {e}")
            continue
        return name, module._flash_attn_forward
    if broken:
        raise InputError(
            f"the fa3 attention backend found FlashAttention-3 but could not load it ({'; '.join(broken)})"
        )
    raise InputError(f"the fa3 attention backend needs FlashAttention-3: {INSTALL}")


def check_inputs(head_dim: int, dtype: torch.dtype, build: str | None = None) -> None:
    """Raise `InputError` for a head size or dtype the kernel does not take (`build`: the module that
    provides it, when known: the fa3-fwd wheel has no fp16 kernels)."""
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        raise InputError(
            f"the fa3 attention backend takes heads of at most {MAX_HEAD_DIM} channels, a multiple of 8; this "
            f"model's have {head_dim}. Use 'auto'"
        )
    if dtype not in (torch.bfloat16, torch.float16):
        raise InputError(
            f"the fa3 attention backend runs bf16 (or, with a source build, fp16) models; this one is "
            f"{str(dtype).removeprefix('torch.')} (load it with dtype bf16)"
        )
    if dtype == torch.float16 and build == "fa3_fwd_interface":
        raise InputError(
            "the fa3 attention backend's fa3-fwd wheel has no fp16 kernels; load the model with dtype bf16, or "
            "build flash-attention's hopper/ folder"
        )


@torch.library.custom_op("cogvideox::fa3_attention", mutates_args=())
def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q, k, v [B, L, heads, d] (bf16/fp16, last dimension contiguous) -> [B, L, heads,
    d], contiguous, in q's dtype, with the softmax scale 1/sqrt(d)."""
    build, kernel = load_build()
    check_inputs(q.shape[-1], q.dtype, build)
    out = kernel(q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=False)[0]
    return out.contiguous()  # the builds allocate it so; the fake below promises it


@fa3_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


def fa3_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The model's attention seam on [B, heads, L, d]: the kernel on transposed views, its output back as
    one (a view of a contiguous [B, L, heads, d] tensor)."""
    return fa3_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

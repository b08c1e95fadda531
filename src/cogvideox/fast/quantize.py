"""Quantised linear layers for the transformer blocks, swapped in from outside (as gpt-fast does).

int8 weight-only: each weight row (output channel) is stored as int8 with one scale, max|w| / 127, and
the activations stay in the model dtype: y = (x @ q^T) * scale + bias. It halves the weight memory of a
bf16 model; speed comes only when torch.compile fuses the int8 -> bf16 cast into the matrix product.

fp8 (Ada / Hopper, compute capability 8.9+): weights and activations in float8 e4m3 with row-wise scales
(one per weight output row, one per activation token, each max|row| / 448), multiplied by
`torch._scaled_mm` with fp32 accumulation into bf16. Row-wise scales keep one outlier token or channel from
crushing the resolution of all the others, which a single per-tensor scale would do. `emulate=True` runs
the same quantisation in plain PyTorch (fp32 products of the dequantised values) on any device, which is
how the CPU tests check the math.

Only the linears of the transformer blocks are quantised: the patch and timestep embeddings and the output
projection are a negligible share of the FLOPs and the most sensitive to error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cogvideox.errors import InputError

KINDS = ("int8", "fp8")
INT8_MAX = 127
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


# ----------------------------------------------------------------------------------------------------
# The math: pure functions of tensors


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 [N, K], fp32 scale [N]) with w ~ q * scale[:, None], |error| <= scale / 2."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    q = torch.round(w.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], fp32 scale [...]): each row scaled so its largest magnitude is 448,
    the largest finite e4m3 value, then rounded to nearest (3 mantissa bits: relative error <= 2^-4).

    The numbers are those of `x.float().abs().amax(-1)` and `x.float() / scale`, without a full-size fp32
    copy of x: abs and max are exact in bf16 and fp16, so only the row maxima are cast, and the division
    casts x inside its kernel (type promotion). Without torch.compile to fuse them, each fp32 copy of a
    5B block's activations is one more pass over ~0.4 GB per fp8 linear.
    """
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        x = x.float()  # float64: the fp32 rounding comes first, as in the definition
    scale = x.abs().amax(dim=-1).float().clamp(min=1e-12) / FP8_MAX
    q = torch.div(x, scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of the row-wise quantisers: q [..., K] * scale [...] in fp32."""
    return q.float() * scale[..., None]


def fp8_linear_emulated(x, weight, weight_scale, bias=None) -> torch.Tensor:
    """What the fp8 kernel computes, in plain fp32: x [..., K] quantised per token, weight [N, K] e4m3."""
    x_q, x_scale = quantize_fp8_rows(x)
    y = dequantize_rows(x_q, x_scale) @ dequantize_rows(weight, weight_scale).T
    y = y.to(x.dtype)
    return y if bias is None else y + bias


def fp8_linear_scaled_mm(x, weight, weight_scale, bias=None) -> torch.Tensor:
    """The fp8 tensor-core product (CUDA, capability 8.9+): row-wise scaled `torch._scaled_mm`, bf16 out."""
    shape = x.shape
    x_q, x_scale = quantize_fp8_rows(x.reshape(-1, shape[-1]))  # [M, K], [M]
    # mat2 must be column-major: weight [N, K] row-major, transposed, is exactly that.
    y = torch._scaled_mm(
        x_q, weight.t(), scale_a=x_scale[:, None], scale_b=weight_scale[None, :], out_dtype=torch.bfloat16
    )
    y = y.reshape(*shape[:-1], -1).to(x.dtype)
    return y if bias is None else y + bias


def fp8_supported(device: torch.device | str) -> bool:
    """True on a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


# ----------------------------------------------------------------------------------------------------
# The layers


class Int8WeightOnlyLinear(nn.Module):
    """A linear layer with int8 weights and one scale per output channel; activations unquantised.

    Buffers: `weight` int8 [N, K], `scale` [N] and `bias` [N] in the compute dtype.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8_rows(linear.weight.detach())
        dtype = linear.weight.dtype
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the output columns instead of the weight rows avoids a dequantised weight copy;
        # under torch.compile the int8 -> x.dtype cast fuses into the matrix product.
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Fp8Linear(nn.Module):
    """A linear layer with e4m3 weights (row-wise scales) and activations quantised per token at run time.

    Buffers: `weight` e4m3 [N, K], `scale` fp32 [N], `bias` [N] in the compute dtype. `emulate` selects the
    plain-PyTorch path (any device) instead of `torch._scaled_mm`.
    """

    def __init__(self, linear: nn.Linear, emulate: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if not emulate and (self.in_features % 16 or self.out_features % 16):
            raise ValueError(f"fp8 matrix products need sizes divisible by 16, got {self.in_features}x{self.out_features}")
        q, scale = quantize_fp8_rows(linear.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.emulate = emulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = fp8_linear_emulated if self.emulate else fp8_linear_scaled_mm
        return fn(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        mode = "emulated" if self.emulate else "scaled_mm"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 row-wise ({mode})"


# ----------------------------------------------------------------------------------------------------
# Rewriting a model


def _targets(model: nn.Module, kind: str) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every linear to quantise: those of the transformer blocks. fp8 skips
    the AdaLN modulation linears, whose input is one row per sample (too few rows for the fp8 kernel and
    a negligible share of the work); int8 takes them too, since they hold 14% of the 5B weights."""
    root = getattr(model, "transformer_blocks", model)
    found = []
    for name, module in root.named_modules():
        for child_name, child in module.named_children():
            if type(child) is not nn.Linear:
                continue
            path = f"{name}.{child_name}"
            if ".lora_" in f".{path}":
                continue  # a LoRA's adapters (trained, or folded already) stay as they are
            if kind == "fp8" and (".norm1." in f".{path}" or ".norm2." in f".{path}"):
                continue
            found.append((module, child_name, child))
    return found


def check_quantize(kind: str | None, device: torch.device | str, emulate: bool = False) -> None:
    """Raise `InputError` for an unknown kind, or fp8 where no fp8 tensor cores exist."""
    if kind is None:
        return
    if kind not in KINDS:
        raise InputError(f"unknown quantisation {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "fp8" and not emulate and not fp8_supported(device):
        where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device)
        raise InputError(
            f"--quantize fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); "
            f"this run is on {where}. Use --quantize int8 instead"
        )


def quantize(model: nn.Module, kind: str, *, emulate: bool = False, device: torch.device | str | None = None) -> int:
    """Replace the linears of `model`'s transformer blocks by int8 weight-only or fp8 layers (in place);
    returns how many were replaced. `emulate` (fp8 only) uses the plain-PyTorch math on any device.
    `device`: where the model will compute (default: where its parameters are, unless offloaded)."""
    param = next(model.parameters())
    check_quantize(kind, param.device if device is None else device, emulate)
    if kind == "fp8" and not emulate and param.dtype != torch.bfloat16:
        raise InputError(f"--quantize fp8 runs a bf16 model; this one is {str(param.dtype).removeprefix('torch.')}")
    targets = _targets(model, kind)
    for parent, name, linear in targets:
        layer = Int8WeightOnlyLinear(linear) if kind == "int8" else Fp8Linear(linear, emulate=emulate)
        setattr(parent, name, layer)
    return len(targets)


def quantize_text_encoder(model: nn.Module, kind: str = "int8") -> int:
    """Replace the linears of T5's encoder blocks (attention q, k, v, o and the gated feed-forward) by int8
    weight-only layers, in place, as the model card's INT8 does for the text encoder; returns how many.
    T5-XXL's 4.76 G parameters hold 8.9 GiB in bf16, 4.6 GiB so. A layer transformers keeps in fp32 while
    the rest is half precision (T5's `wo` in fp16, against overflow) stays as it is: its int8 product
    would run in fp16 again. The states change by rounding only (see the tests' bound)."""
    check_text_quantize(kind)
    blocks = model.encoder.block
    dtype = model.shared.weight.dtype
    count = 0
    for parent in blocks.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == dtype:
                setattr(parent, name, Int8WeightOnlyLinear(child))
                count += 1
    return count


def check_text_quantize(kind: str | None) -> None:
    """Raise `InputError` for a text-encoder quantisation other than None or "int8"."""
    if kind not in (None, "int8"):
        raise InputError(f"the text encoder is quantised to int8 (weight-only) only, not {kind!r}")

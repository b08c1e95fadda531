"""Speed levers applied to a loaded model from outside: it stays ignorant of them, and each one is
tested against the exact path.

    from cogvideox import fast
    fast.apply(pipe, quantize="int8", compile=True, cache=0.1)

- `fuse.py`: one QKV matrix product instead of three (same math, rounding-level differences).
- `attention.py`: the SDPA backend (cuDNN first on CUDA), FlashAttention-3's forward kernel (`flash3.py`,
  exact, Hopper; what "auto" runs for inference where it is installed), or 8-bit attention (`sage.py`:
  INT8 Q·K^T, fp16 P·V, SageAttention's kernel on CUDA, its math emulated in plain PyTorch anywhere;
  `fp8_attention.py`: e4m3 Q, K, V, FlashAttention-3's FP8 kernel on Hopper, its math emulated anywhere).
- `quantize.py`: int8 weight-only or fp8 (row-wise scaled) linear layers.
- `compile.py`: regional torch.compile, one compiled block reused by all.
- `cache.py`: first-block step cache, skipping the other blocks on steps that barely change.
- `vae.py`: the VAE's convolutions on channels-last memory (`vae_channels_last(pipe.vae)`), its 3D
  convolutions run as 2D ones over the frames (`vae_conv2d(pipe.vae)`), and its norm, activation and
  time padding fused into one compiled kernel (`vae_fuse_norms(pipe.vae)`).
- `group_norm.py`: the VAE's GroupNorm statistics by PyTorch's generic reductions, which split each
  group over the whole GPU where GroupNorm's own kernel gives it one thread block
  (`vae_parallel_norms(pipe.vae)`).
- `modulation.py`: the decoder norms' latent scale and shift convolved at the latent's size, then
  resized, and combined with the normalised features in one pass (`vae_latent_modulation(pipe.vae)`).
- `causal_pad.py`: each resnet block's SiLU written straight into its causal convolutions' time-padded
  inputs, without the copy of the activation that padding takes (`vae_pad_in_place(pipe.vae)`).
- `conv_bias.py`: each resnet block's first convolution without its bias add, the bias taken by the
  GroupNorm after it (and the second's by the shortcut's projection, where there is one)
  (`vae_fold_conv_bias(pipe.vae)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cogvideox.errors import InputError

from .attention import auto_chose_fa3, check_backend, use_attention_backend
from .cache import StepCache, add_step_cache, check_threshold
from .causal_pad import pad_in_place as vae_pad_in_place
from .compile import MODES, compile_blocks
from .conv_bias import fold_conv_bias as vae_fold_conv_bias
from .fuse import fuse_qkv as fuse_qkv_layers
from .group_norm import parallel_norms as vae_parallel_norms
from .modulation import latent_size_modulation as vae_latent_modulation
from .quantize import check_quantize, check_text_quantize, quantize as quantize_model, quantize_text_encoder
from .vae import as_conv2d as vae_conv2d, channels_last as vae_channels_last, fuse_norms as vae_fuse_norms

__all__ = [
    "Acceleration", "StepCache", "apply", "check_options", "quantize_text_encoder", "vae_channels_last", "vae_conv2d",
    "vae_fold_conv_bias", "vae_fuse_norms", "vae_latent_modulation", "vae_pad_in_place", "vae_parallel_norms",
]


@dataclass
class Acceleration:
    """What `apply` did to a transformer; `cache` holds the step cache (its counters) when one is on."""

    fuse_qkv: bool = False
    attention: str | None = None
    attention_kernel: str | None = None  # what "auto" chose, when not PyTorch's SDPA ("fa3")
    quantize: str | None = None
    compile: str | None = None  # the torch.compile mode, "default" for plain `compile=True`
    cache: StepCache | None = None
    quantize_text: str | None = None  # T5's linears (`Pipeline.accelerate`; `apply` leaves T5 alone)
    folded_loras: tuple[str, ...] = ()  # the LoRAs `Pipeline.accelerate` folded into the weights for good

    def describe(self) -> str:
        parts = []
        if self.quantize:
            parts.append(f"{self.quantize} linears")
        if self.quantize_text:
            parts.append(f"{self.quantize_text} T5")
        if self.fuse_qkv:
            parts.append("fused QKV")
        if self.attention:
            kernel = f" ({self.attention_kernel})" if self.attention_kernel else ""
            parts.append(f"{self.attention} attention{kernel}")
        if self.compile:
            parts.append(f"compiled blocks ({self.compile})")
        if self.cache is not None:
            parts.append(f"step cache {self.cache.threshold:g}")
        return ", ".join(parts) or "none"


def _compile_mode(compile: bool | str) -> str | None:
    if compile is True:
        return "default"
    if compile is False or compile is None:
        return None
    if compile not in MODES:
        raise InputError(f"unknown compile mode {compile!r}; use one of {', '.join(m for m in MODES if m)}")
    return compile


def check_options(
    device: torch.device | str,
    *,
    quantize: str | None = None,
    compile: bool | str = False,
    cache: float | None = None,
    attention: str | None = None,
    quantize_text: str | None = None,
) -> None:
    """Raise `InputError` for options that cannot work on `device`, before any model is loaded."""
    check_quantize(quantize, device)
    check_text_quantize(quantize_text)
    _compile_mode(compile)
    if cache is not None:
        check_threshold(cache)
    if attention is not None:
        check_backend(attention, device)


def apply(
    target,
    *,
    fuse_qkv: bool = True,
    attention: str | None = "auto",
    quantize: str | None = None,
    compile: bool | str = False,
    cache: float | None = None,
    emulate_fp8: bool = False,
    device: torch.device | str | None = None,
) -> Acceleration:
    """Rewrite a `Pipeline`'s transformer (or a `CogVideoXTransformer`) in place for speed.

    fuse_qkv: one QKV projection per block. attention: SDPA backend ("auto" = FlashAttention-3 for
    inference on a Hopper GPU with it installed, else cuDNN, flash, efficient, math in that order; None
    leaves PyTorch's choice), "fa3" (FlashAttention-3's exact forward kernel,
    CUDA, bf16; inference only), or "sage" (8-bit attention, lossy: the sageattention package on CUDA,
    bf16/fp16) or "sage-emulated" (its math in plain PyTorch), or "fa3-fp8" (FlashAttention-3's FP8
    kernel, lossy, Hopper, bf16) or "fa3-fp8-emulated" (its math in plain PyTorch).
    quantize: None, "int8" (weight-only) or "fp8" (CUDA capability 8.9+, bf16 model; `emulate_fp8` runs
    its math in plain PyTorch anywhere, for tests).
    compile: True or a torch.compile mode, regional (per block). cache: a first-block cache threshold
    (0 computes every step; ~0.05-0.2 skip steps). Order: fuse, quantise, attention, compile, cache.
    A transformer is accelerated once; load a fresh one to change the options. device: where the
    transformer will compute, for the fp8 and attention checks (default: where its parameters are; give
    it when they rest in host memory for offloading, as `Pipeline.accelerate` does).
    """
    transformer = getattr(target, "transformer", target)
    if not isinstance(transformer, nn.Module) or not hasattr(transformer, "transformer_blocks"):
        raise TypeError("apply() takes a Pipeline or a CogVideoXTransformer")
    if getattr(transformer, "acceleration", None) is not None:
        raise InputError("this model is already accelerated; load a fresh one to change the options")
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    mode = _compile_mode(compile)
    check_quantize(quantize, device, emulate_fp8)
    if cache is not None:
        check_threshold(cache)
    if attention is not None:
        check_backend(attention, device)

    record = Acceleration()
    if fuse_qkv:
        record.fuse_qkv = fuse_qkv_layers(transformer) > 0
    if quantize is not None:
        quantize_model(transformer, quantize, emulate=emulate_fp8, device=device)
        record.quantize = quantize
    if attention is not None:
        use_attention_backend(transformer, attention, device)
        record.attention = attention
        if attention == "auto" and auto_chose_fa3(transformer):
            record.attention_kernel = "fa3"
    if mode is not None:
        compile_blocks(transformer, None if mode == "default" else mode, eager_past_limit=True)
        record.compile = mode
    if cache is not None:
        record.cache = add_step_cache(transformer, cache)
    transformer.acceleration = record
    return record

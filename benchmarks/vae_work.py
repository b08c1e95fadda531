"""What a full-size VAE decode asks of a GPU: convolution FLOPs per stage and memory traffic per operator.

    python benchmarks/vae_work.py                 # 13 latent frames -> 49 x 480 x 720, bf16
    python benchmarks/vae_work.py --latent 13x60x90 --dtype fp32
    python benchmarks/vae_work.py --conv2d          # with cogvideox.fast.vae_conv2d: what its copies add

Runs the decode on the meta device (no memory, no arithmetic, seconds on any machine) and counts, for
every operator call, the bytes of its tensor inputs and outputs (each read or written once: a lower
bound, GroupNorm reads its input twice), and for every convolution 2 x output elements x input channels x
kernel volume FLOPs. Divided by a GPU's rates, these say how much of a measured decode time the
convolutions explain and how much the layers between them do. Writes vae_work.json under $OUT (or the
current folder) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cogvideox import fast
from cogvideox.models.config import VAEConfig
from cogvideox.models.vae import CogVideoXVAE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import latent_arg  # noqa: E402

# Operators that only re-describe memory (no bytes move).
VIEWS = {"view", "_unsafe_view", "expand", "slice", "transpose", "unsqueeze", "squeeze", "t", "detach", "alias",
         "unflatten", "split", "select", "permute", "as_strided", "chunk", "unfold"}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Traffic(TorchDispatchMode):
    """Bytes of tensor inputs and outputs per operator."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes[name] = self.bytes.get(name, 0) + sum(t.numel() * t.element_size() for t in tensors)
        return out


def count(config: VAEConfig, latent: tuple[int, int, int], dtype: torch.dtype, conv2d: bool = False) -> dict:
    with torch.device("meta"):
        vae = CogVideoXVAE(config).to(dtype).eval()
    if conv2d:
        fast.vae_conv2d(vae)  # the FLOPs stay those of the 3D convolutions (the hooks sit on them)
    flops: dict[str, int] = {}
    for name, module in vae.decoder.named_modules():
        if isinstance(module, nn.Conv3d | nn.Conv2d):
            parts = name.split(".")
            stage = ".".join(parts[:2]) if parts[0] == "up_blocks" else parts[0]

            def hook(m, args, out, stage=stage):
                work = 2 * out.numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
                flops[stage] = flops.get(stage, 0) + work

            module.register_forward_hook(hook)
    z = torch.randn(1, config.latent_channels, *latent, device="meta", dtype=dtype)
    traffic = Traffic()
    with torch.no_grad(), traffic:
        video = vae.decode(z)
    return {
        "latent": list(latent), "video": list(video.shape), "dtype": str(dtype), "conv2d": conv2d,
        "conv_tflop_per_stage": {k: round(v / 1e12, 1) for k, v in flops.items()},
        "conv_tflop": round(sum(flops.values()) / 1e12, 1),
        "gb_per_operator": {k: round(v / 1e9, 1) for k, v in sorted(traffic.bytes.items(), key=lambda kv: -kv[1])},
        "gb_outside_convolutions": round(sum(v for k, v in traffic.bytes.items() if k != "convolution") / 1e9, 1),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=latent_arg, default="13x60x90",
                   help="latent frames x height x width (default: 49x480x720)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--conv2d", action="store_true", help="count the decode with fast.vae_conv2d (on "
                   "channels-first activations: the meta device's convolutions answer channels-first)")
    args = p.parse_args()
    result = count(VAEConfig(), args.latent, DTYPES[args.dtype], args.conv2d)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_work.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"decode {result['latent']} -> {result['video']}, {args.dtype}{', 2D convolutions' if args.conv2d else ''}")
    print(f"convolutions: {result['conv_tflop']} TFLOP ({result['conv_tflop_per_stage']})")
    print("| operator | GB moved (inputs + outputs) |\n| --- | --- |")
    for name, gb in result["gb_per_operator"].items():
        print(f"| {name} | {gb} |")
    print(f"outside the convolutions: {result['gb_outside_convolutions']} GB")


if __name__ == "__main__":
    main()

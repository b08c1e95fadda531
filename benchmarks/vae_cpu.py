"""The full-size VAE's decode on the CPU, exact against levers, timed in turns: a lever's direction there.

    python benchmarks/vae_cpu.py                                  # 5B VAE, 3 latent frames of 10 x 15, fp32
    python benchmarks/vae_cpu.py --latent 1x20x30 --levers conv2d,conv2d+channels_last --repeat 3
    python benchmarks/vae_cpu.py --levers reference,aten --repeat 2   # against the reference's decode
    python benchmarks/vae_cpu.py --demo --levers reference,aten --repeat 5   # the demo model's narrow VAE

The 5B VAE (its real config, speed.py's random weights; --demo: the demo model's) decodes the same latents
in fp32 with each set of levers (`+`-joined names of fast.vae levers: conv2d, channels_last, fuse_norms),
after one untimed decode each; then --repeat rounds in which every variant decodes once, in turn, so that
the load of a shared machine falls on all of them alike. Reports each variant's fastest and median decode,
its ratio to the exact one and its error against it. Two more variants: `reference`, the reference's VAE
(diffusers) with the same weights, and `aten`, ours with every 3D convolution on the kernel ATen picks (the
reference's), not oneDNN's (`cogvideox.models.cpu_conv`). With --fp64, every variant also decodes once in
fp64: the fp64 levers against the fp64 exact decode show the arithmetic alone (no rounding to speak of), and
each fp32 variant's distance from the fp64 exact decode shows whether a lever's fp32 error is more than the
rounding noise the exact fp32 decode has too. A CPU says nothing of cuDNN's kernels: this shows the
direction on the CPU's own, and that the lever holds at the full width. Writes vae_cpu.json under $OUT (or
the current folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import contextlib

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_full_size import save_json  # noqa: E402
from speed import configs, decode_latents, fresh_vae, host_random_state, latent_arg, rel_l2  # noqa: E402

from cogvideox.models import cpu_conv  # noqa: E402
from cogvideox.models.vae import CogVideoXVAE  # noqa: E402

LEVERS = ("conv2d", "channels_last", "fuse_norms")
OTHERS = ("reference", "aten")  # variants of their own, not combined with levers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=latent_arg, default=None,
                   help="latent frames x height x width (default: 3x10x15; with --demo, its video's 5x8x12)")
    p.add_argument("--demo", action="store_true", help="the demo model's VAE config (narrow) instead of the 5B's")
    p.add_argument("--levers", default="conv2d", help="comma-separated variants, each a +-joined set of levers")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds")
    p.add_argument("--fp64", action="store_true", help="also decode in fp64: errors against the fp64 exact decode")
    args = p.parse_args()
    latent = args.latent or ((5, 8, 12) if args.demo else (3, 10, 15))
    variants = {"exact": {}}
    for name in args.levers.split(","):
        levers = name.split("+")
        if name not in OTHERS and not set(levers) <= set(LEVERS):
            p.error(f"unknown levers in {name!r}; use {', '.join(LEVERS)} (joined by +), or {' or '.join(OTHERS)}")
        variants[name] = dict.fromkeys(levers, True)

    device, dtype = torch.device("cpu"), torch.float32
    if args.demo:
        from cogvideox.demo.build import VAE_CONFIG as vae_config
    else:
        _, vae_config, _, _ = configs("5b", tiny=False)
    with torch.device("meta"):
        template = CogVideoXVAE(vae_config)
    weights = host_random_state(template, device, dtype, seed=2)
    z = decode_latents(vae_config, latent, device, dtype)
    vaes = {name: fresh_vae(vae_config, weights, device, options) for name, options in variants.items()}
    outputs, seconds = {}, {name: [] for name in vaes}

    def decode(name: str, vae, z: torch.Tensor) -> torch.Tensor:
        with cpu_conv.aten_kernels() if name == "aten" else contextlib.nullcontext():
            video = vae.decode(z)
        return video.sample if name == "reference" else video

    with torch.inference_mode():
        for name, vae in vaes.items():
            outputs[name] = decode(name, vae, z)  # untimed: allocations, oneDNN's primitives, compilation
        for _ in range(args.repeat):
            for name, vae in vaes.items():
                start = time.perf_counter()
                decode(name, vae, z)
                seconds[name].append(time.perf_counter() - start)
    truth = {}
    if args.fp64:
        weights64 = {k: v.double() for k, v in weights.items()}
        with torch.inference_mode():
            for name, options in variants.items():
                truth[name] = decode(name, fresh_vae(vae_config, weights64, device, options), z.double())
    exact = min(seconds["exact"])
    result = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "vae": "demo" if args.demo else "5b",
        "latent": list(latent),
        "video": list(outputs["exact"].shape), "dtype": "fp32", "repeat": args.repeat, "variants": {},
    }  # fmt: skip
    for name, times in seconds.items():
        result["variants"][name] = {
            "min_s": round(min(times), 2), "median_s": round(statistics.median(times), 2),
            "min_over_exact": round(min(times) / exact, 3), "rel_l2_vs_exact": rel_l2(outputs[name], outputs["exact"]),
        }  # fmt: skip
        if truth:
            result["variants"][name]["rel_l2_vs_fp64_exact"] = rel_l2(outputs[name], truth["exact"])
            result["variants"][name]["fp64_rel_l2_vs_fp64_exact"] = float(
                f"{((truth[name] - truth['exact']).norm() / truth['exact'].norm()).item():.3g}"
            )
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "vae_cpu.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

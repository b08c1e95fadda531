"""Host memory of a generation's activations on the CPU, against the estimates that guard it.

On the CPU, running out of memory is the kernel killing the process. The pipeline refuses up front a
request whose activations cannot fit in what the host has left, and decodes in tiles when an untiled
decode would not fit (`Pipeline._check_host_room`, `autoencoder.decode_latents`). Both use the estimates
of `cogvideox.fast.memory_plan`, calibrated on a GPU. This script measures, each in a fresh process, the
rise of resident memory over the loaded model while the demo model (or a model folder) denoises one step
(output_type="latent") and while its VAE decodes, and prints them beside the estimates:

    python benchmarks/cpu_activations.py                          # 49 x 480 x 720, the demo model, fp32
    python benchmarks/cpu_activations.py --size 17x240x368 --stage decode

A refusal is only safe where the estimate stays below the measurement (`measured / estimate` >= 1).
Results go to `$OUT/cpu_activations.json` (default: the current folder) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(stage: str, model: str | None, frames: int, height: int, width: int) -> dict:
    """In this process: the peak RSS rise of one stage, and the guard's estimate for it."""
    import torch

    sys.path.insert(0, str(HERE))
    from host_memory import HostPeak, status

    from cogvideox import Pipeline
    from cogvideox.autoencoder import decode_latents
    from cogvideox.fast.memory_plan import activation_bytes, decode_bytes

    pipe = Pipeline.from_pretrained(model)
    vae = pipe.vae
    latent_frames = (frames - 1) // vae.config.temporal_compression + 1
    scale = vae.config.spatial_compression
    if stage == "decode":
        latents = torch.randn(1, latent_frames, pipe.config.latent_channels, height // scale, width // scale)
        estimate = decode_bytes(vae, 1, height, width, pipe.dtype, tiled=False)
        run = lambda: decode_latents(vae, latents, pipe.dtype, pipe._memory_guard)  # noqa: E731
    else:
        itemsize = torch.empty((), dtype=pipe.dtype).element_size()
        estimate = activation_bytes(pipe.config, itemsize, frames, height, width,
                                    temporal_compression=vae.config.temporal_compression,
                                    spatial_compression=scale)["denoise"]  # fmt: skip
        run = lambda: pipe("a red circle", num_frames=frames, height=height, width=width,  # noqa: E731
                           num_inference_steps=1, output_type="latent", seed=0, progress=False)  # fmt: skip
    before = status()["VmRSS"]
    with HostPeak() as peak:
        run()
    rise = peak.rss - before
    return {"stage": stage, "frames": frames, "height": height, "width": width, "dtype": str(pipe.dtype),
            "measured_gib": round(rise / 2**30, 3), "estimate_gib": round(estimate / 2**30, 3),
            "measured_over_estimate": round(rise / estimate, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or hub id (default: the demo model)")
    parser.add_argument("--size", default="49x480x720", help="FRAMESxHEIGHTxWIDTH (default: 49x480x720)")
    parser.add_argument("--stage", choices=("denoise", "decode", "both"), default="both")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's stage
    args = parser.parse_args(argv)
    frames, height, width = (int(v) for v in args.size.split("x"))
    if args.one:
        print(json.dumps(measure(args.one, args.model, frames, height, width)))
        return 0
    rows = []
    for stage in ("denoise", "decode") if args.stage == "both" else (args.stage,):
        command = [sys.executable, __file__, "--size", args.size, "--one", stage]
        if args.model:
            command += ["--model", args.model]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'stage':8} {'size':>12} {'dtype':>14} {'measured GiB':>13} {'estimate GiB':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['stage']:8} {args.size:>12} {r['dtype']:>14} {r['measured_gib']:13.3f} {r['estimate_gib']:13.3f} "
              f"{r['measured_over_estimate']:6.2f}")  # fmt: skip
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_activations.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

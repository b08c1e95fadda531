"""Peak memory of the VAE decode, untiled and tiled, on the CPU or a GPU.

    python benchmarks/decode_memory.py --dir runs/ckpt-5b --latent 5x30x45            # untiled, 240x360
    python benchmarks/decode_memory.py --dir runs/ckpt-5b --latent 5x60x90 --tiled    # tiled, 480x720

The VAE comes from a model folder (`load_memory.py` writes a random-weight one); the latents are random.
The decoder works on a few latent frames at a time (the first chunk takes 3 when the count is odd, as
13 is), so 5 latent frames already reach the peak of a whole 13-frame video. On the CPU the figure is
the highest anonymous memory above the level before decoding, sampled every 2 ms; on a GPU it is
`max_memory_allocated` above the level before. Both count the activations, not the weights. The result
also comes as bytes per output pixel of one frame, the unit of `memory_plan`'s decode estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_memory import HostPeak, status  # noqa: E402

from cogvideox import loading  # noqa: E402

GIB = 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="a model folder (its vae/ is used)")
    p.add_argument("--latent", default="5x30x45", help="latent frames x height x width (default 5x30x45)")
    p.add_argument("--tiled", action="store_true", help="decode in the default tiles")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    frames, height, width = (int(x) for x in args.latent.split("x"))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    vae = loading.load_vae(args.dir, dtype, device)
    for t in vae.parameters():  # page the weights in before the baseline
        float(t.detach().float().sum())
    if args.tiled:
        vae.enable_tiling()
    z = torch.randn(1, vae.config.latent_channels, frames, height, width, generator=torch.Generator().manual_seed(0))
    z = z.to(device, dtype)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = status()["RssAnon"]
    with HostPeak(0.002) as host:
        t0 = time.perf_counter()
        with torch.inference_mode():
            video = vae.decode(z)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else host.anon - base
    pixels = video.shape[-1] * video.shape[-2]
    print(json.dumps({
        "device": str(device), "dtype": args.dtype, "latent": args.latent, "tiled": args.tiled,
        "video": list(video.shape), "seconds": round(seconds, 1), "peak_above_base_gib": round(peak / GIB, 2),
        "bytes_per_pixel": round(peak / pixels), "torch": torch.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()

"""The full-size checkpoint on the CPU: ours and the reference load the same official-layout folder and
sample the same seed; their latents are compared and each stage timed.

    python benchmarks/full_size_cpu.py --variant 5b --dir runs/ckpt-5b     # writes the folder if missing

The folder holds random weights at the released sizes and dtypes (`load_memory.py` writes it), so this
checks every real shape end to end (5B: 42 blocks, 48 heads, 3D RoPE at a size other than the trained
one; 2B: 30 blocks, 30 heads, the sin-cos table recomputed for the size; T5-XXL; the VAE) where the test
suite uses tiny configs. A CPU cannot sample 49 frames at 480x720 in useful time, so the video is small
(9 frames at 64x96 by default): a parity and plumbing check, not a speed figure for the GPU. The weight
files are read once before either pipeline loads, so that both find them in the page cache. Results go
to `$OUT/full_size_cpu_<variant>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_memory import write_checkpoint  # noqa: E402

from cogvideox import loading  # noqa: E402
from cogvideox.pipeline import Pipeline  # noqa: E402

PROMPT = "a panda in a small red jacket plays a guitar in a bamboo forest"


def warm_page_cache(folder: Path) -> float:
    """Read every weight file once, so that neither pipeline's timings include reading the disk (whichever
    ran first would otherwise pay for both). Returns the seconds it took."""
    t0 = time.perf_counter()
    for path in sorted(folder.rglob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - t0


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("5b", "2b"), default="5b")
    p.add_argument("--dir", type=Path, required=True, help="the checkpoint folder (written when missing)")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = p.parse_args()

    if not (args.dir / loading.MODEL_INDEX).is_file():
        write_checkpoint(args.dir, args.variant, tiny=False)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    size = dict(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps)
    result: dict = {"variant": args.variant, "dtype": args.dtype, "torch": torch.__version__, **size}

    result["warm_page_cache_s"] = round(warm_page_cache(args.dir), 1)
    t0 = time.perf_counter()
    ours = Pipeline.from_pretrained(args.dir, dtype=dtype, device="cpu")
    result["ours_load_s"] = round(time.perf_counter() - t0, 1)
    out = ours(PROMPT, **size, seed=args.seed, progress=False)
    result["ours_s"] = {k: round(v, 1) for k, v in out.timings.items()}
    ours_latents, ours_frames = out.latents, out.frames[0]
    del ours, out

    import diffusers

    t0 = time.perf_counter()
    ref = diffusers.CogVideoXPipeline.from_pretrained(args.dir, dtype=dtype)
    result["reference_load_s"] = round(time.perf_counter() - t0, 1)
    ref.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    ref_latents = ref(PROMPT, **size, generator=torch.Generator().manual_seed(args.seed), output_type="latent").frames
    result["reference_sample_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    with torch.no_grad():
        video = ref.decode_latents(ref_latents)
    ref_frames = ref.video_processor.postprocess_video(video=video, output_type="np")[0]
    result["reference_decode_s"] = round(time.perf_counter() - t0, 1)

    result["latents_relative_l2"] = relative_l2(ours_latents.float(), ref_latents.float())
    ref_uint8 = torch.from_numpy((ref_frames * 255).round().clip(0, 255).astype("uint8"))
    diff = (torch.from_numpy(ours_frames).int() - ref_uint8.int()).abs()
    result["frames_max_abs_diff"] = int(diff.max())
    result["frames_mean_abs_diff"] = round(float(diff.float().mean()), 3)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"full_size_cpu_{args.variant}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

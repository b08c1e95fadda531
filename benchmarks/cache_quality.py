"""What the step cache (or 8-bit attention) costs in quality, on the demo model: each lever against the exact
run, for the demo captions.

    python benchmarks/cache_quality.py                          # the embedded demo model, CPU is fine
    python benchmarks/cache_quality.py --model path/to/model --thresholds 0.05,0.1,0.2 --captions 16
    python benchmarks/cache_quality.py --thresholds '' --attention sage-emulated   # 8-bit attention only

For every threshold (and with --attention, for that attention backend without the cache), each (caption,
seed) is generated with the same seed as the exact run (no lever), and reports: steps that ran in full
(mean per generation), denoising time and speed-up over the exact run, the PSNR of the decoded frames
against the exact frames (mean over videos; identical videos counted apart), and the judge's verdicts
(caption's colour and direction seen, as `cogvideox.demo.evaluate` scores them), so a lever that breaks
prompt following shows as a lower score. Because every video has an exact twin with the same seed, it
also counts the videos the lever turned wrong and right, with the sign test's p-value for that split (is
the drop more than chance?). Writes cache_quality.json under $OUT (or the current folder) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from cogvideox import Pipeline
from cogvideox.demo import world
from cogvideox.demo.judge import judge


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 frames a against b (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def run(pipe: Pipeline, captions: list[str], seeds: list[int], steps: int, batch: int) -> dict:
    """Frames per (caption, seed), total denoising seconds, and full steps per generation."""
    frames, seconds, computed, generations = {}, 0.0, 0, 0
    cache = pipe.acceleration.cache if pipe.acceleration is not None else None
    pipe(captions[:batch], seed=0, num_inference_steps=2, progress=False)  # warm-up, not timed
    for seed in seeds:
        for start in range(0, len(captions), batch):
            chunk = captions[start : start + batch]
            out = pipe(chunk, seed=seed, num_inference_steps=steps, progress=False)
            seconds += out.timings["denoise"]
            generations += 1
            computed += cache.computed if cache is not None else steps
            for caption, video in zip(chunk, out.frames):
                frames[caption, seed] = video
    return {"frames": frames, "denoise_s": seconds, "computed_per_generation": computed / generations}


def verdicts(frames: dict) -> dict:
    """Per (caption, seed): (caption right, colour right, direction right), as the demo's judge sees it."""
    seen = {}
    for (caption, seed), video in frames.items():
        want_colour, _, want_direction, _ = world.parse_caption(caption)
        verdict = judge(video)
        seen[caption, seed] = (verdict.matches(caption), verdict.colour == want_colour, verdict.direction == want_direction)
    return seen


def score(seen: dict) -> dict:
    n = len(seen)
    correct, colour, direction = (sum(v[i] for v in seen.values()) for i in range(3))
    return {"videos": n, "right": correct, "accuracy": round(correct / n, 4), "colour_accuracy": round(colour / n, 4),
            "direction_accuracy": round(direction / n, 4)}  # fmt: skip


def paired(seen: dict, baseline: dict) -> dict:
    """Videos the lever turned wrong (`lost`) and right (`gained`) against the exact run with the same seed,
    and the exact two-sided sign-test (McNemar) p-value of that split: a drop that chance explains has a
    large p."""
    lost = sum(baseline[k][0] and not seen[k][0] for k in baseline)
    gained = sum(seen[k][0] and not baseline[k][0] for k in baseline)
    n, k = lost + gained, min(lost, gained)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"lost": lost, "gained": gained, "sign_test_p": round(p, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    p.add_argument("--thresholds", default="0.05,0.1,0.2", help="comma-separated cache thresholds ('' for none)")
    p.add_argument("--attention", default=None, help="also an attention backend of cogvideox.fast (e.g. "
                   "sage-emulated: 8-bit attention's math on the CPU), scored alone, without the cache")
    p.add_argument("--split", default="held_out", choices=("held_out", "train", "all"))
    p.add_argument("--captions", type=int, default=None, help="use the first N captions of the split")
    p.add_argument("--seeds", type=int, default=1, help="seeds per caption")
    p.add_argument("--order", type=int, default=1, choices=(0, 1),
                   help="how skipped steps stand in for the other blocks (see cogvideox.fast.cache)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds run from this one up")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="prompts per generation")
    args = p.parse_args()

    captions = list(world.captions_of(args.split))[: args.captions]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    # Each lever alone (no fused QKV, PyTorch's attention otherwise), so that the differences are its own.
    levers = [dict(cache=float(t), attention=None) for t in args.thresholds.split(",") if t]
    if args.attention is not None:
        levers.append(dict(cache=None, attention=args.attention))
    torch.manual_seed(0)

    t0 = time.perf_counter()
    baseline = run(Pipeline.from_pretrained(args.model), captions, seeds, args.steps, args.batch)
    judged = verdicts(baseline["frames"])
    rows = [{"threshold": None, "steps": args.steps, "computed_per_generation": args.steps,
             "denoise_s": round(baseline["denoise_s"], 2), "speedup": 1.0, **score(judged)}]  # fmt: skip
    for lever in levers:
        pipe = Pipeline.from_pretrained(args.model).accelerate(fuse_qkv=False, **lever)
        if lever["cache"] is not None:
            pipe.acceleration.cache.order = args.order
        result = run(pipe, captions, seeds, args.steps, args.batch)
        values = [psnr(result["frames"][key], baseline["frames"][key]) for key in baseline["frames"]]
        finite = [v for v in values if math.isfinite(v)]
        rows.append({
            "threshold": lever["cache"],
            "attention": lever["attention"],
            "steps": args.steps,
            "computed_per_generation": round(result["computed_per_generation"], 2),
            "denoise_s": round(result["denoise_s"], 2),
            "speedup": round(baseline["denoise_s"] / result["denoise_s"], 3),
            "psnr_db_mean": round(sum(finite) / len(finite), 2) if finite else None,
            "psnr_db_min": round(min(finite), 2) if finite else None,
            "identical_videos": len(values) - len(finite),
            **score(seen := verdicts(result["frames"])),
            **paired(seen, judged),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    report = {"model": args.model or "demo", "order": args.order, "split": args.split, "captions": len(captions),
              "seeds": seeds,
              "steps": args.steps, "batch": args.batch, "seconds": round(time.perf_counter() - t0, 1),
              "rows": rows}  # fmt: skip
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cache_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    header = ("| lever | steps computed | denoise s | speed-up | PSNR vs exact (mean / min) dB | "
              "judge: right | colour | direction | lost / gained (p) |")  # fmt: skip
    lines = [header, "|" + " --- |" * header.count(" | ") + " --- |"]
    for i, r in enumerate(rows):
        exact = i == 0
        name = "exact" if exact else f"cache {r['threshold']:g}" if r["threshold"] is not None else r["attention"]
        quality = "" if exact else f"{r['psnr_db_mean']} / {r['psnr_db_min']}"
        flips = "" if exact else f"{r['lost']} / {r['gained']} ({r['sign_test_p']})"
        if r.get("identical_videos"):
            quality += f" ({r['identical_videos']} identical)"
        lines.append(f"| {name} | {r['computed_per_generation']}/{r['steps']} | {r['denoise_s']} | {r['speedup']} | "
                     f"{quality} | {r['right']} ({r['accuracy']:.1%}) | {r['colour_accuracy']:.1%} | "
                     f"{r['direction_accuracy']:.1%} | {flips} |")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()

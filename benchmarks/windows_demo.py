"""Windows on the demo model: videos longer than its own 17 frames, through windows of its own length.

    python benchmarks/windows_demo.py --frames 33 49 --seeds 1

For every held-out caption and seed, one video per way: "plain" (the longer video as it comes), "riflex"
(`riflex=True`), "windows" (`window_stride=--stride`, fresh noise) and "windows+reschedule" (the same from
FreeNoise's rescheduled noise, the default of `window_stride`). Reported per way, as
`benchmarks/riflex_demo.py` reports: the judge's score (colour and direction right) and the share of videos
that restart (the object jumps back against its direction).
"""

from __future__ import annotations

import argparse
import json

from riflex_demo import score

from cogvideox import Pipeline

WAYS = ("plain", "riflex", "windows", "windows+reschedule")


def options(way: str, stride: int) -> dict:
    if way == "riflex":
        return {"riflex": True}
    if way.startswith("windows"):
        return {"window_stride": stride, "reschedule_noise": way.endswith("+reschedule")}
    return {}


def run(pipe, frames: int, seeds, steps: int, way: str, stride: int) -> dict:
    stride_shown = stride if way.startswith("windows") else None
    return {"way": way, "frames": frames, "stride": stride_shown, **score(pipe, frames, seeds, steps,
                                                                          **options(way, stride))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[33], help="frame counts, 8k+1 (default: 33)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per held-out caption (default: 1)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--stride", type=int, default=2, help="latent frames between windows (default: 2)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of: {', '.join(WAYS)}")
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained(None)
    for frames in args.frames:
        for way in args.ways.split(","):
            print(json.dumps(run(pipe, frames, range(args.seeds), args.steps, way, args.stride)), flush=True)


if __name__ == "__main__":
    main()

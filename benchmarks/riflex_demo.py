"""RIFLEx on the demo model: videos longer than the 17 frames it was trained on, with and without it.

    python benchmarks/riflex_demo.py --frames 33 --seeds 3

For every held-out caption and seed, one video at --frames each way. Reported per way:
- the judge's score (colour and direction right), as `python -m cogvideox.demo.evaluate` counts it;
- restarts: the share of videos whose object jumps back against the caption's direction by more than a
  quarter of the frame between two frames, which is how a video that repeats itself looks here (the
  motion plays, the object is back at its start, the motion plays again).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cogvideox import Pipeline
from cogvideox.demo import world
from cogvideox.demo.judge import judge

# A jump back of more than this share of the frame along the motion is a restart.
RESTART_JUMP = 0.25


def positions(frames: np.ndarray) -> np.ndarray:
    """The object's (x, y) per frame: the median of the pixels far from the frame's median colour."""
    background = np.median(frames.reshape(len(frames), -1, 3), axis=1)
    distance = np.abs(frames.astype(np.float32) - background[:, None, None]).sum(-1)
    track = []
    for d in distance:
        ys, xs = np.nonzero(d > 0.5 * max(float(d.max()), 1.0))
        track.append((np.median(xs), np.median(ys)))
    return np.array(track, dtype=np.float64)


def restarts(frames: np.ndarray, direction: str) -> bool:
    """Whether the object jumps back against `direction` by more than RESTART_JUMP of the frame."""
    dx, dy = world.direction_vector(direction)
    _, height, width, _ = frames.shape
    along = positions(frames) @ np.array([dx / width, dy / height])  # progress in frame units
    return bool((np.diff(along) < -RESTART_JUMP).any())


def run(pipe, frames: int, riflex: bool, seeds, steps: int) -> dict:
    return {"frames": frames, "riflex": riflex, **score(pipe, frames, seeds, steps, riflex=riflex)}


def score(pipe, frames: int, seeds, steps: int, **options) -> dict:
    """The held-out captions at `frames` frames for every seed, with the pipeline `options`: the judge's
    score (right, colour, direction), the share of videos that restart, and the seconds it took."""
    captions = world.captions_of("held_out")
    right = colour = heading = restarted = total = 0
    start = time.perf_counter()
    for seed in seeds:
        out = pipe(captions, seed=seed, num_frames=frames, num_inference_steps=steps, progress=False, **options)
        for caption, video in zip(captions, out.frames):
            wanted_colour, _, wanted_direction, _ = world.parse_caption(caption)
            verdict = judge(video)
            total += 1
            right += verdict.matches(caption)
            colour += verdict.colour == wanted_colour
            heading += verdict.direction == wanted_direction
            restarted += restarts(video, wanted_direction)
    return {
        "videos": total,
        "accuracy": round(right / total, 4),
        "colour_accuracy": round(colour / total, 4),
        "direction_accuracy": round(heading / total, 4),
        "restarts": round(restarted / total, 4),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[33], help="frame counts, 8k+1 (default: 33)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per held-out caption (default: 3)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained(None)
    for frames in args.frames:
        for riflex in (False, True):
            print(json.dumps(run(pipe, frames, riflex, range(args.seeds), args.steps)), flush=True)


if __name__ == "__main__":
    main()

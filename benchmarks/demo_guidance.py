"""How the guidance scale moves the colour the demo model draws, for chosen (background, colour) pairs.

    python benchmarks/demo_guidance.py                                   # green on black at 2, 4, 6, 9
    python benchmarks/demo_guidance.py --pairs black/green,white/red --guidance 2.5,6 --model path/to/model

For each pair and scale: the 12 captions of that colour on that background (3 shapes x 4 directions), two
seeds, 50 DDIM steps; the judge's colour verdicts and the mean RGB of the object's core pixels (those
farthest from the background colour). Prints one line per (scale, pair) and writes demo_guidance.json
under $OUT (or the current folder).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

import numpy as np

from cogvideox import Pipeline
from cogvideox.demo import world
from cogvideox.demo.judge import judge


def object_rgb(frames: np.ndarray) -> np.ndarray:
    """Mean colour of the pixels farthest from the background (the median colour), across all frames."""
    x = frames.astype(float)
    background = np.median(x.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(x - background, axis=-1)
    return x[distance > 0.7 * np.quantile(distance, 0.998)].mean(axis=0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    p.add_argument("--pairs", default="black/green", help="comma-separated background/colour pairs")
    p.add_argument("--guidance", default="2,4,6,9", help="comma-separated guidance scales")
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model)
    rows = []
    for scale in (float(g) for g in args.guidance.split(",")):
        for pair in args.pairs.split(","):
            background, colour = pair.split("/")
            captions = [f"a {colour} {shape} moving {d} on a {background} background"
                        for shape in world.SHAPES for d in world.DIRECTIONS]
            seen, rgb = collections.Counter(), []
            for seed in range(args.seeds):
                out = pipe(captions, seed=seed, guidance_scale=scale, progress=False)
                for frames in out.frames:
                    seen[judge(frames).colour] += 1
                    rgb.append(object_rgb(frames))
            row = {"guidance": scale, "background": background, "colour": colour, "videos": sum(seen.values()),
                   "judged_right": seen[colour], "verdicts": dict(seen),
                   "object_rgb": [round(float(v)) for v in np.mean(rgb, axis=0)]}
            rows.append(row)
            print(f"guidance {scale:g}: {colour} on {background}: {seen[colour]} of {row['videos']} judged "
                  f"{colour} {dict(seen)}, object RGB {row['object_rgb']}", flush=True)
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo_guidance.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

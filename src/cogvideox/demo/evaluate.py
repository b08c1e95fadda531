"""Score a model on the synthetic world: `python -m cogvideox.demo.evaluate [--model M]`.

For every caption of a split and several seeds, generate a video and let the judge read its pixels:
a video counts as correct when the judge sees the caption's colour AND direction. The held-out captions
(colour-direction pairs never seen in training) measure generalisation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import world
from .judge import judge


@dataclass
class Score:
    split: str
    total: int = 0
    correct: int = 0
    colour_correct: int = 0
    direction_correct: int = 0
    failures: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    def as_dict(self) -> dict:
        return {
            "split": self.split,
            "videos": self.total,
            "accuracy": round(self.accuracy, 4),
            "colour_accuracy": round(self.colour_correct / max(self.total, 1), 4),
            "direction_accuracy": round(self.direction_correct / max(self.total, 1), 4),
            "failures": self.failures[:20],
        }


def score(pipe, captions, seeds, batch: int = 16, num_inference_steps: int = 50, **call_kwargs) -> Score:
    """Generate one video per (caption, seed) and judge it. Prompts are batched per seed."""
    result = Score(split="custom")
    for seed in seeds:
        for start in range(0, len(captions), batch):
            chunk = list(captions[start : start + batch])
            out = pipe(chunk, seed=seed, num_inference_steps=num_inference_steps, progress=False, **call_kwargs)
            for caption, frames in zip(chunk, out.frames):
                colour, _, direction, _ = world.parse_caption(caption)
                verdict = judge(frames)
                result.total += 1
                result.colour_correct += verdict.colour == colour
                result.direction_correct += verdict.direction == direction
                if verdict.matches(caption):
                    result.correct += 1
                else:
                    result.failures.append(
                        {"caption": caption, "seed": seed, "seen": f"{verdict.colour} {verdict.direction}"}
                    )
    return result


def evaluate(pipe, seeds=(0, 1, 2), train_seeds=(0,), num_inference_steps: int = 50, **call_kwargs) -> dict:
    """Held-out captions with every seed in `seeds`; training captions with `train_seeds`. `call_kwargs`
    go to the pipeline (e.g. guidance_scale)."""
    report = {}
    for split, split_seeds in (("held_out", seeds), ("train", train_seeds)):
        t0 = time.time()
        s = score(pipe, world.captions_of(split), split_seeds, num_inference_steps=num_inference_steps, **call_kwargs)
        s.split = split
        report[split] = {**s.as_dict(), "seeds": list(split_seeds), "seconds": round(time.time() - t0, 1)}
    return report


def main(argv=None) -> int:
    from cogvideox.cli import RUN_ERROR, USER_ERROR, _Parser
    from cogvideox.cli_args import finite_float, non_negative_int, positive_int
    from cogvideox.errors import CogVideoXError, InputError, LoadError
    from cogvideox.models.config import ConfigError

    from ..pipeline import Pipeline

    p = _Parser(prog="python -m cogvideox.demo.evaluate", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    p.add_argument("--seeds", type=non_negative_int, default=3, help="seeds per held-out caption")
    p.add_argument("--train-seeds", type=non_negative_int, default=1, help="seeds per training caption")
    p.add_argument("--first-seed", type=non_negative_int, default=0,
                   help="held-out captions use seeds first-seed, first-seed + 1, ...; training captions 100 + "
                        "first-seed, ... (a fresh --first-seed checks a result on videos it was not chosen on)")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: the model's, from its sampling.json)")
    p.add_argument("--dynamic-cfg", choices=("reference", "smooth"), default=None,
                   help="schedule the guidance over the steps with CogVideoX's dynamic CFG, with the reference's "
                        "timestep clock or the smooth step clock (default: constant guidance)")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="frames per video, 8k+1 (default: the model's own, 17 for the demo model)")
    p.add_argument("--riflex", action="store_true",
                   help="RIFLEx for --frames beyond the model's own (see `cogvideox generate --help`)")
    p.add_argument("--output", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    call = dict(num_frames=args.frames, riflex=args.riflex)  # the pipeline's keyword arguments
    if args.guidance is not None:
        call.update(guidance_scale=args.guidance)
    if args.dynamic_cfg:
        call.update(use_dynamic_cfg=True, dynamic_cfg=args.dynamic_cfg)
    first = args.first_seed
    try:
        if args.output:  # made now, not after minutes of generating (the report would be lost to a traceback)
            try:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"cannot write {args.output}: {e.strerror or e}") from None
        pipe = Pipeline.from_pretrained(args.model)
        report = evaluate(pipe, tuple(range(first, first + args.seeds)),
                          tuple(range(100 + first, 100 + first + args.train_seeds)), args.steps, **call)
    except (CogVideoXError, ConfigError) as e:
        print(f"{p.prog}: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, no traceback
        return USER_ERROR if isinstance(e, (InputError, LoadError, ConfigError)) else RUN_ERROR
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

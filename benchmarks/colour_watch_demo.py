"""The validation colour watch on the demo model: LoRA runs at the learning rate `teach` uses and at rates
far above it, each validating every few hundred steps, and what the watch measured and said.

    python benchmarks/colour_watch_demo.py --work runs/colour-watch [--lrs 1e-3,3e-2,1e-1] [--steps 1000]

Data: the `teach` experiment's clips (the diagonal motion, half replay of the base world). Prints one
line per validation round (step, lr, each prompt's mean saturation, fully saturated share, blown-out
share and neighbour difference, warned or not) and writes them to WORK/report.json.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from cogvideox.demo.teach import TeachConfig, make_data
from cogvideox.train.config import FinetuneConfig
from cogvideox.train.finetune import finetune

PROMPTS = ["a red circle moving up on a black background", "a green circle moving left on a white background",
           "a red circle moving up on a gray background"]  # fmt: skip (held-out captions of the demo world)


def run(work: Path, data: Path, lr: float, steps: int, every: int) -> list[dict]:
    out = work / f"lr-{lr:g}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(FinetuneConfig(
            data=str(data), output=str(out), rank=16, lr=lr, steps=steps, batch_size=8, warmup_steps=50,
            checkpoint_every=steps, validation_every=every, validation_prompts=PROMPTS, validation_steps=50,
            mask_weight=10.0, gradient_checkpointing=False, progress=False,
        ))  # fmt: skip
    warned = {int(str(w.message).split(" at step ")[1].split()[0]) for w in caught
              if "have left the base model's far behind" in str(w.message)}  # fmt: skip
    rounds = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    return [r | {"lr": lr, "warned": r["step"] in warned} for r in rounds if "validation_saturation" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/colour-watch")
    parser.add_argument("--lrs", default="1e-3,3e-2,1e-1")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    args = parser.parse_args()
    work = Path(args.work)
    data, _ = make_data(TeachConfig(work=str(work), progress=False))
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        for row in run(work, data, lr, args.steps, args.every):
            rows.append(row)
            figures = zip(row["validation_saturation"], row["validation_vivid"], row["validation_blown"],
                          row["validation_detail"])  # fmt: skip
            shown = "; ".join(f"{s:.2f} {v:.0%} {b:.0%} {d:.3f}" for s, v, b, d in figures)
            print(f"lr {lr:g} step {row['step']:5d} (per prompt: saturation, fully saturated, blown out, "
                  f"neighbour difference): {shown}; warned {row['warned']}", flush=True)
    (work / "report.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The cost of an int8 T5 (`--quantize-text int8`) on the demo model: the judge's score with and without it.

    python benchmarks/text_int8_demo.py --seeds 3

Both ways score the same held-out captions and seeds as `python -m cogvideox.demo.evaluate` does (a video is
right when the judge sees the caption's colour and direction); reported per way, with the text states'
relative error against the exact T5 and how many videos the two ways judge alike.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cogvideox import Pipeline
from cogvideox.demo import world
from cogvideox.demo.evaluate import score


def states_error(exact: Pipeline, quantized: Pipeline, captions: list[str]) -> float:
    length = exact.config.max_text_seq_length
    want = exact.encode_prompts(captions, length, 1).float()
    got = quantized.encode_prompts(captions, length, 1).float()
    return ((got - want).norm() / want.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per held-out caption (default: 3)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    args = parser.parse_args()
    captions = world.captions_of("held_out")
    seeds = list(range(args.seeds))
    exact = Pipeline.from_pretrained(None)
    quantized = Pipeline.from_pretrained(None).accelerate(quantize_text="int8", fuse_qkv=False, attention=None)
    report = {"torch": torch.__version__, "captions": len(captions), "seeds": seeds, "steps": args.steps,
              "text_states_relative_error": round(states_error(exact, quantized, captions), 6)}  # fmt: skip
    for name, pipe in (("exact", exact), ("int8 T5", quantized)):
        start = time.perf_counter()
        result = score(pipe, captions, seeds, num_inference_steps=args.steps)
        result.split = "held_out"
        report[name] = {**result.as_dict(), "seconds": round(time.perf_counter() - start, 1)}
        report[name].pop("failures")
        report[name]["wrong"] = sorted((f["caption"], f["seed"]) for f in result.failures)
        print(name, json.dumps({k: v for k, v in report[name].items() if k != "wrong"}), flush=True)
    report["judged_alike"] = report["exact"]["videos"] - len(
        set(map(tuple, report["exact"]["wrong"])) ^ set(map(tuple, report["int8 T5"]["wrong"]))
    )
    print(json.dumps({k: v for k, v in report.items() if k not in ("exact", "int8 T5")}, indent=2))


if __name__ == "__main__":
    main()

"""T5-XXL on the CPU, as `--text-device cpu` runs it: the time to encode a prompt and the empty negative
prompt (226 tokens each), in bf16 and fp32.

    python benchmarks/t5_cpu.py --dir runs/ckpt-5b [--dtype bf16 fp32] [--repeat 3]

The folder is one `load_memory.py` writes (random weights at the released size). The first encode also
reads the mapped weights from the page cache or the disk; the median of the later ones is the figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cogvideox import loading

PROMPTS = ["a panda in a small red jacket plays a guitar in a bamboo forest", ""]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["bf16", "fp32"])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    for name in args.dtype:
        encoder = loading.load_text_encoder(args.dir, DTYPES[name], torch.device("cpu"))
        times = []
        for _ in range(args.repeat + 1):
            t0 = time.perf_counter()
            with torch.inference_mode():
                encoder.encode(PROMPTS, max_sequence_length=226)
            times.append(time.perf_counter() - t0)
        print(json.dumps({
            "dtype": name, "threads": torch.get_num_threads(), "first_s": round(times[0], 2),
            "median_s": round(statistics.median(times[1:]), 2), "torch": torch.__version__,
        }))  # fmt: skip
        del encoder


if __name__ == "__main__":
    main()

"""The whole denoising run of our exact modes against the reference's, from the same noise.

    python benchmarks/exact_trajectory.py --variant 5b                  # on a GPU: 49 x 480 x 720, bf16, 50 steps
    python benchmarks/exact_trajectory.py --tiny --truth --reference-alt              # a tiny model on the CPU
    python benchmarks/exact_trajectory.py --tiny --heads 4 --layers 6 --truth --reference-alt   # a wider one
    python benchmarks/exact_trajectory.py --layers 4 --latent 3x20x30 --truth   # the 5B's width: a CPU with bf16
                                                                        # instructions (AVX-512 BF16, AMX) only

The speed issue asks of the exact mode one step within bf16 noise of the reference (relative L2 <= 1e-2,
measured by speed.py) and the whole 50-step run reported: this is that run. The same random weights
(drawn once in fp32) go into the reference's transformer (diffusers, eager) and into each of our runs, a
fresh copy each, in --dtype:
- `reference`: the reference's transformer, PyTorch's own choice of attention kernel;
- `reference_alt` (with --reference-alt): the reference again with another exact attention kernel forced
  (flash on a GPU, math on the CPU): the reference's own bf16 noise, two runs a user of it could get;
- `eager`: our exact path uncompiled (fused QKV, "auto" attention);
- `compile`: the same with regional torch.compile (speed.py's compile mode, cuDNN attention on a GPU);
- `fa3` (a GPU with FlashAttention-3): the compiled exact mode as a Hopper GPU runs it by default;
- `truth` (with --truth): our path in fp32 with TF32 off; each run's distance from it is its bf16 noise.
Every run is --steps DDIM steps with classifier-free guidance 6 (the variant's scheduler, as speed.py's
trajectories) through our sampling loop, which the parity tests hold bitwise to the reference pipeline's:
only the transformer differs. Reports per run its seconds and the relative L2 of its latents against the
reference's and the truth's after every --every steps and at the end.

Writes exact_trajectory_<variant>[_<layers>l][_tiny].json under $OUT (or the current folder), rewritten
after each run, and prints a markdown table. A run that fails is recorded with its error and the others
still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_full_size import save_json  # noqa: E402
from speed import (  # noqa: E402
    Clock,
    configs,
    failure,
    fresh_transformer,
    host_random_state,
    latent_arg,
    latent_size,
    peak_gib,
    reference_transformer,
    rel_l2,
    reset_peak,
)

from cogvideox import fast  # noqa: E402
from cogvideox.fast import flash3  # noqa: E402
from cogvideox.models.config import SchedulerConfig  # noqa: E402
from cogvideox.models.transformer import CogVideoXTransformer  # noqa: E402
from cogvideox.sampling import DenoiseInputs, denoise  # noqa: E402
from cogvideox.schedulers import make_scheduler  # noqa: E402

GUIDANCE = 6.0


def fa3_usable(device: torch.device) -> bool:
    """A Hopper GPU with a FlashAttention-3 build that loads."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    try:
        flash3.load_build()
    except Exception:
        return False
    return True


class Reference(torch.nn.Module):
    """The reference's transformer called as ours is (the sampling loop's signature)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, text, t, image_rotary_emb=None):
        return self.model(x, text, t, image_rotary_emb=image_rotary_emb, return_dict=False)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("5b", "2b"), default="5b")
    p.add_argument("--layers", type=int, default=None, help="keep only this many blocks (default: all)")
    p.add_argument("--heads", type=int, default=None, help="attention heads of 64 channels (default: the variant's)")
    p.add_argument("--latent", type=latent_arg, default=None, help="latent FxHxW (default: 49 x 480 x 720's)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--every", type=int, default=10, help="compare the latents after every this many steps")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--runs", default=None, help="comma-separated, from reference,reference_alt,eager,compile,fa3,"
                   "truth (default: reference, eager, compile, fa3 where available, and those the flags add)")
    p.add_argument("--truth", action="store_true", help="also the fp32 run (TF32 off): on a GPU at full size "
                   "50 steps of it take about 14 minutes")
    p.add_argument("--reference-alt", action="store_true", help="also the reference with another attention kernel")
    p.add_argument("--tiny", action="store_true", help="a tiny config on the CPU, to check the script runs")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config, _, _, size = configs(args.variant, args.tiny)
    latent = args.latent or latent_size(*size)
    if args.layers is not None:
        config = config.replace(num_layers=args.layers)
    if args.heads is not None:  # a narrower model: bf16 products are slow on CPUs without bf16 instructions
        config = config.replace(num_attention_heads=args.heads)
    if args.latent is not None:  # the positional grid is the video's own, as at full size
        config = config.replace(sample_height=latent[1], sample_width=latent[2], sample_frames=4 * latent[0] - 3)
    runs = args.runs.split(",") if args.runs else (
        ["reference"] + ["reference_alt"] * args.reference_alt + ["eager", "compile"]
        + ["fa3"] * fa3_usable(device) + ["truth"] * args.truth
    )  # fmt: skip
    known = ("reference", "reference_alt", "eager", "compile", "fa3", "truth")
    if set(runs) - set(known):
        p.error(f"unknown runs {sorted(set(runs) - set(known))}; use {','.join(known)}")

    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"exact_trajectory_{args.variant}{f'_{args.layers}l' if args.layers else ''}"
    name += f"{f'_{args.heads}h' if args.heads else ''}{'_tiny' if args.tiny else ''}"
    path = out_dir / f"{name}.json"
    result: dict = {
        "variant": args.variant, "layers": config.num_layers, "heads": config.num_attention_heads,
        "width": config.num_attention_heads * config.attention_head_dim, "latent": list(latent), "steps": args.steps,
        "guidance": GUIDANCE, "dtype": args.dtype, "device": str(device), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "runs": {},
    }  # fmt: skip

    with torch.device("meta"):
        template = CogVideoXTransformer(config)
    weights = host_random_state(template, device, torch.float32, seed=1)  # fp32: the truth's weights
    del template
    g = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(1, latent[0], config.in_channels, *latent[1:], generator=g)
    text = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=g)  # [uncond, cond]
    rope = CogVideoXTransformer.rotary_embedding(SimpleNamespace(config=config), *latent, device)
    scheduler_config = SchedulerConfig(snr_shift_scale=1.0 if args.variant == "5b" else 3.0)
    clock = Clock(device)
    kept: dict[str, dict[int, torch.Tensor]] = {}  # run -> step -> latents (fp32, host)

    def trajectory(run: str, model, run_dtype: torch.dtype) -> tuple[dict[int, torch.Tensor], float]:
        scheduler = make_scheduler(scheduler_config, "ddim")
        scheduler.set_timesteps(args.steps, device=device)
        inputs = DenoiseInputs(noise.to(device, run_dtype), text.to(device, run_dtype), [GUIDANCE] * args.steps, rope)
        seen: dict[int, torch.Tensor] = {}

        def on_step(i, t, latents):
            if (i + 1) % args.every == 0 or i + 1 == args.steps:
                seen[i + 1] = latents.float().cpu()
                print(f"{run}: step {i + 1} of {args.steps}", flush=True)  # a long run's progress, in the log

        with torch.inference_mode():
            seconds = clock(lambda: denoise(model, scheduler, scheduler.timesteps, inputs, on_step=on_step))
        return seen, seconds

    def build(run: str) -> torch.nn.Module:
        if run.startswith("reference"):
            return Reference(reference_transformer(config, weights, device, dtype))
        if run == "truth":  # no levers, as speed.py's fp32 step
            return fresh_transformer(config, weights, device, torch.float32)
        model = fresh_transformer(config, weights, device, dtype)
        options = {"eager": {}, "compile": {"compile": True}, "fa3": {"compile": True, "attention": "fa3"}}[run]
        if run == "compile" and device.type == "cuda":
            options["attention"] = "cudnn"  # speed.py's compile mode
        fast.apply(model, **options)
        return model

    def compare(run: str) -> dict:
        """The run's latents against the reference's and the truth's, at each kept step."""
        out = {}
        for other in ("reference", "truth"):
            if other in kept and other != run:
                out[f"vs_{other}"] = {str(s): rel_l2(kept[run][s], kept[other][s]) for s in kept[run]}
        return out

    for run in sorted(runs, key=lambda r: r != "reference"):  # the reference first: the others' yardstick
        entry: dict = {}
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        if run == "truth":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            torch._dynamo.reset()  # each compiled run pays its own warm-up, inside its seconds
            reset_peak(device)
            model = build(run)
            if run == "reference_alt":
                backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH
                entry["attention"] = backend.name.lower()
                with sdpa_kernel(backend):
                    kept[run], seconds = trajectory(run, model, dtype)
            else:
                kept[run], seconds = trajectory(run, model, torch.float32 if run == "truth" else dtype)
            entry.update(seconds=round(seconds, 1), peak_gib=peak_gib(device))
            if getattr(model, "acceleration", None) is not None:
                entry["levers"] = model.acceleration.describe()
            del model
        except Exception as e:  # recorded; the other runs still go
            entry.update(failure(e))
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
            gc.collect()
        result["runs"][run] = entry
        for done in kept:  # the truth may come last: every run's distance from it once it is there
            result["runs"][done].update(compare(done))
        print(run, json.dumps(entry), flush=True)
        save_json(path, result)

    print(markdown(result))
    failed = [k for k, v in result["runs"].items() if "error" in v]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their errors are in {path})")


def markdown(result: dict) -> str:
    last = str(result["steps"])
    lines = [
        f"{result['variant']}, {result['layers']} blocks, latent {'x'.join(map(str, result['latent']))}, "
        f"{result['steps']} DDIM steps, guidance {result['guidance']}, {result['dtype']}, {result['device']}",
        "",
        "| run | seconds | final vs reference | final vs truth | along the way vs reference |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run, e in result["runs"].items():
        if "error" in e:
            lines.append(f"| {run} | failed: {e['error'][:80]} | | | |")
            continue
        ref, truth = e.get("vs_reference", {}), e.get("vs_truth", {})
        way = ", ".join(f"{s}: {v}" for s, v in ref.items())
        lines.append(f"| {run} | {e.get('seconds')} | {ref.get(last, '')} | {truth.get(last, '')} | {way} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

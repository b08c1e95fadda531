"""GPU memory and time of every offload mode, full size, random weights, and a check that the outputs agree.

    python benchmarks/memory.py                      # on a GPU: 5B then 2B, 49 x 480 x 720, CFG, bf16
    python benchmarks/memory.py --variant 5b --check  # one model; exit 1 if a mode changes the output
    python benchmarks/memory.py --tiny               # tiny configs on the CPU (checks the script runs)
    python benchmarks/memory.py --variant 5b --int8  # the model card's INT8 (transformer and T5) in every mode

For each model the pipeline is built once (random weights, made on the GPU) and run once per mode:
"none", "model", "stream", "sequential", then "stream" and "sequential" with `--vae-tiling` (the setting
the low-memory targets assume). Each run is a whole generation: T5 (prompt and negative prompt),
`--steps` denoising steps with classifier-free guidance, VAE decode. Per run it records:

- peak GPU memory (torch.cuda.max_memory_allocated and max_memory_reserved) over the whole generation;
- time: T5, each denoising step (CUDA-synchronised at every step), decode. The 50-step total is
  extrapolated as text + first step + 49 x median(later steps) + decode (the first step carries the
  warm-up of a mode: its first block fetches); the method is written into the JSON;
- host memory: peak resident set size during the run (sampled every 10 ms from /proc/self/status),
  and the page-locked bytes the offloader holds against the bytes of the weights it holds;
- whether the final latents and frames are bitwise those of the "none" run (tiled runs: frames compared
  with the first tiled run, latents with "none").

`--reference` also runs diffusers' CogVideoXPipeline resident on the same weights (the "none" target).
JSON goes to $OUT (or the current folder) as memory_<variant>.json, rewritten after each run (a run
stopped by a time cap keeps the runs it finished). A run that fails is recorded with its error and the
next ones still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import core_full_size  # noqa: E402
from host_memory import HostPeak  # noqa: E402

from cogvideox.pipeline import Pipeline  # noqa: E402

GIB = 2**30
PROMPT = "a panda plays guitar in a bamboo forest under soft light"
RUNS = [("none", False), ("model", False), ("stream", False), ("sequential", False), ("stream", True),
        ("sequential", True)]  # fmt: skip
METHOD = "total_50 = text + first step + 49 x median(steps 2..n) + decode; steps CUDA-synchronised"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pipeline(args, device, dtype, workdir: Path) -> tuple[Pipeline, dict]:
    pipe, preset, size = core_full_size.build_pipeline(args.variant, args.tiny, device, dtype, workdir, tiny_layers=4)
    request = dict(size, num_inference_steps=args.steps, guidance_scale=6.0, seed=42, progress=False,
                   max_sequence_length=preset.max_text_seq_length)  # fmt: skip
    return pipe, request


def run_once(pipe: Pipeline, request: dict, device) -> tuple[dict, object]:
    """One measured generation."""
    marks = []

    def on_step(i, t, latents):
        _sync(device)
        marks.append(time.perf_counter())

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    _sync(device)
    with HostPeak() as host:
        start = time.perf_counter()
        out = pipe(PROMPT, callback=on_step, **request)
        _sync(device)
        total = time.perf_counter() - start
    text, decode = out.timings["text"], out.timings["decode"]
    denoise_start = start + text
    steps = [b - a for a, b in zip([denoise_start, *marks[:-1]], marks)]
    later = steps[1:] or steps
    result = {
        "text_s": round(text, 3),
        "first_step_s": round(steps[0], 3),
        "step_s": round(statistics.median(later), 3),
        "decode_s": round(decode, 3),
        "total_measured_s": round(total, 3),
        "total_50_s": round(text + steps[0] + 49 * statistics.median(later) + decode, 1),
        "host_rss_peak_gib": round(host.rss / GIB, 2),
    }
    if device.type == "cuda":
        result["gpu_at_rest_gib"] = round(base / GIB, 2)
        result["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
        result["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 2)
    if pipe.offload is not None:
        result["host_weights_gib"] = round(pipe.offload.weight_bytes / GIB, 3)
        result["host_copy_gib"] = round(pipe.offload.host_bytes / GIB, 3)
        result["host_copy_over_weights"] = round(pipe.offload.host_bytes / max(pipe.offload.weight_bytes, 1), 4)
        result["host_copy_pinned"] = device.type == "cuda" and all(g.host.is_pinned() for g in pipe.offload.groups())
    return result, out


def reference_run(pipe: Pipeline, request: dict, device, dtype) -> dict:
    """diffusers' CogVideoXPipeline, everything resident, on the same weights."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    def config_of(config):
        return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}

    pipe.enable_offload("model", device)  # our weights leave the GPU; theirs are copies
    with torch.device(device):  # not on meta: non-persistent buffers (the 2B's sin-cos table) need values
        transformer = CogVideoXTransformer3DModel(**config_of(pipe.transformer.config)).to(dtype)
        vae = AutoencoderKLCogVideoX(**config_of(pipe.vae.config)).to(dtype)
    transformer.load_state_dict(pipe.transformer.state_dict())
    vae.load_state_dict(pipe.vae.state_dict())
    text_model = pipe.text_encoder.model
    pipe.offload.remove()
    pipe.offload = None
    text_model.to(device)
    scheduler = CogVideoXDDIMScheduler(**pipe.scheduler.config.to_dict())
    ref = CogVideoXPipeline(pipe.text_encoder.tokenizer, text_model, vae.eval(), transformer.eval(), scheduler)
    kwargs = {k: v for k, v in request.items() if k not in ("seed", "progress")}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    ref.set_progress_bar_config(disable=True)
    ref(PROMPT, generator=torch.Generator("cpu").manual_seed(42), output_type="np", **kwargs)
    _sync(device)
    result = {"total_measured_s": round(time.perf_counter() - start, 3)}
    if device.type == "cuda":
        result["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("5b", "2b", "both"), default="both")
    p.add_argument("--steps", type=int, default=3, help="denoising steps measured (default 3)")
    p.add_argument("--modes", default=",".join(f"{m}{'+tiling' if t else ''}" for m, t in RUNS),
                   help="runs, comma-separated: MODE or MODE+tiling (default: all six)")
    p.add_argument("--reference", action="store_true", help="also measure diffusers' resident run")
    p.add_argument("--check", action="store_true", help="exit 1 when a mode's output differs from 'none'")
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU, to check the script runs")
    p.add_argument("--int8", action="store_true",
                   help="the model card's INT8: transformer and T5 linears int8 weight-only, in every run")  # fmt: skip
    args = p.parse_args()

    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    device, dtype = core_full_size.bench_device(args.tiny)
    runs = [(r.split("+")[0], r.endswith("+tiling")) for r in args.modes.split(",")]
    variants = ["5b", "2b"] if args.variant == "both" else [args.variant]
    mismatches = failures = 0
    for variant in variants:
        args.variant = variant
        result = {"variant": variant, "tiny": args.tiny, "device": str(device), "dtype": str(dtype),
                  "torch": torch.__version__, "steps_measured": args.steps, "method": METHOD, "runs": {},
                  "int8": args.int8}  # fmt: skip
        path = out_dir / f"memory_{variant}{'_int8' if args.int8 else ''}{'_tiny' if args.tiny else ''}.json"

        def save(result=result, path=path) -> None:
            core_full_size.save_json(path, result)

        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        with tempfile.TemporaryDirectory() as tmp:
            pipe, request = build_pipeline(args, device, dtype, Path(tmp))
        if args.int8:  # before the weights are counted: what every mode then holds and moves
            pipe.accelerate(quantize="int8", quantize_text="int8", attention=None)
        result.update({k: v for k, v in request.items() if k in ("num_frames", "height", "width")})
        result["weights_gib"] = {
            name: round(sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]) / GIB, 3)
            for name, module in (("text_encoder", pipe.text_encoder.model), ("transformer", pipe.transformer),
                                 ("vae", pipe.vae))
        }  # fmt: skip
        # Warm-up (kernels, cuBLAS/cuDNN handles) with one step, not measured.
        pipe(PROMPT, **dict(request, num_inference_steps=1))
        first = {}
        for mode, tiling in runs:
            name = mode + ("+tiling" if tiling else "")
            try:
                pipe.enable_offload(mode, device)
                pipe.vae.enable_tiling() if tiling else pipe.vae.disable_tiling()
                stats, out = run_once(pipe, request, device)
            except Exception as e:  # recorded; the next modes still run
                traceback.print_exc()
                result["runs"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                failures += 1
                save()
                continue
            key = "tiled" if tiling else "untiled"
            if "latents" not in first:
                first["latents"] = out.latents
            first.setdefault(key, out.frames)
            stats["latents_equal_to_first_run"] = bool(torch.equal(out.latents, first["latents"]))
            stats[f"frames_equal_to_first_{key}_run"] = all(
                np.array_equal(a, b) for a, b in zip(out.frames, first[key])
            )
            mismatches += not (stats["latents_equal_to_first_run"] and stats[f"frames_equal_to_first_{key}_run"])
            result["runs"][name] = stats
            print(name, json.dumps(stats), flush=True)
            save()
        none = result["runs"].get("none")
        if none and "total_50_s" in none:
            for stats in result["runs"].values():
                if "total_50_s" in stats:
                    stats["total_50_over_none"] = round(stats["total_50_s"] / none["total_50_s"], 3)
        if args.reference:
            try:
                result["reference_resident"] = reference_run(pipe, request, device, dtype)
            except Exception as e:  # a benchmark extra; say why it is missing
                result["reference_resident"] = f"failed: {type(e).__name__}: {e}"
        save()
        print(json.dumps(result, indent=2))
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failures or (args.check and mismatches) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the time goes, kernel by kernel: a full-size VAE decode and a 5B transformer step under torch.profiler.

    python benchmarks/kernel_profile.py                 # on a GPU: 5B, 49 x 480 x 720, bf16, every target
    python benchmarks/kernel_profile.py --targets vae,vae_parallel_norms
    python benchmarks/kernel_profile.py --tiny          # tiny configs on the CPU (smoke test)

(Not `profile.py`: run as a script, that name would shadow the standard library's `profile` module,
which PyTorch imports through `cProfile`.)

Targets, each one profiled call after a warm-up, in this order by default:
- `vae`: our untiled decode of 13 latent frames to 49 x 480 x 720 (the exact path, random weights); the
  warm-up decodes the first five latent frames (the first chunk and a cached one: every shape the
  decode has; on the CPU there is none);
- `vae_parallel_norms`: the same decode with the GroupNorm statistics by parallel reductions
  (`cogvideox.fast.vae_parallel_norms`, Welford's variance): where `RowwiseMomentsCUDAKernel` went;
- `vae_parallel_norms_modulation`: and the decoder norms' modulation at the latent's size, combined in
  one pass (`cogvideox.fast.vae_latent_modulation`): where the bias adds and the multiply went;
- `vae_lean`: and the activations written into the causal convolutions' padded inputs
  (`cogvideox.fast.vae_pad_in_place`): where the concatenations went;
- `vae_lean_fold`: and the resnet blocks' conv1 biases added inside the norms after them (and conv2's
  inside a projected shortcut; `cogvideox.fast.vae_fold_conv_bias`): where those bias adds went;
- `step_eager`: one 5B transformer step at CFG batch 2 in our exact mode (fused QKV, "auto" attention:
  FlashAttention-3 where installed, else cuDNN first), after one warm-up step;
- `step_compiled`: the same model with regional torch.compile (`cogvideox.fast`), after a warm-up step
  that compiles;
- `step_fp8`: the 5B step in fp8 mode as `speed.py`'s `fp8-fa3` measures it (fp8 row-wise linears,
  "auto" attention, compiled; 0.599x of the reference's eager step on 2026-11-30, where the target is
  0.50x): how long the fp8 products take, what quantising their inputs costs (kernels that compute an
  `amax`), and attention's share once the products are faster;
- `step_fp8_fa3fp8`: the same with FlashAttention-3's FP8 kernel (`--attention fa3-fp8`; speed.py's
  `fp8-fa3fp8`): the FP8 kernel's time in the model and what quantising Q, K and V costs;
- `vae_channels_last`, `vae_conv2d_channels_last`, `vae_conv2d`: the decode with those levers
  (`cogvideox.fast.vae_channels_last`, `vae_conv2d`).
On the CPU (--tiny) the fp8 targets run the emulated fp8 math and, for the FP8 kernel, its emulation.
Weights and inputs are speed.py's (same seeds, so the same models as its ladder). For each target:
the profiled call's wall time, the device time of its kernels (and how busy that kept the device), the
top kernels by total device time (name, calls, ms, share), the device time in categories by kernel name
(convolution, gemm, attention, norm, copy / layout, elementwise / other, memcpy), and the operators
(aten ops) by the device time of the kernels they launched themselves. With --tiny (CPU) the "kernels"
are the operators' own CPU times: a check of the plumbing, the figures mean nothing.

Writes kernel_profile_<variant>[_tiny].json under $OUT (or the current folder), rewritten after each
target (a run stopped by its time cap keeps what it finished), and one text table per target,
kernel_profile_<target>.txt, also printed. A target that fails is recorded with its error and the
others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_full_size import build, save_json  # noqa: E402
from speed import (  # noqa: E402
    Clock,
    apply_vae_levers,
    configs,
    decode_latents,
    failure,
    latent_size,
    peak_gib,
    reset_peak,
    step_inputs,
)

from cogvideox import fast  # noqa: E402
from cogvideox.fast.compile import compile_blocks  # noqa: E402
from cogvideox.models.transformer import CogVideoXTransformer  # noqa: E402
from cogvideox.models.vae import CogVideoXVAE  # noqa: E402

VAE_TARGETS = {
    "vae": {},
    "vae_parallel_norms": dict(parallel_norms="welford"),
    "vae_parallel_norms_modulation": dict(parallel_norms="welford", latent_modulation=True),
    "vae_lean": dict(parallel_norms="welford", latent_modulation=True, pad_in_place=True),
    "vae_lean_fold": dict(parallel_norms="welford", latent_modulation=True, pad_in_place=True, fold_conv_bias=True),
    "vae_channels_last": dict(channels_last=True),
    "vae_conv2d_channels_last": dict(conv2d=True, channels_last=True),
    "vae_conv2d": dict(conv2d=True),
}
STEP_TARGETS = ("step_eager", "step_compiled")
# fp8 steps, each on a fresh model: `fast.apply` options (compiled), the attention named for a GPU.
FP8_TARGETS = {"step_fp8": "auto", "step_fp8_fa3fp8": "fa3-fp8"}
TARGETS = (
    "vae", "vae_parallel_norms", "vae_parallel_norms_modulation", "vae_lean", "vae_lean_fold", "step_eager",
    "step_compiled", "step_fp8", "step_fp8_fa3fp8", "vae_channels_last", "vae_conv2d_channels_last", "vae_conv2d",
)

# Categories of device time, by kernel name (on the CPU, operator name), lower-cased: the first match
# wins. cuDNN's attention kernels say "sdpa" and "flash" but also "fprop", hence attention before
# convolution; the layout transforms cuDNN runs around a convolution ("nchwToNhwc...") count as copies;
# its convolutions say "fprop" or "implicit_gemm", hence convolution before gemm (cuBLAS's Hopper GEMMs
# are "nvjet"); Inductor names its kernels after the operators fused ("triton_red_fused_native_group_
# norm_..."), so they fall where their first matching operator does.
CATEGORIES = (
    ("memcpy", r"^memcpy|^memset"),
    ("attention", r"flash|fmha|sdpa|attention|softmax"),
    ("copy / layout", r"to_?n(c?d?hw|d?hwc)|nchw2nhwc|nhwc2nchw"),  # cuDNN's own layout transforms
    ("convolution", r"conv(?!ert)|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("gemm", r"gemm|nvjet|cublas|cutlass|wgmma|matmul|aten::(mm|addmm|bmm|linear)$"),
    ("quantize", r"amax"),  # fp8 scales: a row's or a head's largest magnitude (with a norm fused, its cost)
    ("norm", r"norm|moments|welford"),
    ("copy / layout", r"copy|cat(?!e)|transpose|permute|contiguous|clone|pad"),
    ("elementwise / other", r""),
)


def category(name: str) -> str:
    low = name.lower()
    if low.startswith("triton"):
        low = low.replace("_to_copy", "")  # a dtype cast fused into the kernel, not a copy of its own
    return next(label for label, pattern in CATEGORIES if re.search(pattern, low))


def short(name: str, width: int = 110) -> str:
    name = name.removeprefix("void ")
    return name if len(name) <= width else name[: width - 3] + "..."


def summarize(prof, device: torch.device, wall_ms: float, top: int) -> dict:
    """The profile's kernels (CPU: operators) by name, their categories, and the operators' own device time."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # name -> [calls, us]
    per_op: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    if device.type == "cuda":
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                entry = per_name[e.name]
                entry[0] += 1
                entry[1] += e.time_range.elapsed_us()
            elif e.device_type == DeviceType.CPU and e.kernels:
                entry = per_op[e.name]
                entry[0] += 1
                entry[1] += sum(k.duration for k in e.kernels)
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                per_name[e.key] = [e.count, e.self_cpu_time_total]
    total_us = sum(us for _, us in per_name.values()) or 1.0
    groups: dict[str, list[float]] = {label: [0, 0.0] for label, _ in CATEGORIES}
    for name, (calls, us) in per_name.items():
        group = groups[category(name)]
        group[0] += calls
        group[1] += us

    def rows(table: dict, n: int, with_category: bool) -> list[dict]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1][1])[:n]
        out = []
        for name, (calls, us) in ranked:
            row = {"name": short(name, 200), "calls": int(calls), "ms": round(us / 1000, 2), "share": round(us / total_us, 4)}
            if with_category:
                row["category"] = category(name)
            out.append(row)
        return out

    return {
        "wall_ms": round(wall_ms, 1),
        "device_ms": round(total_us / 1000, 1),
        "device_busy": round(total_us / 1000 / wall_ms, 3) if wall_ms else None,
        "launches": int(sum(calls for calls, _ in per_name.values())),
        "categories": {
            label: {"ms": round(us / 1000, 1), "share": round(us / total_us, 4), "calls": int(calls)}
            for label, (calls, us) in sorted(groups.items(), key=lambda kv: -kv[1][1])
            if calls
        },
        "top_kernels": rows(per_name, top, True),
        "top_operators": rows(per_op, 15, False),
    }


def table(target: str, title: str, s: dict) -> str:
    what = "kernel" if s["top_operators"] else "operator (self CPU time)"
    lines = [
        f"== {target}: {title}",
        f"wall {s['wall_ms']} ms, {'device' if s['top_operators'] else 'CPU'} time {s['device_ms']} ms "
        f"(busy {s['device_busy']}), {s['launches']} {'launches' if s['top_operators'] else 'calls'}",
        "",
        "| category | ms | share | calls |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {k} | {v['ms']} | {v['share']:.1%} | {v['calls']} |" for k, v in s["categories"].items()]
    lines += ["", f"| {what} | calls | ms | share | category |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {short(r['name'])} | {r['calls']} | {r['ms']} | {r['share']:.1%} | {r['category']} |" for r in s["top_kernels"]]
    if s["top_operators"]:
        lines += ["", "| operator (device time of its own kernels) | calls | ms | share |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['name']} | {r['calls']} | {r['ms']} | {r['share']:.1%} |" for r in s["top_operators"]]
    return "\n".join(lines)


def profiled(call, device: torch.device, clock: Clock, top: int) -> dict:
    """One call of `call` under the profiler: its summary and peak memory."""
    activities = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if device.type == "cuda" else [ProfilerActivity.CPU]
    reset_peak(device)
    with profile(activities=activities) as prof:
        seconds = clock(call)
    summary = summarize(prof, device, 1000 * seconds, top)
    summary["peak_gib"] = peak_gib(device)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("5b", "2b"), default="5b")
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU, to check the script runs")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {','.join(TARGETS)}")
    p.add_argument("--top", type=int, default=25, help="kernels listed per target")
    args = p.parse_args()
    targets = args.targets.split(",")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}; use {','.join(TARGETS)}")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = Clock(device)
    config, vae_config, _, size = configs(args.variant, args.tiny)
    latent = latent_size(*size)
    title = f"{args.variant}, {'x'.join(map(str, size))}, {str(dtype).removeprefix('torch.')}"
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernel_profile_{args.variant}{'_tiny' if args.tiny else ''}.json"
    result: dict = {
        "variant": args.variant, "tiny": args.tiny, "device": str(device), "dtype": str(dtype),
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "size": list(size), "latent": list(latent), "targets": {},
    }  # fmt: skip

    def record(target: str, summary: dict) -> None:
        result["targets"][target] = summary
        save_json(path, result)
        if "error" in summary:
            print(f"== {target}: failed: {summary['error']}", flush=True)
            return
        text = table(target, title, summary)
        (out_dir / f"kernel_profile_{target}.txt").write_text(text + "\n")
        print(text + "\n", flush=True)

    def vae_target(target: str) -> dict:
        vae = build(lambda: CogVideoXVAE(vae_config), device, dtype, seed=2)  # speed.py's VAE weights
        apply_vae_levers(vae, VAE_TARGETS[target])
        z = decode_latents(vae_config, latent, device, dtype)
        with torch.inference_mode():
            if device.type == "cuda":  # (the CPU smoke test needs none)
                vae.decode(z[:, :, :5])  # warm-up: the first chunk (3 latent frames) and a cached one
            return profiled(lambda: vae.decode(z), device, clock, args.top)

    def step_call(model):
        x, text, t = step_inputs(config, latent, device, dtype, torch.Generator(device="cpu").manual_seed(0))
        rope = CogVideoXTransformer.rotary_embedding(SimpleNamespace(config=config), *latent, device)
        return lambda: model(x, text, t, image_rotary_emb=rope)

    def step_profile(model, call) -> dict:
        """One profiled step after a warm-up one (which compiles a compiled model), under inference mode."""
        with torch.inference_mode():
            warm_up = clock(call)
            summary = profiled(call, device, clock, args.top)
        summary["warm_up_s"] = round(warm_up, 2)
        summary["levers"] = model.acceleration.describe()
        return summary

    def step_targets(wanted: list[str]) -> None:
        model = build(lambda: CogVideoXTransformer(config), device, dtype, seed=1)  # speed.py's weights
        fast.apply(model)  # our exact mode: fused QKV, "auto" attention (FlashAttention-3 where installed)
        call = step_call(model)
        for target in wanted:
            try:
                if target == "step_compiled":
                    compile_blocks(model)  # as fast.apply(compile=True) would, last
                    model.acceleration.compile = "default"
                summary = step_profile(model, call)
            except Exception as e:  # recorded; the other targets still run
                summary = failure(e)
            record(target, summary)
        del model, call
        torch._dynamo.reset()

    def fp8_target(target: str) -> dict:
        model = build(lambda: CogVideoXTransformer(config), device, dtype, seed=1)
        attention = FP8_TARGETS[target]
        emulate = device.type != "cuda"  # the CPU smoke test: the same math in plain PyTorch
        if emulate and attention != "auto":
            attention += "-emulated"
        fast.apply(model, quantize="fp8", attention=attention, compile=True, emulate_fp8=emulate)
        call = step_call(model)
        try:
            return step_profile(model, call)
        finally:
            del model, call
            torch._dynamo.reset()

    steps = [t for t in targets if t in STEP_TARGETS]
    for target in targets:
        if target in STEP_TARGETS:
            if target == steps[0]:
                try:
                    step_targets(steps)
                except Exception as e:  # building the model failed: every step target fails with it
                    for name in steps:
                        record(name, failure(e))
            reset_peak(device)
            continue
        try:
            summary = fp8_target(target) if target in FP8_TARGETS else vae_target(target)
        except Exception as e:  # recorded; the other targets still run
            summary = failure(e)
        record(target, summary)
        reset_peak(device)

    failed = [k for k, v in result["targets"].items() if "error" in v]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their errors are in {path})")


if __name__ == "__main__":
    main()

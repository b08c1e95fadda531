"""Fine-tuning cost at full size with random weights: peak GPU memory and seconds per training step of
our trainer's step (LoRA or full), against the reference transformer with a peft LoRA.

    python benchmarks/finetune_memory.py --variant 5b            # on a GPU: 49 x 480 x 720, bf16
    python benchmarks/finetune_memory.py --variant 2b --mode lora
    python benchmarks/finetune_memory.py --variant 2b --mode lora --compile --reference-compile
    python benchmarks/finetune_memory.py --tiny                  # tiny configs on the CPU (smoke test)

The step is the one `cogvideox train` runs on cached latents: the v-prediction loss on one clip (batch 1,
226 T5 tokens), gradient checkpointing, bf16 autocast, gradient clipping and the optimizer step. LoRA
rank 128 on to_q/to_k/to_v/to_out.0 with AdamW; full fine-tuning with bf16 weights and the CPU-offloaded
AdamW (`--optimizer adamw-cpu`, fp32 masters and moments in CPU memory) unless `--full-optimizer adamw`.

`--save-attention` keeps each block's attention results through the backward pass (`cogvideox train
--save-attention`: the checkpoint's recompute skips the attention kernel, for their memory).
`--compile` compiles our blocks (regional torch.compile, as `cogvideox train --compile`); the warm-up
step is then the compiling one (`warmup_s`), kept apart from the steady steps (`s_per_step`), and
`graphs` counts the graphs Dynamo compiled during the warm-up, `graphs_after_warmup` those compiled in
the timed steps (0 unless something recompiles per step). `--reference-compile` adds the reference with
its blocks compiled the same way (`compile_blocks`: peft's LoRA layers inside the graph, graph breaks
allowed and counted) as a row of its own, "reference-lora-compiled", so that our compiled step is also
compared with a compiled reference. On the CPU, `--tiny` only checks that all of this runs: at those
sizes a compiled step is no faster.

Targets (from the project's issue): 5B LoRA peak <= 18 GB, 5B full <= 40 GB, 2B LoRA <= 10 GB, and our
LoRA s/step <= 0.8x the reference's (the eager reference, as the issue has it: `lora_speed_ratio`).
`optimizer_s` is the optimizer step's part of a step (for full fine-tuning: the gradients' trip to the
CPU, the CPU AdamW and the weights' trip back). The reference gets the same random weights as ours,
drawn on the device.

Each step prints a line as it ends, and the results, $OUT/finetune_memory.json (or the current folder),
are rewritten after every step: the peak after the warm-up step, then `s_per_step` and `optimizer_s` as
the medians of the timed steps so far (`steps_timed`) and `steady_peak_gb`, the peak of the timed steps
alone (a compiling warm-up may allocate more). A run stopped by a time cap keeps what it measured; a case
that fails is recorded with its error and the next one runs.

`--quantize-base int8` keeps the frozen linears our LoRA leaves alone (feed-forward, modulation) as int8
weights with one scale per output channel (`cogvideox train --quantize-base int8`); the reference stays
bf16, as the issue's comparison has it.

`--memory-trace` (on a GPU) runs one more step of our case with the allocator's history on and records
`memory_trace`: the memory allocated when the forward pass ends (`after_forward_gb`: with offloaded
activations, about the weights, the adapters and their optimizer state), the peak of the forward pass and
of the whole step, and what is live at the end of the forward pass grouped by where it was allocated
(the innermost frame of this project's code, or "before the trace" for the weights and the optimizer
state), the largest first; with `--offload-activations`, also what the pass copied to the host
(`offload`: tensors, bytes) and the saved bytes it left on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_full_size import build, save_json  # noqa: E402

from cogvideox.fast.compile import compile_blocks
from cogvideox.fast.quantize import quantize
from cogvideox.models.config import SchedulerConfig, TransformerConfig
from cogvideox.models.transformer import TRANSFORMER_PRESETS, CogVideoXTransformer
from cogvideox.schedulers import alphas_cumprod
from cogvideox.train import lora
from cogvideox.train.checkpoint import step_generator
from cogvideox.train.optim import CPUOffloadAdamW
from cogvideox.train.objective import v_loss

TARGETS_GB = {("5b", "lora"): 18.0, ("5b", "full"): 40.0, ("2b", "lora"): 10.0}
SPEED_TARGET = 0.8  # ours / reference, seconds per LoRA step
TINY = TransformerConfig(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
    text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
    max_text_seq_length=16, use_rotary_positional_embeddings=True,
)


def build_ours(config: TransformerConfig, device, dtype) -> CogVideoXTransformer:
    """Random weights loaded by assignment straight in `dtype` (no full fp32 copy on the device)."""
    return build(lambda: CogVideoXTransformer(config), device, dtype, seed=0)


def build_reference(ours: CogVideoXTransformer, device, dtype):
    """diffusers' transformer with the same weights (built on the device: a CPU init of 5B is slow)."""
    from diffusers import CogVideoXTransformer3DModel

    kwargs = {k: v for k, v in ours.config.to_dict().items() if not k.startswith("_")}
    with torch.device(device):
        ref = CogVideoXTransformer3DModel(**kwargs).to(dtype)
    result = ref.load_state_dict({k: v.detach() for k, v in ours.state_dict().items()}, strict=False)
    # Only buffers the reference computes itself (the 2B sin-cos table) may be left out.
    assert not result.unexpected_keys and all("pos_embedding" in k for k in result.missing_keys), result
    return ref


def inputs(config: TransformerConfig, frames: int, height: int, width: int, device, dtype):
    g = torch.Generator().manual_seed(1)
    latent = (1, (frames - 1) // 4 + 1, config.in_channels, height // 8, width // 8)
    x0 = torch.randn(latent, generator=g).to(device, dtype)
    text = torch.randn(1, config.max_text_seq_length, config.text_embed_dim, generator=g).to(device, dtype)
    return x0, text


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_figures(device) -> dict:
    """The GPU peaks since the measurement began (nothing on the CPU)."""
    if device.type != "cuda":
        return {}
    return {"peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2)}


def graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def measure(step, device, repeat: int, case: dict, save) -> None:
    """One warm-up step, then `repeat` timed ones, each reported as it ends: a line on stdout and `case`
    updated and saved (`save()`), so a run stopped by a time cap keeps the peak after the warm-up (the
    step that allocates the optimizer state, so nearly every step's peak) and the timed steps it finished.
    On a GPU, the memory still allocated after each step is listed too: a step that leaves memory behind
    shows as a growing list.

    `step(i)` runs training step i and returns the seconds its optimizer step took. A compiled case
    (`case["compiled"]`) also records the graphs compiled in the warm-up and after it."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the reserved peak starts from what is held, not from freed building blocks
        torch.cuda.reset_peak_memory_stats()
    graphs = graphs_compiled()
    seconds, optimizer_seconds = timed(step, 0, device)
    case |= {"warmup_s": round(seconds, 4), "warmup_optimizer_s": round(optimizer_seconds, 4)} | memory_figures(device)
    compiled = case.get("compiled", False)
    if compiled:
        case["graphs"], graphs = graphs_compiled() - graphs, graphs_compiled()
    what = "warm-up, compiling" if compiled else "warm-up"
    print(f"{case['mode']} {what}: {seconds:.2f} s (optimizer {optimizer_seconds:.2f} s)", flush=True)
    save()
    warm_peaks = memory_figures(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # from here on, the peak of the steady steps alone
    times, optimizer_times = [], []
    for i in range(1, repeat + 1):
        seconds, optimizer_seconds = timed(step, i, device)
        times.append(seconds)
        optimizer_times.append(optimizer_seconds)
        print(f"{case['mode']} step {i}/{repeat}: {seconds:.2f} s (optimizer {optimizer_seconds:.2f} s)", flush=True)
        case |= {"s_per_step": round(statistics.median(times), 4),
                 "optimizer_s": round(statistics.median(optimizer_times), 4), "steps_timed": i}
        steady = memory_figures(device)
        if device.type == "cuda":
            after = case.setdefault("allocated_after_steps_gb", [])
            after.append(round(torch.cuda.memory_allocated() / 1e9, 2))
        if steady:
            case |= {"steady_peak_gb": steady["peak_gb"],
                     "peak_gb": max(warm_peaks["peak_gb"], steady["peak_gb"]),
                     "peak_reserved_gb": max(warm_peaks["peak_reserved_gb"], steady["peak_reserved_gb"])}
        if compiled:
            case["graphs_after_warmup"] = graphs_compiled() - graphs
        save()


def timed(step, i: int, device) -> tuple[float, float]:
    """Seconds of training step i, and of its optimizer step."""
    synchronize(device)
    t0 = time.perf_counter()
    optimizer_seconds = step(i)
    synchronize(device)
    return time.perf_counter() - t0, optimizer_seconds


def training_step(model, params, optimizer, x0, text, rotary, device, amp_dtype, forward=None):
    """`step(i, after_forward=None)`: training step i; returns the seconds of its optimizer step.
    `after_forward()`, if given, runs between the forward and the backward pass."""
    ab = alphas_cumprod(SchedulerConfig()).float()
    forward = forward or model

    def step(i: int, after_forward=None) -> float:
        gen = step_generator(0, i)
        amp = torch.autocast("cuda", dtype=amp_dtype) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with amp:
            loss = v_loss(forward, x0, text, ab, gen, rotary=rotary)
        if after_forward is not None:
            after_forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        synchronize(device)  # the backward's kernels are not the optimizer's time
        t0 = time.perf_counter()
        optimizer.step()
        synchronize(device)
        seconds = time.perf_counter() - t0
        optimizer.zero_grad(set_to_none=True)
        return seconds

    return step


def live_by_origin(snapshot: dict, top: int = 12) -> list[dict]:
    """The allocated blocks of an allocator snapshot (`torch.cuda.memory._snapshot()`), grouped by the
    innermost frame of this project's code that allocated them and, where another frame is innermost
    (PyTorch's, or a compiled graph's generated code), that one too, as "ours <- innermost"; blocks
    allocated before the history was on have no frames. The `top` largest groups, GB and block count."""

    def name(frame: dict) -> str:
        return f"{Path(frame.get('filename', '?')).name}:{frame.get('line')} {frame.get('name')}"

    groups: dict[str, list] = {}
    for segment in snapshot.get("segments", []):
        for block in segment.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = block.get("frames") or []
            if frames and frames[0].get("name") == "<module>":  # outermost first: turn it round
                frames = frames[::-1]
            ours = [f for f in frames if "cogvideox" in f.get("filename", "") or "benchmarks" in f.get("filename", "")]
            if not frames:
                key = "before the trace"
            elif not ours or ours[0] is frames[0]:
                key = name(frames[0])
            else:
                key = f"{name(ours[0])} <- {name(frames[0])}"
            group = groups.setdefault(key, [0, 0])
            group[0] += block.get("size", 0)
            group[1] += 1
    largest = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"origin": key, "gb": round(size / 1e9, 3), "blocks": n} for key, (size, n) in largest]


def memory_trace(step, model, device, i: int, case: dict, save) -> None:
    """Step i once more with the allocator's history on, into `case["memory_trace"]` (see the module's
    docstring). On the CPU, a note that it needs a GPU."""
    if device.type != "cuda":
        case["memory_trace"] = "skipped: the allocator's history needs a CUDA device"
        return
    found: dict = {}

    def after_forward() -> None:
        torch.cuda.synchronize()
        found["after_forward_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
        found["forward_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        found["live_after_forward"] = live_by_origin(torch.cuda.memory._snapshot())
        if getattr(model, "offload_stats", None):
            stats = model.offload_stats
            found["offload"] = {"copied": stats["copied"], "copied_gb": round(stats["copied_bytes"] / 1e9, 2),
                                "kept_gb": round(stats["kept_bytes"] / 1e9, 3)}

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(enabled="state", context="state", stacks="python")
    try:
        step(i, after_forward)
        torch.cuda.synchronize()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    found["step_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    case["memory_trace"] = found
    print(f"{case['mode']} memory trace: {json.dumps(found)}", flush=True)
    save()


def run_case(args, config: TransformerConfig, device, dtype, case: dict, save) -> None:
    """Our trainer's step in `case["mode"]` (lora or full), measured into `case` (see `measure`)."""
    mode = case["mode"]
    t0 = time.perf_counter()
    model = build_ours(config, device, dtype)
    model.gradient_checkpointing = True
    model.offload_activations = args.offload_activations
    model.save_attention = args.save_attention
    model.train()
    if mode == "lora":
        lora.inject_lora(model, args.rank, args.rank, dtype=torch.float32)
        if args.quantize_base:  # as `cogvideox train --quantize-base int8` does, after the LoRA
            case["quantize_base"] = args.quantize_base
            case["quantized_linears"] = quantize(model, args.quantize_base, device=device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    else:
        params = list(model.parameters())
        optimizer = CPUOffloadAdamW(params, lr=1e-5) if args.full_optimizer == "adamw-cpu" else torch.optim.AdamW(params, lr=1e-5)
    if args.compile:
        compile_blocks(model)  # after the LoRA, as the trainer does
        case["compiled"] = True
    x0, text = inputs(config, args.frames, args.height, args.width, device, dtype)
    rotary = model.rotary_embedding(x0.shape[1], x0.shape[3], x0.shape[4], device)
    case["trainable_params"] = sum(p.numel() for p in params)
    if args.offload_activations:
        case["offload_activations"] = True
    if args.save_attention:
        case["save_attention"] = True
    case["setup_s"] = round(time.perf_counter() - t0, 2)  # the weights and the optimizer (5B full: 33 GB pinned)
    print(f"{mode} set up: {case['setup_s']:.2f} s", flush=True)
    step = training_step(model, params, optimizer, x0, text, rotary, device, dtype)
    measure(step, device, args.repeat, case, save)
    if model.offload_stats:  # the last step's: copied to the host, and copied back (as many, once each)
        stats = model.offload_stats
        case["offload"] = {"copied": stats["copied"], "copied_back": stats["copied_back"],
                           "copied_gb": round(stats["copied_bytes"] / 1e9, 2)}
        save()
    if args.memory_trace:
        memory_trace(step, model, device, args.repeat + 1, case, save)
    del model, optimizer, params, step
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_reference_lora(
    args, config: TransformerConfig, device, dtype, case: dict, save, compiled: bool = False
) -> None:
    """diffusers' transformer with a peft LoRA, measured into `case` (see `measure`); `compiled`: its
    blocks compiled as ours are (regional, static shapes; graph breaks allowed, and counted)."""
    from peft import LoraConfig

    ours = build_ours(config, device, dtype)  # on the CPU, 5B's random draws alone take half a minute
    ref = build_reference(ours, device, dtype)
    del ours
    ref.enable_gradient_checkpointing()
    ref.train()
    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(lora.DEFAULT_TARGETS),
                               init_lora_weights=True))
    params = [p for p in ref.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 adapters, as in ours and in the official trainer's cast_training_params
    if compiled:
        from torch._dynamo.utils import counters

        breaks = sum(counters["graph_break"].values())
        compile_blocks(ref, fullgraph=False)
        case["compiled"] = True
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x0, text = inputs(config, args.frames, args.height, args.width, device, dtype)
    # The same RoPE tables as ours (only the config is needed to build them).
    rotary = CogVideoXTransformer.rotary_embedding(SimpleNamespace(config=config), *x0.shape[1:2], *x0.shape[3:], device)

    def forward(hidden, text_states, t, image_rotary_emb=None):
        return ref(hidden_states=hidden, encoder_hidden_states=text_states, timestep=t,
                   image_rotary_emb=image_rotary_emb, return_dict=False)[0]

    case["trainable_params"] = sum(p.numel() for p in params)
    measure(training_step(ref, params, optimizer, x0, text, rotary, device, dtype, forward), device, args.repeat,
            case, save)
    if compiled:
        case["graph_breaks"] = sum(counters["graph_break"].values()) - breaks
        save()


def judge(report: dict, variant: str) -> None:
    """The targets, on the figures taken so far: each case's peak against its memory target, and our LoRA
    step against the reference's."""
    for case in report["cases"]:
        target = TARGETS_GB.get((variant, case["mode"]))
        if target is not None and "peak_gb" in case:
            case |= {"target_gb": target, "meets_target": case["peak_gb"] <= target}
    steps = {c["mode"]: c["s_per_step"] for c in report["cases"] if "s_per_step" in c}
    if "lora" in steps and "reference-lora" in steps:
        report["lora_speed_ratio"] = round(steps["lora"] / steps["reference-lora"], 3)
        report["lora_speed_target"] = SPEED_TARGET
    if "lora" in steps and "reference-lora-compiled" in steps:
        report["lora_speed_ratio_vs_compiled_reference"] = round(steps["lora"] / steps["reference-lora-compiled"], 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("5b", "2b"), default="5b")
    p.add_argument("--mode", choices=("lora", "full", "all"), default="all")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--repeat", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--full-optimizer", choices=("adamw-cpu", "adamw"), default="adamw-cpu")
    p.add_argument("--no-reference", action="store_true", help="skip the diffusers + peft comparison")
    p.add_argument("--offload-activations", action="store_true",
                   help="our LoRA and full cases keep the checkpointed block inputs in pinned CPU memory")
    p.add_argument("--save-attention", action="store_true",
                   help="our cases keep each block's attention results through the backward pass (selective "
                   "checkpointing: the recompute skips the attention kernel)")
    p.add_argument("--compile", action="store_true",
                   help="our cases with their blocks compiled (regional torch.compile; the warm-up step compiles)")
    p.add_argument("--reference-compile", action="store_true",
                   help="after the eager reference, the reference with its blocks compiled too, as its own row")
    p.add_argument("--quantize-base", choices=("int8",), default=None,
                   help="our LoRA case with the frozen linears the adapters leave alone in int8 (cogvideox train "
                   "--quantize-base)")
    p.add_argument("--memory-trace", action="store_true",
                   help="one more step of our case with the allocator's history on: what is live when the forward "
                   "pass ends, by where it was allocated (GPU only)")
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU, to check the script runs")
    args = p.parse_args()

    if args.tiny:
        device, dtype, config = torch.device("cpu"), torch.float32, TINY
        args.rank, args.frames, args.height, args.width, args.repeat = 4, 9, 32, 48, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full-size benchmark needs a CUDA GPU; use --tiny on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = TRANSFORMER_PRESETS["CogVideoX-5b" if args.variant == "5b" else "CogVideoX-2b"]

    modes = ("lora", "full") if args.mode == "all" else (args.mode,)
    report = {
        "variant": "tiny" if args.tiny else args.variant,
        "compile": args.compile,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "clip": f"{args.frames}x{args.height}x{args.width}",
        "rank": args.rank,
        "torch": torch.__version__,
        "cases": [],
    }
    out = Path(os.environ.get("OUT", ".")) / "finetune_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        judge(report, args.variant)
        save_json(out, report)

    # Each case joins the report before it runs and is saved as it is measured (see `measure`); one that
    # fails (a compiler that cannot build a graph, say) is recorded with its error and the next one runs.
    def reference(compiled: bool):
        def run(case: dict) -> None:
            try:
                run_reference_lora(args, config, device, dtype, case, save, compiled=compiled)
            except ImportError as e:
                case["skipped"] = f"needs diffusers and peft ({e})"

        return run

    runs = [({"mode": mode}, lambda case: run_case(args, config, device, dtype, case, save)) for mode in modes]
    if "lora" in modes and not args.no_reference:
        runs.append(({"mode": "reference-lora"}, reference(compiled=False)))
        if args.reference_compile:
            runs.append(({"mode": "reference-lora-compiled"}, reference(compiled=True)))
    for case, run in runs:
        report["cases"].append(case)
        try:
            run(case)
        except Exception as e:  # recorded; the other cases still run
            case["error"] = f"{type(e).__name__}: {e}"[:2000]
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what a failed case held goes back before the next one
        print(json.dumps(case), flush=True)
        save()
    print(f"wrote {out}")
    failed = [c["mode"] for c in report["cases"] if "error" in c]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their errors are in {out})")


if __name__ == "__main__":
    main()

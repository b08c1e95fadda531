"""Speed levers at full size with random weights: ours against the reference (diffusers), in one process.

    python benchmarks/speed.py --variant 5b                      # on a GPU: 49 x 480 x 720, bf16
    python benchmarks/speed.py --variant 5b --modes fused,fp8 --trajectory-steps 10
    python benchmarks/speed.py --variant 5b --vae-only           # the VAE ladder (VAE_VARIANTS) alone
    python benchmarks/speed.py --vae-only --vae-variants ours_whole,ours_conv2d_whole --vae-latent 3x20x30
    python benchmarks/speed.py --tiny                            # a tiny config on the CPU (smoke test)

The same random weights go into diffusers' CogVideoXTransformer3DModel and into ours, once per mode (each
mode rewrites its own fresh copy). For each mode, at CFG batch 2:
- per-step transformer time (median of --repeat forwards after a warm-up; the warm-up, which includes any
  compilation, is reported on its own), the 50-step extrapolation, peak GPU memory and weight bytes;
- the relative L2 error of one step against the reference's bf16 output (the "exact" budget is 1e-2),
  and against an fp32 truth (below), as the reference's own is: the bf16 rounding noise of a deep
  stack shows as the reference's error, and a mode no further from the truth than the reference adds none;
- for the lossy modes (int8, fp8, cache, fp8-cache), the error after a --trajectory-steps DDIM run with
  guidance, against the same run in the lossless "fused" mode; for the cache, how many steps ran in full
  and the time per step of that run.
Then the VAE decode (VAE_VARIANTS: the reference, ours and ours with each VAE lever, whole and tiled: time,
peak memory, error) and the T5 encoding.

--attention-kernels first times the attention kernels alone at the variant's shape (5B: B=2, 48 heads,
17,776 tokens, head_dim 64), in the model dtype, on q and k out of LayerNorms with a per-channel offset in
K (as the model's norm_k bias makes): SDPA cuDNN, SDPA flash, FlashAttention-3 (fa3), sage (K's smoothing
included, as the eager backend runs it) and FlashAttention-3's FP8 kernel (fa3_fp8: smoothing and e4m3
quantisation included, eager), then cuDNN and fa3 again with v laid out as the model hands it over (a view
of the fused QKV output: `*_v_from_qkv`) and with q and k as such views too (`*_qkv_views`, the layout a
compiled block may give them), each with its median time, TFLOP/s (4 B H L^2 d FLOPs) and relative L2 error
against fp32 SDPA (the memory-efficient kernel, TF32 off) of the same inputs; sage and fa3_fp8 also against
their emulations on the first four heads (the same quantised numbers: far closer than either is to fp32).
On the CPU (--tiny) the math SDPA and the two emulations stand in, labelled so.

Modes: plain (no levers), fused (fused QKV + cuDNN-first attention: our exact mode), compile (fused +
regional torch.compile), int8 / fp8 (fused + quantised linears + compile), cache (fused + compile + the
first-block cache at --cache-threshold), fp8-cache (fp8 and the cache together; its step time comes
from the trajectory, so give it the --trajectory-steps it is to be judged at, 50), fa3 / fp8-fa3 (compile /
fp8 with FlashAttention-3's exact kernel, `cogvideox.fast.flash3`; on the CPU SDPA stands in), sage / fp8-sage
(compile / fp8 with 8-bit attention, `cogvideox.fast.sage`: the sageattention kernel on CUDA; on the CPU
its math emulated in PyTorch, labelled "sage-emulated", for the plumbing), fa3fp8 / fp8-fa3fp8 /
fp8-fa3fp8-cache (compile / fp8 / fp8 and the cache with FlashAttention-3's FP8 kernel,
`cogvideox.fast.fp8_attention`; on the CPU its math emulated), fa3-dense-v (fa3 with v copied dense
per head before the kernel: a question about layout, not a lever of the library). The reference is
timed eager, and compiled with --reference-compile (minutes of compilation). The fp32 truth (unless --no-fp32-truth) is one step of a
fresh copy of our transformer, without levers, on the same weights and inputs cast to fp32, with TF32
matmuls off (attention: PyTorch's choice, the memory-efficient kernel for fp32); it runs after the
reference is freed and before our modes, alone on the device (5B: 22 GB of weights, one forward of
~5-15 s on an H200, no warm-up; its time and peak are recorded). With --tiny every run is fp32 already,
so its errors are ~0: there it checks the plumbing.

Writes speed_<variant>[_tiny].json under $OUT (or the current folder), rewritten as each figure comes in
(a run cut short by its time cap keeps what it measured), and prints a markdown table. A mode or VAE
variant (or the fp32 truth) that fails is recorded with its error and the others still run; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_full_size import T5_TINY, T5_XXL, make_text_encoder, random_state, save_json  # noqa: E402

from cogvideox import fast  # noqa: E402
from cogvideox.models.config import SchedulerConfig, VAEConfig  # noqa: E402
from cogvideox.models.transformer import TRANSFORMER_PRESETS, CogVideoXTransformer  # noqa: E402
from cogvideox.models.vae import CogVideoXVAE  # noqa: E402
from cogvideox.sampling import DenoiseInputs, denoise  # noqa: E402
from cogvideox.schedulers import make_scheduler  # noqa: E402

MODES = {
    "plain": dict(fuse_qkv=False, attention=None),
    "fused": dict(),
    "compile": dict(compile=True),
    "int8": dict(quantize="int8", compile=True),
    "fp8": dict(quantize="fp8", compile=True),
    "cache": dict(compile=True, cache=None),  # threshold from --cache-threshold
    "fp8-cache": dict(quantize="fp8", compile=True, cache=None),  # the fp8 + caching target
    "fp8-fa3-cache": dict(quantize="fp8", compile=True, attention="fa3", cache=None),  # and FlashAttention-3
    "fa3": dict(compile=True, attention="fa3"),  # FlashAttention-3 (against "compile"): exact
    "fp8-fa3": dict(quantize="fp8", compile=True, attention="fa3"),  # fp8 linears, FlashAttention-3
    "sage": dict(compile=True, attention="sage"),  # 8-bit attention alone (against "compile")
    "fp8-sage": dict(quantize="fp8", compile=True, attention="sage"),  # fp8 linears and 8-bit attention
    "fa3fp8": dict(compile=True, attention="fa3-fp8"),  # FlashAttention-3's FP8 kernel alone (against "fa3")
    "fp8-fa3fp8": dict(quantize="fp8", compile=True, attention="fa3-fp8"),  # fp8 linears, FP8 attention
    "fp8-fa3fp8-cache": dict(quantize="fp8", compile=True, attention="fa3-fp8", cache=None),  # and the cache
    # FlashAttention-3 with v copied dense per head first (exact): does v's layout in the model, a view of
    # the fused QKV output, cost the kernel the 12% it loses in the model against alone?
    "fa3-dense-v": dict(compile=True, attention="fa3", dense_v=True),
}
LOSSY = ("int8", "fp8", "cache", "fp8-cache", "fp8-fa3-cache", "sage", "fp8-sage", "fa3fp8", "fp8-fa3fp8",
         "fp8-fa3fp8-cache")


class Clock:
    """Wall time of a call on this device: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def module_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error, to 3 significant digits."""
    return float(f"{((a.float() - b.float()).norm() / b.float().norm()).item():.3g}")


def time_step(call, clock: Clock, repeat: int) -> tuple[torch.Tensor, dict]:
    """The first call's output and time (it includes any compilation), then the median of `repeat`."""
    first = {}
    first_s = clock(lambda: first.setdefault("out", call()))
    clock(call)
    step = statistics.median([clock(call) for _ in range(repeat)])
    timing = {"first_call_s": round(first_s, 2), "step_ms": round(1000 * step, 1), "steps_50_s": round(50 * step, 1)}
    return first["out"], timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("5b", "2b"), default="5b")
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU, to check the script runs")
    p.add_argument("--modes", default=None, help=f"comma-separated, from {','.join(MODES)} (default: all "
                   "that run on this device)")
    p.add_argument("--repeat", type=int, default=5, help="timed forwards per mode (median)")
    p.add_argument("--trajectory-steps", type=int, default=None, help="DDIM steps of the lossy-mode runs "
                   "(default 50 on a GPU, 4 with --tiny; 0 skips them)")
    p.add_argument("--cache-threshold", type=float, default=0.1)
    p.add_argument("--reference-compile", action="store_true", help="also time torch.compile(reference)")
    p.add_argument("--no-reference", action="store_true", help="skip diffusers (errors are then vs 'fused')")
    p.add_argument("--no-fp32-truth", action="store_true", help="skip the fp32 step (no errors vs fp32)")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--vae-only", action="store_true", help="only the VAE decode variants (no transformer, no T5)")
    p.add_argument("--skip-t5", action="store_true")
    p.add_argument("--vae-variants", default=None, help=f"comma-separated, from {','.join(VAE_VARIANTS)} "
                   "(default: all)")
    p.add_argument("--vae-latent", type=latent_arg, default=None,
                   help="the VAE's latent size as FxHxW (default: the video's, "
                   "13x60x90 at full size), e.g. a smaller decode of the full-size VAE on a CPU")
    p.add_argument("--attention-kernels", action="store_true", help="first time the attention kernels alone "
                   "(SDPA cuDNN, flash, sage) at the variant's shape")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = Clock(device)
    config, vae_config, t5, (frames, height, width) = configs(args.variant, args.tiny)
    steps = args.trajectory_steps if args.trajectory_steps is not None else (4 if args.tiny else 50)
    modes = args.modes.split(",") if args.modes else [
        m for m in MODES if not m.startswith("fp8") or fast.quantize.fp8_supported(device)
    ]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; use {','.join(MODES)}")
    vae_variants = args.vae_variants.split(",") if args.vae_variants else list(VAE_VARIANTS)
    unknown = set(vae_variants) - set(VAE_VARIANTS)
    if unknown:
        p.error(f"unknown VAE variants {sorted(unknown)}; use {','.join(VAE_VARIANTS)}")

    result: dict = {
        "variant": args.variant, "tiny": args.tiny, "device": str(device), "dtype": str(dtype),
        "torch": torch.__version__, "frames": frames, "height": height, "width": width,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "modes": {},
    }  # fmt: skip
    if not args.no_reference and importlib.util.find_spec("diffusers") is None:
        # Our modes are still measured (their errors then against "fused"), as core_full_size.py does.
        print("diffusers is not installed: no reference (see scripts/gpu-wheels.sh)", file=sys.stderr)
        args.no_reference, result["reference"] = True, "diffusers not installed"
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"speed_{args.variant}{'_tiny' if args.tiny else ''}.json"

    def save() -> None:
        save_json(path, result)

    save()
    lat_f, lat_h, lat_w = latent_size(frames, height, width)
    if args.attention_kernels:
        tokens = config.max_text_seq_length + lat_f * (lat_h // config.patch_size) * (lat_w // config.patch_size)
        shape = (2, config.num_attention_heads, tokens, config.attention_head_dim)  # CFG batch 2
        result["attention_kernels"] = {"shape": list(shape)}
        attention_kernels(shape, device, dtype, clock, args.repeat, result["attention_kernels"], save)
        print("attention kernels:", json.dumps(result["attention_kernels"]), flush=True)
    if not args.vae_only:
        transformer_modes(args, config, modes, steps, device, dtype, clock, result, lat_f, lat_h, lat_w, save)

    # 4. VAE decode: the reference, ours and our levers (VAE_VARIANTS).
    if not args.skip_vae:
        result["vae_decode"] = {}
        if args.vae_latent:
            result["vae_latent"] = list(args.vae_latent)
        latent = args.vae_latent or (lat_f, lat_h, lat_w)
        vae_decode(vae_config, device, dtype, clock, latent, vae_variants, args.no_reference, result["vae_decode"], save)
        print("vae:", json.dumps(result["vae_decode"]), flush=True)

    # 5. T5 encoding of [negative ; prompt].
    if not (args.skip_t5 or args.vae_only):
        reset_peak(device)
        with tempfile.TemporaryDirectory() as tmp:
            encoder = make_text_encoder(Path(tmp), t5, device, dtype)
        prompts = ["", "a panda plays guitar in a bamboo forest under soft light"]
        with torch.inference_mode():
            call = lambda: encoder.encode(prompts, config.max_text_seq_length, device=device, dtype=dtype)  # noqa: E731
            result["t5"] = {"encode_ms": time_step(call, clock, args.repeat)[1]["step_ms"], "peak_gib": peak_gib(device)}
        del encoder
        save()

    print(markdown(result))
    entries = [*result["modes"].items(), *result.get("vae_decode", {}).items()]
    entries += [(f"attention {k}", v) for k, v in result.get("attention_kernels", {}).items()]
    if "fp32_truth" in result:
        entries.append(("fp32_truth", result["fp32_truth"]))
    failed = [k for k, v in entries if isinstance(v, dict) and "error" in v]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their errors are in {path})")


def configs(variant: str, tiny: bool) -> tuple:
    """(transformer config, VAE config, T5 size, (frames, height, width)) of `variant` at full size, or
    of the tiny stand-ins the CPU smoke runs use."""
    config = TRANSFORMER_PRESETS["CogVideoX-5b" if variant == "5b" else "CogVideoX-2b"]
    vae_config = VAEConfig(scaling_factor=0.7 if variant == "5b" else 1.15258426)
    if not tiny:
        return config, vae_config, T5_XXL, (49, 480, 720)
    config = config.replace(num_layers=3, num_attention_heads=2, text_embed_dim=32, sample_height=8,
                            sample_width=12, sample_frames=9)  # fmt: skip
    vae_config = VAEConfig(block_out_channels=(16, 16, 16, 16), norm_num_groups=4, layers_per_block=1,
                           scaling_factor=vae_config.scaling_factor)  # fmt: skip
    return config, vae_config, T5_TINY, (9, 64, 96)


def latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    return (frames - 1) // 4 + 1, height // 8, width // 8


def latent_arg(text: str) -> tuple[int, int, int]:
    """A latent size given as FxHxW on the command line (an argparse `type`)."""
    try:
        size = tuple(int(n) for n in text.split("x"))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"must be FxHxW with positive integers, got {text!r}")
    return size


def step_inputs(config, latent: tuple[int, int, int], device, dtype, g: torch.Generator) -> tuple:
    """The latents (CFG batch 2), text states and timesteps of one transformer step, drawn from `g`."""
    x = torch.randn(2, latent[0], config.in_channels, *latent[1:], generator=g).to(device, dtype)
    text = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=g).to(device, dtype)
    return x, text, torch.tensor([500, 500], device=device)


def fresh_transformer(config, weights: dict, device, cast: torch.dtype | None = None) -> CogVideoXTransformer:
    """A fresh copy of `weights` on the device (`cast`: each tensor cast there, one at a time)."""
    with torch.device("meta"):
        model = CogVideoXTransformer(config)
    if cast is not None:
        weights = {k: v.to(device, cast) if v.is_floating_point() else v for k, v in weights.items()}
    model.load_state_dict(weights, assign=True)
    return model.to(device).eval()


def reference_transformer(config, weights: dict, device, cast: torch.dtype | None = None) -> torch.nn.Module:
    """The reference's (diffusers') transformer with `weights` on the device (`cast`: as `fresh_transformer`)."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})
    if cast is not None:
        weights = {k: v.to(device, cast) if v.is_floating_point() else v for k, v in weights.items()}
    ref.load_state_dict(weights, assign=True)
    if not config.use_rotary_positional_embeddings:
        # The 2B's sin-cos table is a non-persistent buffer, left on the meta device: recompute it.
        embed = ref.patch_embed
        embed.pos_embedding = embed._get_positional_embeddings(
            config.sample_height, config.sample_width, config.sample_frames
        )
    return ref.to(device).eval()


def host_random_state(module: torch.nn.Module, device, dtype, seed: int) -> dict[str, torch.Tensor]:
    """`random_state` drawn on `device`, kept in host memory. On the CPU, 5B's 5.6 billion normal values
    take half a minute of one core (the generator is serial); a GPU draws them in well under a second."""
    return {k: v.cpu() for k, v in random_state(module, device, dtype, seed).items()}


def failure(e: Exception) -> dict:
    """What a failed measurement records in place of its figures (the traceback goes to the log)."""
    traceback.print_exc()
    return {"error": f"{type(e).__name__}: {e}"[:2000]}


def transformer_modes(args, config, modes, steps, device, dtype, clock, result, lat_f, lat_h, lat_w, save) -> None:
    """Sections 1 to 3: the reference transformer (eager, compiled), the fp32 truth and each of our modes,
    into `result` (`save` writes it after each)."""
    # The weights, once, in host memory: every model below is a fresh copy of them.
    with torch.device("meta"):
        template = CogVideoXTransformer(config)
    weights = host_random_state(template, device, dtype, seed=1)
    del template
    result["transformer_params"] = sum(v.numel() for v in weights.values())

    g = torch.Generator(device="cpu").manual_seed(0)
    x, text, t = step_inputs(config, (lat_f, lat_h, lat_w), device, dtype, g)

    def ours(cast: torch.dtype | None = None) -> CogVideoXTransformer:
        return fresh_transformer(config, weights, device, cast)

    # The RoPE tables need only the config (not a whole model copied to the device for them).
    rope = CogVideoXTransformer.rotary_embedding(SimpleNamespace(config=config), lat_f, lat_h, lat_w, device)

    # 1. The reference, eager (and compiled).
    reference_out = compiled_out = None
    if not args.no_reference:
        reset_peak(device)
        ref = reference_transformer(config, weights, device)
        with torch.inference_mode():
            call = lambda: ref(x, text, t, image_rotary_emb=rope, return_dict=False)[0]  # noqa: E731
            reference_out, entry = time_step(call, clock, args.repeat)
            entry["peak_gib"] = peak_gib(device)
            result["reference_eager"] = entry
            if args.reference_compile:
                compiled = torch.compile(ref)
                call = lambda: compiled(x, text, t, image_rotary_emb=rope, return_dict=False)[0]  # noqa: E731
                compiled_out, result["reference_compiled"] = time_step(call, clock, args.repeat)
                result["reference_compiled"]["step_rel_l2_vs_reference"] = rel_l2(compiled_out, reference_out)
                del compiled  # it holds the model
        del ref
        torch._dynamo.reset()  # nor may the compiled graphs hold it while the truth or our modes run
        print("reference:", json.dumps({k: v for k, v in result.items() if k.startswith("reference")}), flush=True)
        save()

    # 2. The fp32 truth, alone on the device (the reference is freed, our copies come later).
    truth_out = None
    if not args.no_fp32_truth:
        truth: dict = {}
        try:
            truth_out = fp32_step(ours, x, text, t, rope, device, clock, truth)
        except Exception as e:  # recorded; the modes still run, without errors vs fp32
            truth.update(failure(e))
        result["fp32_truth"] = truth
        if truth_out is not None:
            for key, out in (("reference_eager", reference_out), ("reference_compiled", compiled_out)):
                if out is not None:
                    result[key]["step_rel_l2_vs_fp32"] = rel_l2(out, truth_out)
        reset_peak(device)
        print("fp32 truth:", json.dumps(truth), flush=True)
        save()
    compiled_out = None

    # 3. Our modes, each on a fresh copy.
    trajectory_truth = None
    noise = torch.randn(1, lat_f, config.in_channels, lat_h, lat_w, generator=g).to(device, dtype)
    scheduler_config = SchedulerConfig(snr_shift_scale=1.0 if args.variant == "5b" else 3.0)

    def trajectory(model) -> tuple[torch.Tensor, float]:
        scheduler = make_scheduler(scheduler_config, "ddim")
        scheduler.set_timesteps(steps, device=device)
        inputs = DenoiseInputs(noise, text, [6.0] * steps, rope)
        out = {}
        seconds = clock(lambda: out.setdefault("latents", denoise(model, scheduler, scheduler.timesteps, inputs)))
        return out["latents"], seconds

    ordered = sorted(modes, key=lambda m: m != "fused")  # the lossless run first: the lossy ones' truth
    if steps and any(m in LOSSY for m in modes) and "fused" not in modes:
        ordered.insert(0, "fused")

    def measure(mode: str, entry: dict) -> None:
        nonlocal trajectory_truth
        options = dict(MODES[mode])
        cached = "cache" in options
        if cached:
            options["cache"] = args.cache_threshold
        if options.get("attention") == "sage" and device.type != "cuda":
            options["attention"] = "sage-emulated"  # the kernel needs CUDA: its math, for the plumbing
            entry["note"] = "no CUDA: sage's math emulated in PyTorch"
        if options.get("attention") == "fa3-fp8" and device.type != "cuda":
            options["attention"] = "fa3-fp8-emulated"  # the kernel needs CUDA: its math, for the plumbing
            entry["note"] = "no CUDA: fa3-fp8's math emulated in PyTorch"
        if options.get("attention") == "fa3" and device.type != "cuda":
            options["attention"] = "auto"  # the kernel needs CUDA: exact attention stands in, for the plumbing
            entry["note"] = "no CUDA: SDPA stands in for fa3"
        if "attention" not in options and device.type == "cuda":
            # cuDNN, as the earlier runs measured these modes ("auto" now runs FlashAttention-3 where it is
            # installed: the "fa3" modes measure that)
            options["attention"] = "cudnn"
        entry["options"] = dict(options)
        dense_v = options.pop("dense_v", False)
        reset_peak(device)
        torch._dynamo.reset()  # each compiled mode pays its own warm-up
        model = ours()
        with torch.inference_mode():
            record = fast.apply(model, **options)
            entry["levers"] = record.describe()
            if dense_v:  # before the first call, so that the compiled blocks trace the copy
                entry["levers"] += ", v dense per head"
                with_dense_v(model)
            entry["weight_gib"] = round(module_bytes(model) / 2**30, 3)
            call = lambda: model(x, text, t, image_rotary_emb=rope)  # noqa: E731
            if cached:  # its time comes from the trajectory: one repeated input never skips
                first = clock(lambda: entry.setdefault("out", call()))
                out, entry["first_call_s"] = entry.pop("out"), round(first, 2)
            else:
                out, timing = time_step(call, clock, args.repeat)
                entry.update(timing, peak_gib=peak_gib(device))
            if reference_out is not None:
                entry["step_rel_l2_vs_reference"] = rel_l2(out, reference_out)
                if "step_ms" in entry:
                    entry["step_over_reference_eager"] = round(entry["step_ms"] / result["reference_eager"]["step_ms"], 3)
                    if "reference_compiled" in result:
                        entry["step_over_reference_compiled"] = round(
                            entry["step_ms"] / result["reference_compiled"]["step_ms"], 3
                        )
            if truth_out is not None:
                entry["step_rel_l2_vs_fp32"] = rel_l2(out, truth_out)
            if steps and (mode in LOSSY or mode == "fused"):
                if record.cache is not None:
                    record.cache.reset()
                latents, seconds = trajectory(model)
                entry["trajectory_steps"] = steps
                entry["trajectory_s"] = round(seconds, 2)
                if mode == "fused":
                    trajectory_truth = latents
                else:
                    entry["trajectory_rel_l2_vs_fused"] = rel_l2(latents, trajectory_truth)
                if record.cache is not None:
                    entry["cache"] = record.cache.stats()
                    # warm-up excluded: the first step of a compiled model compiles
                    _, seconds = trajectory(model)
                    entry["trajectory_s"] = round(seconds, 2)
                    entry["step_ms"] = round(1000 * seconds / steps, 1)
                    entry["steps_50_s"] = round(50 * seconds / steps, 1)
                    entry["peak_gib"] = peak_gib(device)
                    if "reference_eager" in result:
                        entry["step_over_reference_eager"] = round(entry["step_ms"] / result["reference_eager"]["step_ms"], 3)

    for mode in ordered:
        entry = {}
        try:
            measure(mode, entry)
        except Exception as e:  # recorded; the other modes still run (a missing truth fails the lossy ones)
            entry.update(failure(e))
        reset_peak(device)
        if mode in modes or "error" in entry:
            result["modes"][mode] = entry
        print(mode, json.dumps(entry), flush=True)
        save()


def fp32_step(ours, x, text, t, rope, device, clock, entry: dict) -> torch.Tensor:
    """One step of a fresh fp32 copy of our transformer (no levers) on `x` and `text` cast to fp32, with
    TF32 matmuls and convolutions off (restored afterwards); fills `entry` with its time, peak and weight
    bytes, frees the copy and returns the output."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reset_peak(device)
        model = ours(torch.float32)
        entry["weight_gib"] = round(module_bytes(model) / 2**30, 3)
        with torch.inference_mode():
            out = {}
            seconds = clock(lambda: out.setdefault("out", model(x.float(), text.float(), t, image_rotary_emb=rope)))
        entry.update(step_ms=round(1000 * seconds, 1), peak_gib=peak_gib(device), tf32=False)
        del model
        return out["out"]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def with_dense_v(model) -> None:
    """Every attention layer of `model` hands its kernel v copied dense per head ([B, heads, L, d]
    contiguous) instead of the view of the fused QKV output it is: exact, one copy of v a layer."""
    from cogvideox.models.attention import JointAttention

    for attn in (m for m in model.modules() if isinstance(m, JointAttention)):
        attend = attn.attend
        attn.attend = lambda q, k, v, attend=attend: attend(q, k, v.contiguous())


def attention_inputs(shape, device, dtype, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of `shape` [B, heads, L, d] in `dtype`, as the joint attention gets them: q and k out of
    LayerNorms, related through a shared part (so that attention has structure), k with a per-channel
    offset shared by all tokens (norm_k's bias), the outlier that sage's smoothing removes."""
    g = torch.Generator(device=device).manual_seed(seed)
    d = shape[-1]

    def normal(*size):
        return torch.randn(*size, generator=g, device=device)

    shared = normal(*shape)
    q = torch.nn.functional.layer_norm(shared + normal(*shape), (d,)).to(dtype)
    del shared  # k's shared part is drawn afresh: the 5B's fp32 tensors are 0.44 GB each
    k = (torch.nn.functional.layer_norm(normal(*shape), (d,)) + 5 * normal(d)).to(dtype)
    return q, k, normal(*shape).to(dtype)


def attention_kernels(shape, device, dtype, clock, repeat: int, report: dict, save) -> None:
    """The attention kernels alone on one set of inputs of `shape`: time, TFLOP/s and error against fp32
    SDPA, into `report` (`save` writes it after each kernel; a kernel that fails is recorded, the others
    still run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cogvideox.fast.flash3 import fa3_attend
    from cogvideox.fast.fp8_attention import fa3_fp8_attend, fp8_attention_emulated
    from cogvideox.fast.sage import sage_attention, sage_attention_emulated, smooth_keys

    B, H, L, d = shape
    flops = 4 * B * H * L * L * d
    q, k, v = attention_inputs(shape, device, dtype)
    flags = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:  # the truth: fp32 SDPA of the same (rounded) inputs; the math kernel would need L^2 scores at 5B
        truth_backend = SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH
        with torch.inference_mode(), sdpa_kernel([truth_backend]):
            truth = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flags

    # v as the model hands it over: a view of the fused QKV projection's output [B, L, 3, heads, d] (every
    # token's 64 channels of a head 3 x heads x d apart), where q and k come out of their LayerNorms head by
    # head; the same values, so the same outputs, in the layout the model's kernels read (the kernels ran
    # about 12% slower in the model than alone: is it this layout?)
    qkv = torch.empty(B, L, 3, H, d, dtype=dtype, device=device)
    for i, t in enumerate((q, k, v)):
        qkv[:, :, i] = t.transpose(1, 2)
    q_view, k_view, v_model = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # all three as views of it too

    def sdpa(backend, inputs=(q, k, v)):
        def call():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(*inputs)

        return call

    if device.type == "cuda":
        kernels = {"sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
                   "fa3": lambda: fa3_attend(q, k, v), "sage": lambda: sage_attention(q, smooth_keys(k), v),
                   "fa3_fp8": lambda: fa3_fp8_attend(q, k, v),
                   "sdpa_cudnn_v_from_qkv": sdpa(SDPBackend.CUDNN_ATTENTION, (q, k, v_model)),
                   "fa3_v_from_qkv": lambda: fa3_attend(q, k, v_model),
                   "sdpa_cudnn_qkv_views": sdpa(SDPBackend.CUDNN_ATTENTION, (q_view, k_view, v_model)),
                   "fa3_qkv_views": lambda: fa3_attend(q_view, k_view, v_model)}  # fmt: skip
    else:  # stand-ins, for the plumbing: no CUDA kernels here
        kernels = {"sdpa_math (cpu)": sdpa(SDPBackend.MATH),
                   "sage_emulated (cpu)": lambda: sage_attention_emulated(q, k, v),
                   "fa3_fp8_emulated (cpu)": lambda: fp8_attention_emulated(q, k, v),
                   "sdpa_math_v_from_qkv (cpu)": sdpa(SDPBackend.MATH, (q, k, v_model))}  # fmt: skip
    emulations = {"sage": sage_attention_emulated, "fa3_fp8": fp8_attention_emulated}
    for name, call in kernels.items():
        try:
            with torch.inference_mode():
                out, timing = time_step(call, clock, repeat)
            seconds = timing["step_ms"] / 1000
            report[name] = {"ms": timing["step_ms"], "first_call_ms": round(1000 * timing["first_call_s"], 1),
                            "tflops": float(f"{flops / seconds / 1e12:.3g}"),
                            "rel_l2_vs_fp32": rel_l2(out, truth)}  # fmt: skip
            if name in emulations:  # the kernel against its emulation, on a slice (the emulation is slow)
                part = (slice(0, 1), slice(0, 4))
                emulated = emulations[name](q[part], k[part], v[part])
                report[name]["vs_emulated_rel_l2_4_heads"] = rel_l2(out[part], emulated)
                report[name]["emulated_rel_l2_vs_fp32_4_heads"] = rel_l2(emulated, truth[part])
            del out
        except Exception as e:  # recorded; the other kernels still run
            report[name] = failure(e)
        print(f"attention {name}: {json.dumps(report[name])}", flush=True)
        save()


# The VAE decode variants in the order they run: who decodes (the reference or ours), with which levers
# (see cogvideox/fast/vae.py, group_norm.py and modulation.py), whole or tiled. The JSON keys (and the table rows) are the names below.
# The most informative come first and each is recorded as soon as it is measured, so that a run cut
# short by its time cap keeps them: the reference and ours; the GroupNorm statistics by parallel
# reductions (`vae_parallel_norms`: GroupNorm's own statistics kernel took 37% of the decode), whole,
# alone and with the decoder norms' modulation at the latent's size (`vae_latent_modulation`), and with
# the activations written into the causal convolutions' padded inputs too ("lean": `vae_pad_in_place`), and
# with the resnet blocks' conv1 biases added inside the norms after them ("lean_fold": `vae_fold_conv_bias`),
# then tiled after the tiled reference and ours it is compared with, then with the raw moments rather
# than Welford's variance; the 3D convolutions run as 2D ones (`vae_conv2d`), on our usual layout and
# on channels-last, where the frames fold into the batch for free; the fused norms (compiled: a slow
# first call). Then what the 2026-11-29 run measured once (BENCHMARKS.md): cuDNN's algorithm search,
# channels-last 3D convolutions (2.3x slower then); and last the 2D convolutions with every other lever.
VAE_VARIANTS = {
    "reference_whole": dict(reference=True),
    "ours_whole": dict(),
    "ours_parallel_norms_whole": dict(parallel_norms="welford"),
    "ours_parallel_norms_modulation_whole": dict(parallel_norms="welford", latent_modulation=True),
    "ours_lean_whole": dict(parallel_norms="welford", latent_modulation=True, pad_in_place=True),
    "ours_lean_fold_whole": dict(
        parallel_norms="welford", latent_modulation=True, pad_in_place=True, fold_conv_bias=True
    ),
    "reference_tiled": dict(reference=True, tiled=True),
    "ours_tiled": dict(tiled=True),
    "ours_parallel_norms_tiled": dict(parallel_norms="welford", tiled=True),
    "ours_parallel_norms_modulation_tiled": dict(parallel_norms="welford", latent_modulation=True, tiled=True),
    "ours_lean_tiled": dict(parallel_norms="welford", latent_modulation=True, pad_in_place=True, tiled=True),
    "ours_lean_fold_tiled": dict(
        parallel_norms="welford", latent_modulation=True, pad_in_place=True, fold_conv_bias=True, tiled=True
    ),
    "ours_parallel_norms_raw_whole": dict(parallel_norms="raw"),
    "ours_conv2d_whole": dict(conv2d=True),
    "ours_conv2d_channels_last_whole": dict(conv2d=True, channels_last=True),
    "ours_fused_whole": dict(fuse_norms=True),
    "ours_conv2d_channels_last_tiled": dict(conv2d=True, channels_last=True, tiled=True),
    "ours_cudnn_benchmark_whole": dict(cudnn_benchmark=True),
    "ours_channels_last_whole": dict(channels_last=True),
    "ours_conv2d_channels_last_fused_whole": dict(conv2d=True, channels_last=True, fuse_norms=True),
}


def fresh_vae(vae_config, weights: dict, device, options: dict) -> torch.nn.Module:
    """A fresh copy of `weights` on the device: the reference's VAE or ours with the levers `options` names
    (`conv2d`, `channels_last`, `parallel_norms` (its moments: "welford" or "raw"), `latent_modulation`,
    `pad_in_place`, `fold_conv_bias`, `fuse_norms`, as in
    VAE_VARIANTS; the fused norms compile at the first decode)."""
    with torch.device("meta"):
        if options.get("reference"):
            from diffusers import AutoencoderKLCogVideoX

            vae = AutoencoderKLCogVideoX(**vae_config.to_dict())
        else:
            vae = CogVideoXVAE(vae_config)
    vae.load_state_dict(weights, assign=True)
    return apply_vae_levers(vae.to(device).eval(), options)


def apply_vae_levers(vae: torch.nn.Module, options: dict) -> torch.nn.Module:
    """Our VAE with the levers `options` names (as in VAE_VARIANTS), in the order they compose."""
    if options.get("conv2d"):
        fast.vae_conv2d(vae)
    if options.get("channels_last"):
        fast.vae_channels_last(vae)
    if options.get("parallel_norms"):
        fast.vae_parallel_norms(vae, options["parallel_norms"])
    if options.get("latent_modulation"):
        fast.vae_latent_modulation(vae)
    if options.get("pad_in_place"):
        fast.vae_pad_in_place(vae)
    if options.get("fold_conv_bias"):
        fast.vae_fold_conv_bias(vae)
    if options.get("fuse_norms"):
        fast.vae_fuse_norms(vae)
    return vae


def decode_latents(vae_config, latent: tuple[int, int, int], device, dtype) -> torch.Tensor:
    """The latents every VAE variant decodes: [1, C, F, h, w], seed 5."""
    g = torch.Generator(device="cpu").manual_seed(5)
    return torch.randn(1, vae_config.latent_channels, *latent, generator=g).to(device, dtype)


def vae_decode(vae_config, device, dtype, clock, latent, variants, no_reference, report: dict, save) -> None:
    """Each variant of VAE_VARIANTS decodes the same latents: its first call (with cuDNN's algorithm
    search when it is on, with compilation for the fused norms) and the median of two more (one more on
    the CPU, where this is a smoke test); then, at once, its error against our exact decode and the
    reference's (of the same tiling). `variants`: which of VAE_VARIANTS (in its order). Fills `report`
    (`save` writes it after each variant)."""
    with torch.device("meta"):
        template = CogVideoXVAE(vae_config)
    weights = host_random_state(template, device, dtype, seed=2)
    del template
    z = decode_latents(vae_config, latent, device, dtype)
    bases = {}  # the reference's and our exact videos, in host memory (on the device they would count in peaks)

    def measure(key: str, options: dict) -> torch.Tensor:
        vae = fresh_vae(vae_config, weights, device, options)
        vae.enable_tiling() if options.get("tiled") else vae.disable_tiling()
        decode = (lambda: vae.decode(z).sample) if options.get("reference") else (lambda: vae.decode(z))
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = bool(options.get("cudnn_benchmark"))
        try:
            reset_peak(device)
            with torch.inference_mode():
                video = {}
                first = clock(lambda: video.setdefault("out", decode()))
                out = video.pop("out").cpu()
                seconds = statistics.median([clock(decode) for _ in range(2 if device.type == "cuda" else 1)])
        finally:
            torch.backends.cudnn.benchmark = benchmark
        report[key] = {"ms": round(1000 * seconds, 1), "first_ms": round(1000 * first, 1), "peak_gib": peak_gib(device)}
        return out

    for key, options in VAE_VARIANTS.items():
        if key not in variants or (options.get("reference") and no_reference):
            continue
        tiling = "tiled" if options.get("tiled") else "whole"
        try:
            out = measure(key, options)
            entry = report[key]
            if key in (f"reference_{tiling}", f"ours_{tiling}"):
                bases[key] = out
            if key != f"ours_{tiling}" and not options.get("reference") and f"ours_{tiling}" in bases:
                entry["rel_l2_vs_ours"] = rel_l2(out, bases[f"ours_{tiling}"])
            if not options.get("reference") and f"reference_{tiling}" in bases:
                entry["rel_l2_vs_reference"] = rel_l2(out, bases[f"reference_{tiling}"])
                entry["over_reference"] = round(entry["ms"] / report[f"reference_{tiling}"]["ms"], 3)
            if key == "ours_tiled" and "ours_whole" in bases:
                report["ours_tiled_vs_whole_rel_l2"] = rel_l2(out, bases["ours_whole"])
        except Exception as e:  # recorded; the other variants still run
            report[key] = failure(e)
        print(f"vae {key}: {json.dumps(report[key])}", flush=True)
        reset_peak(device)
        save()


def markdown(result: dict) -> str:
    def cell(value) -> str:
        return "" if value is None else str(value)

    steps = next((e["trajectory_steps"] for e in result["modes"].values() if "trajectory_steps" in e), "n")
    rows = ["| what | step ms | 50 steps s | vs ref eager | peak GiB | weights GiB | 1-step err vs ref | "
            f"1-step err vs fp32 | {steps}-step err vs fused | steps computed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    if not result["modes"] and "reference_eager" not in result:
        rows = []  # --vae-only
    if "reference_eager" in result:
        r = result["reference_eager"]
        rows.append(f"| reference eager | {r['step_ms']} | {r['steps_50_s']} | 1 | {cell(r['peak_gib'])} | | | "
                    f"{r.get('step_rel_l2_vs_fp32', '')} | | |")
    if "reference_compiled" in result:
        r = result["reference_compiled"]
        ratio = round(r["step_ms"] / result["reference_eager"]["step_ms"], 3)
        rows.append(f"| reference compiled | {r['step_ms']} | {r['steps_50_s']} | {ratio} | | | "
                    f"{r.get('step_rel_l2_vs_reference', '')} | {r.get('step_rel_l2_vs_fp32', '')} | | |")
    truth = result.get("fp32_truth")
    if truth and "error" in truth:
        rows.append(f"| fp32 truth | failed: {truth['error'].splitlines()[0][:200]} | | | | | | | | |")
    elif truth:  # one call, no warm-up
        rows.append(f"| fp32 truth (ours, TF32 off, one call) | {truth['step_ms']} | | | {cell(truth['peak_gib'])} | "
                    f"{truth['weight_gib']} | | 0 | | |")
    for mode, e in result["modes"].items():
        if "error" in e:
            rows.append(f"| {mode} | failed: {e['error'].splitlines()[0][:200]} | | | | | | | | |")
            continue
        cache = e.get("cache")
        computed = f"{cache['computed']}/{cache['calls']}" if cache else ""
        rows.append(
            f"| {mode} ({e['levers']}) | {e.get('step_ms', '')} | {e.get('steps_50_s', '')} | "
            f"{e.get('step_over_reference_eager', '')} | {cell(e.get('peak_gib'))} | {e['weight_gib']} | "
            f"{e.get('step_rel_l2_vs_reference', '')} | {e.get('step_rel_l2_vs_fp32', '')} | "
            f"{e.get('trajectory_rel_l2_vs_fused', '')} | {computed} |"
        )
    if "vae_decode" in result:
        rows += ["", "| VAE decode | ms | first call ms | vs reference | peak GiB | rel. L2 vs ours exact | vs reference |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for key, e in result["vae_decode"].items():
            if isinstance(e, dict) and "error" in e:
                rows.append(f"| {key} | failed: {e['error'].splitlines()[0][:200]} | | | | | |")
            elif isinstance(e, dict):
                rows.append(
                    f"| {key} | {e['ms']} | {e['first_ms']} | {e.get('over_reference', '')} | {cell(e['peak_gib'])} | "
                    f"{e.get('rel_l2_vs_ours', '')} | {e.get('rel_l2_vs_reference', '')} |"
                )
    if "attention_kernels" in result:
        kernels = result["attention_kernels"]
        rows += ["", f"| attention {'x'.join(map(str, kernels['shape']))} | ms | TFLOP/s | rel. L2 vs fp32 |",
                 "| --- | --- | --- | --- |"]  # fmt: skip
        for key, e in kernels.items():
            if isinstance(e, dict) and "error" in e:
                rows.append(f"| {key} | failed: {e['error'].splitlines()[0][:200]} | | |")
            elif isinstance(e, dict):
                rows.append(f"| {key} | {e['ms']} | {e['tflops']} | {e['rel_l2_vs_fp32']} |")
    if "t5" in result:
        rows.append(f"\nT5 encode (2 prompts): {result['t5']['encode_ms']} ms")
    return "\n".join(rows)


if __name__ == "__main__":
    main()

"""Full-size CogVideoX with random weights: a short generation end to end, and one transformer step
against the reference in the same process.

    python benchmarks/core_full_size.py --variant 5b            # on a GPU: 49 x 480 x 720, bf16, 2 steps
    python benchmarks/core_full_size.py --variant 5b --tiny     # a tiny config on the CPU (smoke test)

Reports, as JSON under $OUT (or the current folder): load/build time, per-stage times of a
`num_inference_steps`-step generation (T5, denoising, VAE decode), the per-step transformer time (median
of several forwards at CFG batch 2), peak GPU memory, and, when `diffusers` is installed, the reference
transformer's time on the same weights and inputs with our output's relative L2 error against it. The
step peaks of ours and of the reference both hold the transformer alone (T5 and the VAE are freed after
the end-to-end run). The JSON is rewritten after each part, so a run stopped by a time cap keeps the
parts it finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cogvideox.models.config import SchedulerConfig, VAEConfig
from cogvideox.models.transformer import TRANSFORMER_PRESETS, CogVideoXTransformer
from cogvideox.models.vae import CogVideoXVAE
from cogvideox.pipeline import Pipeline
from cogvideox.schedulers import make_scheduler
from cogvideox.text import TextEncoder

T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128)
T5_TINY = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=200)


def save_json(path: Path, value) -> None:
    """Write `value` as JSON to `path` whole or not at all: the scripts rewrite their results after every
    measurement, and a time cap's kill must not leave a cut-off file where the last complete one was."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(part, path)


def random_state(module: torch.nn.Module, device, dtype, seed: int) -> dict[str, torch.Tensor]:
    """Small random values for every tensor of `module`'s state dict (weights ~ N(0, 0.02), norms ~ 1).

    Tied tensors (T5's shared embedding) get one value, so loading keeps them tied.
    """
    state, made = {}, {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in made:
            g = torch.Generator(device=device).manual_seed(seed)
            seed += 1
            values = torch.randn(t.shape, generator=g, device=device) * 0.02
            if t.ndim == 1 and "norm" in name and name.endswith("weight"):
                values += 1.0
            made[id(t)] = values.to(dtype)
        state[name] = made[id(t)]
    return state


def build(module_fn, device, dtype, seed):
    """Build on the meta device and load random tensors by assignment, as checkpoint loading does.

    Loading (not `to_empty`) matters: buffers that are computed rather than saved, such as the 2B
    sin-cos positional table, are recomputed by their modules' load hooks; after `to_empty` they would
    hold whatever the fresh memory held (NaN outputs).
    """
    with torch.device("meta"):
        module = module_fn()
    module.load_state_dict(random_state(module, device, dtype, seed), strict=True, assign=True)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    assert not leftover, f"still on the meta device: {leftover}"
    return module.eval()


def make_text_encoder(workdir: Path, t5: dict, device, dtype) -> TextEncoder:
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    words = "a the panda plays guitar in bamboo forest under soft light and small red jacket".split()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(words)] * 20 + words * 10), model_prefix=str(workdir / "spiece"),
        vocab_size=40, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    tokenizer = T5Tokenizer(vocab_file=str(workdir / "spiece.model"))
    config = T5Config(**t5, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    model = build(lambda: T5EncoderModel(config), device, dtype, seed=3)
    return TextEncoder(tokenizer, model)


def timed(fn, device, warmup=1, repeat=3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def bench_device(tiny: bool) -> tuple[torch.device, torch.dtype]:
    """The GPU in bf16 when there is one (and not --tiny), else the CPU in fp32."""
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def build_pipeline(variant: str, tiny: bool, device, dtype, workdir: Path, tiny_layers: int = 2):
    """The released 5B or 2B architecture with random weights (tiny: a few small layers, for the CPU).

    Returns (pipeline, the transformer config, dict(num_frames, height, width) of a full-size video).
    """
    preset = TRANSFORMER_PRESETS["CogVideoX-5b" if variant == "5b" else "CogVideoX-2b"]
    vae_config = VAEConfig(scaling_factor=0.7 if variant == "5b" else 1.15258426)
    t5, size = T5_XXL, dict(num_frames=49, height=480, width=720)
    if tiny:
        preset = preset.replace(num_layers=tiny_layers, num_attention_heads=2, text_embed_dim=32,
                                sample_height=8, sample_width=12, sample_frames=9)  # fmt: skip
        vae_config = VAEConfig(block_out_channels=(16, 16, 16, 16), norm_num_groups=4, layers_per_block=1,
                               scaling_factor=vae_config.scaling_factor, sample_height=64, sample_width=96)  # fmt: skip
        t5, size = T5_TINY, dict(num_frames=9, height=64, width=96)
    text_encoder = make_text_encoder(workdir, t5, device, dtype)
    transformer = build(lambda: CogVideoXTransformer(preset), device, dtype, seed=1)
    vae = build(lambda: CogVideoXVAE(vae_config), device, dtype, seed=2)
    scheduler = make_scheduler(SchedulerConfig(snr_shift_scale=1.0 if variant == "5b" else 3.0), "ddim")
    return Pipeline(transformer, vae, text_encoder, scheduler), preset, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("5b", "2b"), default="5b")
    p.add_argument("--steps", type=int, default=2, help="denoising steps of the end-to-end run")
    p.add_argument("--repeat", type=int, default=5, help="transformer forwards timed for the median")
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU, to check the script runs")
    p.add_argument("--no-reference", action="store_true", help="skip the diffusers comparison")
    args = p.parse_args()

    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"core_full_size_{args.variant}{'_tiny' if args.tiny else ''}.json"
    device, dtype = bench_device(args.tiny)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pipe, preset, size = build_pipeline(args.variant, args.tiny, device, dtype, Path(tmp))
    build_s = time.perf_counter() - t0
    transformer = pipe.transformer
    frames, height, width = size["num_frames"], size["height"], size["width"]
    result: dict = {
        "variant": args.variant, "tiny": args.tiny, "device": str(device), "dtype": str(dtype),
        "torch": torch.__version__, "frames": frames, "height": height, "width": width,
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()

    result["build_s"] = build_s
    result["transformer_params"] = sum(p.numel() for p in transformer.parameters())

    def save() -> None:
        save_json(path, result)

    save()

    # 1. End to end: T5, `steps` denoising steps with CFG, VAE decode.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prompt = "a panda plays guitar in a bamboo forest under soft light"
    out = pipe(prompt, num_frames=frames, height=height, width=width, num_inference_steps=args.steps,
               seed=42, progress=False, max_sequence_length=preset.max_text_seq_length)
    result["end_to_end"] = {k: round(v, 3) for k, v in out.timings.items()}
    result["end_to_end"]["per_step_s"] = round(out.timings["denoise"] / args.steps, 3)
    if device.type == "cuda":
        result["end_to_end"]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    assert out.frames[0].shape == (frames, height, width, 3)
    save()
    # T5 and the VAE leave the device: the step peaks below, ours and the reference's, hold the same things.
    del pipe, out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. One transformer step at CFG batch 2, timed alone.
    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 8, width // 8
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, lat_f, 16, lat_h, lat_w, generator=g).to(device, dtype)
    text = torch.randn(2, preset.max_text_seq_length, preset.text_embed_dim, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    rope = transformer.rotary_embedding(lat_f, lat_h, lat_w, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        ours_out = transformer(x, text, t, image_rotary_emb=rope)
        ours = timed(lambda: transformer(x, text, t, image_rotary_emb=rope), device, 1, args.repeat)
    result["ours_step_ms"] = round(1000 * statistics.median(ours), 1)
    result["ours_50_steps_s"] = round(50 * statistics.median(ours), 1)
    if device.type == "cuda":
        result["ours_step_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    save()

    # 3. The reference on the same weights and inputs.
    if not args.no_reference:
        try:
            from diffusers import CogVideoXTransformer3DModel
        except ImportError:
            result["reference"] = "diffusers not installed"
        else:
            cfg = {k: v for k, v in preset.to_dict().items() if not k.startswith("_")}
            with torch.device("meta"):
                ref = CogVideoXTransformer3DModel(**cfg)
            ref.load_state_dict(transformer.state_dict(), assign=True)
            if not preset.use_rotary_positional_embeddings:
                # The reference's sin-cos table is not in the state dict either: its own code recomputes it.
                embed = ref.patch_embed
                embed.pos_embedding = embed._get_positional_embeddings(
                    preset.sample_height, preset.sample_width, preset.sample_frames
                )
            ref = ref.to(device, dtype).eval()
            del transformer
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                call = lambda: ref(x, text, t, image_rotary_emb=rope, return_dict=False)[0]  # noqa: E731
                ref_out = call()
                ref_times = timed(call, device, 1, args.repeat)
            err = ((ours_out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
            result["reference_step_ms"] = round(1000 * statistics.median(ref_times), 1)
            result["reference_50_steps_s"] = round(50 * statistics.median(ref_times), 1)
            result["step_ratio_ours_over_reference"] = round(statistics.median(ours) / statistics.median(ref_times), 3)
            result["step_rel_l2_error"] = err
            if device.type == "cuda":
                result["reference_step_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

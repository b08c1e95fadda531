"""Host memory of loading a full-size checkpoint: ours against the reference, component by component.

Loading must not need a second copy of the weights: our networks are built on the meta device and receive
their tensors by assignment, read one at a time and cast straight to the target dtype. This script
measures how close that comes to the weights themselves.

    python benchmarks/load_memory.py --variant 5b --dir runs/ckpt-5b            # builds the folder once
    python benchmarks/load_memory.py --variant 5b --dir runs/ckpt-5b --what transformer,vae,text_encoder
    python benchmarks/load_memory.py --variant 2b --dir runs/ckpt-2b --what pipeline
    python benchmarks/load_memory.py --tiny --dir /tmp/ckpt-tiny                # plumbing check, seconds

The first run writes a folder in the official diffusers layout with random weights, bf16 for 5B and fp16
for 2B as released (transformer in 10 GB shards, T5-XXL in 5 GB shards, the tokenizer of the demo model:
only the weights matter here). Each
measurement then runs in a fresh process, loads one thing in bf16 on the CPU, and samples its memory
every few milliseconds from /proc/self/status:

- `peak RSS`: the kernel's high-water mark of resident memory (VmHWM). It counts pages of a file that is
  memory-mapped while they are resident, so it is the strictest figure;
- `peak anon`: the highest sampled RssAnon, the memory that cannot be given back to the page cache;
- both before loading (the interpreter and its libraries), and as a ratio of the loaded weight bytes.

After loading, one element per memory page of every weight is read (`touch`): a loader may return
tensors that map the file lazily, and their memory only shows once a forward pass has read them. The
peaks cover the load and that first read.

`--reference` adds the same loads through diffusers (`from_pretrained(..., dtype=bfloat16)`) and
transformers. Results go to `$OUT/load_memory_<variant>_<dtype>[_tiny].json` and a table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_full_size import T5_TINY, T5_XXL, build  # noqa: E402
from host_memory import HostPeak, status  # noqa: E402

from cogvideox import loading, weights  # noqa: E402
from cogvideox.models.config import SchedulerConfig, VAEConfig  # noqa: E402
from cogvideox.models.transformer import TRANSFORMER_PRESETS, CogVideoXTransformer  # noqa: E402
from cogvideox.models.vae import CogVideoXVAE  # noqa: E402

DEMO_TOKENIZER = Path(loading.__file__).parent / "demo" / "weights" / "tokenizer"
GIB = 2**30


# ---------------------------------------------------------------------------------------------------
# The checkpoint folder


def configs(variant: str, tiny: bool):
    preset = TRANSFORMER_PRESETS["CogVideoX-5b" if variant == "5b" else "CogVideoX-2b"]
    vae = VAEConfig(scaling_factor=0.7 if variant == "5b" else 1.15258426)
    t5 = T5_XXL
    if tiny:
        preset = preset.replace(num_layers=2, num_attention_heads=2, text_embed_dim=32,
                                sample_height=8, sample_width=12, sample_frames=9)  # fmt: skip
        vae = VAEConfig(block_out_channels=(16, 16, 16, 16), norm_num_groups=4, layers_per_block=1,
                        scaling_factor=vae.scaling_factor, sample_height=64, sample_width=96)  # fmt: skip
        t5 = T5_TINY
    return preset, vae, t5


def write_checkpoint(folder: Path, variant: str, tiny: bool) -> None:
    """A model folder in the official layout with random weights, one component in memory at a time: in
    bf16 for 5B and fp16 for 2B, as the released checkpoints are stored."""
    from transformers import T5Config, T5EncoderModel

    preset, vae_config, t5 = configs(variant, tiny)
    shard = "10MB" if tiny else "10GB"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    dtype = torch.bfloat16 if variant == "5b" else torch.float16

    t0 = time.perf_counter()
    transformer = build(lambda: CogVideoXTransformer(preset), "cpu", dtype, seed=1)
    (partial / "transformer").mkdir(parents=True)
    transformer.config.save(partial / "transformer" / "config.json")
    weights.save_weights(transformer, partial / "transformer", max_shard_size=shard)
    del transformer
    gc.collect()
    print(f"transformer written ({time.perf_counter() - t0:.0f} s)", flush=True)

    vae = build(lambda: CogVideoXVAE(vae_config), "cpu", dtype, seed=2)
    (partial / "vae").mkdir()
    vae.config.save(partial / "vae" / "config.json")
    weights.save_weights(vae, partial / "vae", max_shard_size=shard)
    del vae
    gc.collect()

    t0 = time.perf_counter()
    config = T5Config(**t5, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    encoder = build(lambda: T5EncoderModel(config), "cpu", dtype, seed=3)
    encoder.save_pretrained(partial / "text_encoder", max_shard_size="5MB" if tiny else "5GB")
    del encoder
    gc.collect()
    print(f"text encoder written ({time.perf_counter() - t0:.0f} s)", flush=True)

    shutil.copytree(DEMO_TOKENIZER, partial / "tokenizer")
    (partial / "scheduler").mkdir()
    scheduler = SchedulerConfig(snr_shift_scale=1.0 if variant == "5b" else 3.0).to_dict()
    scheduler["_class_name"] = "CogVideoXDDIMScheduler"
    (partial / loading.SCHEDULER_CONFIG).write_text(json.dumps(scheduler, indent=2) + "\n")
    (partial / loading.MODEL_INDEX).write_text(json.dumps(loading.model_index(), indent=2) + "\n")
    partial.rename(folder)  # complete or absent: an interrupted build is redone, never half-used


# ---------------------------------------------------------------------------------------------------
# One measurement, in its own process


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def loader(who: str, what: str, folder: Path, dtype: torch.dtype):
    """A function that loads `what` the way `who` does: "transformer", "vae", "text_encoder", "pipeline",
    or (ours only) "packed": the pipeline, then every weight packed into the host buffers that
    `--offload stream` copies to the GPU from (on the CPU here, so the buffers are not page-locked);
    "packed_transformer" / "packed_text_encoder": the same for one component."""
    cpu = torch.device("cpu")
    if who == "ours":
        from cogvideox.pipeline import Pipeline

        from cogvideox.fast import offload

        def packed():
            pipe = Pipeline.from_pretrained(folder, dtype=dtype, device="cpu")
            pipe.offload = offload.apply(pipe, "stream", cpu)
            return pipe

        def packed_transformer():
            model = loading.load_transformer(folder, dtype, cpu)
            model.offload = offload.Offload("stream", cpu)
            model.offload.add_component("transformer", model, [model], model.transformer_blocks)
            return model

        def packed_text_encoder():
            model = loading.load_text_encoder(folder, dtype, cpu).model
            model.offload = offload.Offload("stream", cpu)
            model.offload.add_component("text_encoder", model, [model], offload.text_blocks(model))
            return model

        return {
            "packed": packed,
            "packed_transformer": packed_transformer,
            "packed_text_encoder": packed_text_encoder,
            "transformer": lambda: loading.load_transformer(folder, dtype, cpu),
            "vae": lambda: loading.load_vae(folder, dtype, cpu),
            "text_encoder": lambda: loading.load_text_encoder(folder, dtype, cpu),
            "pipeline": lambda: Pipeline.from_pretrained(folder, dtype=dtype, device="cpu"),
        }[what]
    import diffusers
    from transformers import T5EncoderModel

    return {
        "transformer": lambda: diffusers.CogVideoXTransformer3DModel.from_pretrained(
            folder, subfolder="transformer", dtype=dtype
        ),
        "vae": lambda: diffusers.AutoencoderKLCogVideoX.from_pretrained(folder, subfolder="vae", dtype=dtype),
        "text_encoder": lambda: T5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype),
        "pipeline": lambda: diffusers.CogVideoXPipeline.from_pretrained(folder, dtype=dtype),
    }[what]


def weight_tensors(loaded) -> list[torch.Tensor]:
    """Every distinct parameter and buffer of the loaded modules (tied tensors once)."""
    modules = []
    for name in ("transformer", "vae", "text_encoder"):
        part = getattr(loaded, name, None)
        if part is not None:
            modules.append(getattr(part, "model", part))  # our TextEncoder wraps the T5 model
    if not modules:
        modules = [loaded]
    seen, tensors = set(), []
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                tensors.append(t)
    return tensors


def touch(tensors: list[torch.Tensor]) -> None:
    """Read one element per 4 KiB page of every tensor, as the first forward pass would read them all.

    Loading may hand back tensors that map the checkpoint file lazily (safetensors does when no cast is
    needed); their pages become resident only when read, so the memory a loaded model really takes shows
    after this.
    """
    for t in tensors:
        flat = t.detach().reshape(-1)
        float(flat[:: max(1, 4096 // t.element_size())].float().sum())


def measure(who: str, what: str, folder: Path, dtype: str) -> dict:
    load = loader(who, what, folder, DTYPES[dtype])  # imports happen before the baseline
    gc.collect()
    before = status()
    with HostPeak(0.005) as peak:
        t0 = time.perf_counter()
        loaded = load()
        seconds = time.perf_counter() - t0
        loaded_rss = status()["VmRSS"]
        tensors = weight_tensors(loaded)
        t0 = time.perf_counter()
        touch(tensors)
        touch_seconds = time.perf_counter() - t0
    after = status()
    weights = sum(t.numel() * t.element_size() for t in tensors)
    return {
        "who": who, "what": what, "dtype": dtype,
        "seconds": round(seconds, 1), "touch_seconds": round(touch_seconds, 1),
        "weights_gib": round(weights / GIB, 3), "rss_loaded_untouched_gib": round(loaded_rss / GIB, 3),
        "rss_before_gib": round(before["VmRSS"] / GIB, 3),
        "peak_rss_gib": round(after["VmHWM"] / GIB, 3),
        "peak_anon_gib": round(peak.anon / GIB, 3),
        "peak_file_gib": round(peak.file / GIB, 3),
        "rss_after_gib": round(after["VmRSS"] / GIB, 3),
        "peak_rss_over_weights": round(after["VmHWM"] / weights, 3),
        "peak_anon_over_weights": round(peak.anon / weights, 3),
        "added_peak_rss_over_weights": round((after["VmHWM"] - before["VmRSS"]) / weights, 3),
    }


def measure_in_child(who: str, what: str, folder: Path, dtype: str) -> dict:
    """`measure` in a fresh interpreter, so that no earlier load's memory or high-water mark counts."""
    command = [sys.executable, __file__, "--child", who, what, "--dir", str(folder), "--dtype", dtype]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"who": who, "what": what, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("5b", "2b"), default="5b")
    p.add_argument("--tiny", action="store_true", help="tiny configs: checks the script, measures nothing")
    p.add_argument("--dir", type=Path, required=True, help="the checkpoint folder (written when missing)")
    p.add_argument("--what", default="transformer,vae,text_encoder",
                   help="comma-separated: transformer, vae, text_encoder, pipeline, packed, packed_transformer, "
                        "packed_text_encoder")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="the dtype to load in (5B is stored in bf16, 2B in fp16: others measure a cast)")  # fmt: skip
    p.add_argument("--reference", action="store_true", help="also load through diffusers / transformers")
    p.add_argument("--child", nargs=2, metavar=("WHO", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        print(json.dumps(measure(*args.child, args.dir, args.dtype)))
        return
    if not (args.dir / loading.MODEL_INDEX).is_file():
        print(f"writing a random-weight {args.variant} checkpoint to {args.dir}", flush=True)
        write_checkpoint(args.dir, args.variant, args.tiny)
    results = []
    for what in args.what.split(","):
        for who in ("ours", "reference") if args.reference and not what.startswith("packed") else ("ours",):
            r = measure_in_child(who, what, args.dir, args.dtype)
            results.append(r)
            print(json.dumps(r), flush=True)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    record = {"variant": args.variant, "tiny": args.tiny, "torch": torch.__version__, "results": results}
    name = f"load_memory_{args.variant}_{args.dtype}{'_tiny' if args.tiny else ''}.json"
    (out / name).write_text(json.dumps(record, indent=2))
    print(f"\n{args.dtype}:")
    print("| load | who | weights | peak RSS (x weights) | peak anon (x weights) | before | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['what']} | {r['who']} | error: {r['error']} | | | | |")
            continue
        print(f"| {r['what']} | {r['who']} | {r['weights_gib']:.2f} GiB | {r['peak_rss_gib']:.2f} GiB "
              f"({r['peak_rss_over_weights']:.2f}x) | {r['peak_anon_gib']:.2f} GiB "
              f"({r['peak_anon_over_weights']:.2f}x) | {r['rss_before_gib']:.2f} GiB | {r['seconds']} |")  # fmt: skip


if __name__ == "__main__":
    main()

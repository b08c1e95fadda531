"""`cogvideox train`: fine-tune a model on a folder of captioned videos (a thin layer over `finetune`).

    cogvideox train clips/ --output runs/style --model THUDM/CogVideoX-5b --steps 2000
    cogvideox train --config style.toml --lr 2e-4
    torchrun --nproc-per-node 4 -m cogvideox train clips/ --output runs/style --model THUDM/CogVideoX-5b

Flags override the values of a `--config` file (TOML, or YAML with PyYAML installed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cogvideox.cli import RUN_ERROR, _interrupted_status, _out_of_memory, _quiet_libraries, _say, global_rank
from cogvideox.cli_args import (
    add_model_arguments,
    file_name,
    frame_rate,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_train_parsers(commands) -> None:
    """Add `train` to the `cogvideox` command's sub-parsers."""
    p = commands.add_parser(
        "train",
        help="fine-tune a model (LoRA, or all weights with --full) on a folder of captioned videos",
        description="Fine-tune a CogVideoX model on a folder of videos with captions (metadata.jsonl, or the "
        "official prompts.txt + videos.txt). Latents and T5 states are precomputed into a cache; unusable "
        "videos are reported and skipped. Writes a LoRA in the diffusers layout (pytorch_lora_weights."
        "safetensors) or, with --full, a model folder, plus checkpoints, loss.jsonl / loss.png and validation "
        "videos into --output. Run it again to resume from the newest checkpoint (--steps is the total, so "
        "raise it to train further); put torchrun in front for several GPUs.",
    )
    arg = p.add_argument
    arg("data", nargs="?", type=file_name, help="data folder (or `data` in the --config file)")
    arg("-o", "--output", type=file_name, help="run folder: checkpoints, logs, validation videos and the result")
    arg("--config", type=file_name,
        help="TOML or YAML file with settings named as in docs/finetune.md; flags override it")
    add_model_arguments(p, offline=False)
    arg("--full", action="store_const", const=True, default=None, help="train every transformer weight, not a LoRA")
    arg("--rank", type=positive_int, help="LoRA rank (default: 64)")
    arg("--alpha", type=positive_float, help="LoRA alpha; the update is scaled by alpha / rank (default: the rank)")
    arg("--targets", type=_list, help="comma-separated layer names the LoRA adapts (default: to_q,to_k,to_v,to_out.0)")
    arg(
        "--bucket",
        dest="buckets",
        action="append",
        help="clip shape FRAMESxHEIGHTxWIDTH such as 49x480x720; repeat for several (multi-resolution) "
        "(default: the model's frames and size)",
    )
    arg("--fps", type=frame_rate, help="frame rate clips are sampled at (default: the model's, 8 or 16)")
    arg("--caption-dropout", type=float, help="share of steps on the empty caption (default: 0.1)")
    arg("--cache-dir", type=file_name, help="where latents and T5 states are cached (default: DATA/cache)")
    arg("--prune-cache", action=argparse.BooleanOptionalAction, default=None,
        help="delete the cache's entries this run does not read (old versions of clips and captions, other "
        "buckets or models; also those of other data folders sharing the cache) (default: off, their size "
        "is only reported)")  # fmt: skip
    arg(
        "--mask-weight",
        type=positive_float,
        help='loss weight of the latent cells a clip\'s mask covers (metadata.jsonl "mask"); the rest weigh 1 '
        "(default: 1, masks ignored)",
    )
    arg(
        "--timesteps",
        choices=("stratified", "uniform"),
        help="noise levels of a step's clips (over all processes, micro-batches and the batch): stratified "
        "spreads them over the range, one per stratum, each still uniform on its own; uniform draws each "
        "independently (the same with one clip per step) (default: stratified; a resumed run keeps its own)",
    )
    arg("--steps", type=positive_int, help="optimizer steps (default: 1000)")
    arg("--batch-size", type=positive_int, help="clips per step and process (default: 1)")
    arg("--grad-accum", type=positive_int, help="micro-batches accumulated per step (default: 1)")
    arg("--lr", type=positive_float, help="peak learning rate (default: 1e-4 LoRA, 1e-5 full)")
    arg("--schedule", choices=("constant", "cosine"), help="after warm-up (default: constant)")
    arg("--warmup-steps", type=non_negative_int, help="linear warm-up steps (default: 100)")
    arg("--weight-decay", type=float, help="AdamW weight decay (default: 1e-4)")
    arg("--grad-clip", type=positive_float, help="gradient norm clip (default: 1)")
    arg(
        "--optimizer",
        choices=("adamw", "adamw-8bit", "adamw-cpu"),
        help="adamw; adamw-8bit (bitsandbytes, GPU); adamw-cpu (fp32 masters and moments in CPU memory) "
        "(default: adamw)",
    )
    arg(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute block activations in the backward pass (default: on)",
    )
    arg(
        "--offload-activations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with gradient checkpointing, keep the block inputs it saves in pinned CPU memory until the "
        "backward pass: about 4.5 GB less GPU memory for 5B at 49x480x720, for two copies of them over "
        "PCIe per step (default: off)",
    )
    arg(
        "--save-attention",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with gradient checkpointing, keep each block's attention output through the backward pass, so "
        "the recompute skips the attention kernel: a shorter step for about 4.7 GB more GPU memory for 5B "
        "at 49x480x720 (default: off)",
    )
    arg(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile each transformer block (one compiled graph shared by all the blocks) to fuse the "
        "elementwise work of the forward, the recompute and the backward pass: the same step to rounding, "
        "faster; the first step pays the compilation, a one-off (seconds "
        "for a tiny model, predicted about a minute for 5B on a GPU; again at a new bucket shape's first "
        "step and validation's first sampling step); needs Triton on a GPU, a C++ compiler on the CPU "
        "(default: off)",
    )
    arg(
        "--quantize-base",
        choices=("int8",),
        default=None,
        help="LoRA: keep the frozen linears the adapters leave alone (feed-forward, modulation) as int8 weights "
        "with one scale per output channel, dequantised as used: about 3.9 GB less GPU memory for 5B; the "
        "adapters train against that base (default: off)",
    )
    arg("--seed", type=non_negative_int, help="run seed (default: 0)")
    arg("--checkpoint-every", type=positive_int, help="steps between checkpoints (default: 200)")
    arg("--keep-checkpoints", type=positive_int, help="checkpoints kept (default: 2)")
    arg("--log-every", type=positive_int, help="steps between loss.jsonl lines (default: 1)")
    arg("--validation-every", type=non_negative_int,
        help="steps between validation videos; a fresh run first makes the base model's (step 0), and a round "
        "whose colours burn against them is a warning (default: 0, none)")  # fmt: skip
    arg("--validation-prompt", dest="validation_prompts", action="append", help="a validation prompt; repeatable")
    arg("--validation-steps", type=positive_int, help="sampling steps of validation videos (default: 50)")
    arg(
        "--validation-guidance",
        type=non_negative_float,
        help="classifier-free guidance of validation videos, with the model's dynamic-CFG settings; 1 or less "
        "turns guidance off (default: the model's recommendation in its sampling.json, else 6; a resumed run "
        "keeps the guidance it recorded)",
    )
    arg("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from cogvideox.train.config import make_config
    from cogvideox.train.finetune import check_steps_left, finetune, reached_step

    settings = {
        k: v for k, v in vars(args).items() if k not in ("command", "run", "config", "quiet")
    }
    if args.quiet:
        settings["progress"] = False
    config = make_config(args.config, **settings)
    start = check_steps_left(config)  # a run already past --steps fails here, before any loading
    _quiet_libraries()
    try:
        path = finetune(config)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (a scheduler's stop) as cli.Terminated
        _say(_interrupted(config.output, reached_step(config.output)))
        return _interrupted_status(e)
    except (RuntimeError, MemoryError) as e:
        where = _out_of_memory(e)
        if where is None:
            raise
        levers = _memory_levers(where, config.output, reached_step(config.output))
        _say(f"cogvideox: error: out of {where} memory; {levers}", error=True)
        return RUN_ERROR
    if global_rank() == 0:  # under torchrun every process gets here: one line says what the run wrote
        print(_summary(path, config, start))
    return 0


def _memory_levers(where: str, output: str, reached: int) -> str:
    """What lowers a training step's `where` ("GPU" or "host") memory, split by whether the run in `output`
    can continue with it: a resumed run must keep its quantize_base, optimizer and batch_size
    (`FinetuneConfig.run_identity`)."""
    keep = "--offload-activations or a smaller --bucket" if where == "GPU" else "a smaller --bucket"
    new = "--quantize-base int8 (LoRA), --optimizer adamw-cpu (--full) or a smaller --batch-size"
    if not reached:
        return f"try {keep}, or {new}"
    return f"{output} holds step {reached}: continue from there with {keep}, or start a new --output with {new}"


def _interrupted(output: str, reached: int) -> str:
    """The line for a run stopped with Ctrl-C: where it can continue from, and how."""
    if not reached:
        return (
            "cogvideox train: interrupted before the first checkpoint; run the same command again to start over "
            "(the clips encoded so far stay in the cache)"
        )
    return (
        f"cogvideox train: interrupted; {output} holds step {reached} (its newest checkpoint): run the same "
        "command again to continue from there"
    )


def _summary(path: Path, config, start: int) -> str:
    """The last line of a run: what it wrote, its steps and final loss; for a run that was already at
    --steps, that nothing was trained (the result was only written again from its last checkpoint)."""
    records = []
    log = Path(config.output) / "loss.jsonl"
    if log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]  # a validation round's line holds its colours instead
    last = f", final loss {losses[-1]:.4f}" if losses else ""
    if start >= config.steps:
        return (
            f"{config.output} was already at step {start}: nothing trained (raise --steps to continue); "
            f"wrote {path} again ({config.steps} steps{last}; log {log})"
        )
    return f"wrote {path} ({config.steps} steps{last}; log {log})"

"""Teach the demo model a colour it has never seen: `python -m cogvideox.demo.teach --work runs/teach`.

The experiment, in three resumable stages (run the same command again to continue where it stopped):

1. data: render clips of orange objects (every shape, direction and background in turn) into
   `<work>/data` as MP4s with a `metadata.jsonl`, plus a share of clips of the base world's training
   captions ("replay", never a held-out caption) so the old concepts keep being trained; each clip has
   a mask video of its object's pixels (`masks/`, the row's "mask");
2. fine-tune: a LoRA on the model (the shipped demo model by default) with `cogvideox.train.finetune`,
   into `<work>/run`, with the latent cells the object covers weighted `mask_weight` x (the object is a
   few percent of the frame: unweighted, the loss is almost all background and barely sees its colour);
   the trainer resumes from its newest checkpoint;
3. evaluate, with and without the LoRA, on the same captions, seeds and noise:
   - every orange caption: correct when the judge, with its palette extended by orange, sees orange and
     the caption's direction;
   - a fixed subset of the base captions (training and held-out alike), judged exactly as
     `cogvideox.demo.evaluate` does (the six base colours), plus how often the extended palette reads
     such a video as orange (the new colour bleeding into the old ones).
   Each part is kept in `<work>/eval/` under a key of everything it depends on (model and LoRA
   weights, captions, seeds, sampler settings), so only stale parts are generated again. The result is
   `<work>/report.json` and a table on stdout; `<work>/samples/` holds a few of the generated videos.

The word "orange". The demo tokenizer is a sentencepiece word model over the 22 words of the base
captions, so "orange" becomes its unknown token <unk>. No base caption contains <unk>, so
"a orange circle moving left on a black background" has exactly the token layout of a base caption
with a token of its own in the colour position, and what the LoRA learns is "<unk> as the colour means
orange". The captions keep the template's "a" ("an orange" would become a single <unk> piece, one token
shorter than the template). The honest consequence: every other unknown word ("pink", "an orange")
reads as the same token and will draw orange too; teaching the word itself would need a new tokenizer
piece and a T5 embedding row, which a LoRA on the transformer cannot add.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cogvideox.errors import CogVideoXError, InputError, LoadError
from cogvideox.models.config import ConfigError

from . import world
from .judge import judge

# Fine-tuning data layout.
CLIPS_DIR = "clips"
MASKS_DIR = "masks"
# What a mask marks; part of the data key, so a folder rendered without masks (or other masks) is
# rendered again.
MASK_KIND = "object pixels grown by 2 px (demo.build.foreground)"
MANIFEST = "manifest.json"  # written last: a data folder without it is incomplete and rendered again
CLIP_FPS = 8  # the demo model's frame rate (CogVideoX 1.0 models sample at 8 fps)

# The bar the experiment sets: generated videos of the new concept judged right at least this often...
TARGET_ACCURACY = 0.8
# ... while the base captions' accuracy drops by no more than this (an absolute share of videos).
KEPT_TOLERANCE = 0.05

EXTENDED_PALETTE = world.colours(include_extra=True)

CAPTION_SETS = ("orange", "base")
VARIANTS = ("model", "model+lora")


def part_name(captions: str, variant: str) -> str:
    """The file-name label of an evaluation part, e.g. "orange-model-lora"."""
    return f"{captions}-{variant.replace('+', '-')}"


@dataclass
class TeachConfig:
    """One run of the experiment. The defaults are sized for about 10-20 minutes on two CPU cores:
    192 clips, 1000 LoRA steps of batch 8, and 240 generated videos of 50 steps."""

    work: str  # everything goes here: data/, run/, eval/, samples/, report.json
    model: str | None = None  # None: the shipped demo model
    # Data
    clips: int = 192  # training clips in all
    replay: float = 0.25  # share of them from the base world's training captions
    # Fine-tuning (a LoRA on the attention projections)
    steps: int = 1000
    lr: float = 1e-3
    rank: int = 16
    batch_size: int = 8
    warmup_steps: int = 50
    checkpoint_every: int = 100
    mask_weight: float = 10.0  # loss weight of the object's latent cells, as in the demo model's own training
    # Evaluation
    seeds: int = 2  # seeds per caption, for orange and base captions alike
    orange_captions: int = 36  # how many of the 36 orange captions (36: all of them)
    base_captions: int = 24  # size of the fixed subset of base captions
    inference_steps: int = 50
    guidance: float = 6.0
    eval_batch: int = 16
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("clips", "steps", "rank", "batch_size", "checkpoint_every", "seeds", "orange_captions",
                     "base_captions", "inference_steps", "eval_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.replay < 1:
            raise InputError(f"replay must be a share in [0, 1), got {self.replay!r}")
        if self.clips - self.replay_clips < 1:
            raise InputError(f"{self.clips} clips with replay {self.replay} leave no orange clip; give more clips")
        for name, pool in (("orange_captions", world.extra_captions()), ("base_captions", world.all_captions())):
            if getattr(self, name) > len(pool):
                raise InputError(f"{name} must be at most {len(pool)}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr!r}")
        if not (isinstance(self.mask_weight, (int, float)) and self.mask_weight > 0):
            raise InputError(f"mask_weight must be positive, got {self.mask_weight!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def replay_clips(self) -> int:
        return round(self.clips * self.replay)

    @property
    def orange_clips(self) -> int:
        return self.clips - self.replay_clips


# ----------------------------------------------------------------------------------------------------
# 1. Data


def training_clips(config: TeachConfig) -> list[world.Scene]:
    """The scenes of the training clips: the orange captions in turn (each shape, direction and
    background equally often), then replay scenes drawn from the base training captions."""
    extra = world.extra_captions()
    scenes = [
        world.scene_for_caption(extra[i % len(extra)], [config.seed, 0, i], include_extra=True)
        for i in range(config.orange_clips)
    ]
    # Replay comes from the training split only: the held-out captions stay unseen by any training.
    scenes += [world.sample_scene([config.seed, 1, i], "train") for i in range(config.replay_clips)]
    return scenes


def object_mask(frames: np.ndarray) -> np.ndarray:
    """uint8 frames [F, H, W, 3] of a scene -> its object's mask as uint8 frames [F, H, W, 3]: 255 on the
    object's pixels (grown by two pixels, as the demo model's own training weighs them), 0 elsewhere."""
    from .build import foreground

    mask = foreground(world.to_model_range(frames)[None])[0, 0]  # [F, H, W] of 0 / 1
    return np.repeat((mask.numpy() * 255).astype(np.uint8)[..., None], 3, axis=-1)


def make_data(config: TeachConfig) -> tuple[Path, bool]:
    """Render the training clips into `<work>/data` (MP4s, their object masks and metadata.jsonl). Returns
    the folder and whether an earlier, complete rendering was reused. Raises `InputError` when the folder
    holds the data of other settings; a folder rendered before masks existed is rendered again."""
    from cogvideox.video import export_video

    folder = Path(config.work) / "data"
    settings = {"clips": config.clips, "replay": config.replay, "seed": config.seed,
                "frames": world.FRAMES, "height": world.HEIGHT, "width": world.WIDTH,
                "orange_rgb": list(world.EXTRA_COLOUR_RGB["orange"]), "masks": MASK_KIND}
    manifest = folder / MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text()).get("settings") or {}
        if found == settings:
            return folder, True
        if {k: v for k, v in found.items() if k != "masks"} != {k: v for k, v in settings.items() if k != "masks"}:
            raise InputError(
                f"{folder} holds clips rendered with other settings ({found}); give another --work "
                "folder or the same --clips, --replay and --seed"
            )
        manifest.unlink()  # the same clips with other (or no) masks: render again
    (folder / CLIPS_DIR).mkdir(parents=True, exist_ok=True)
    (folder / MASKS_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(training_clips(config)):
        kind = "orange" if scene.colour in world.EXTRA_COLOURS else "replay"
        name = f"{CLIPS_DIR}/{kind}-{i:04d}.mp4"
        mask = f"{MASKS_DIR}/{kind}-{i:04d}.mp4"
        frames = world.render(scene)
        export_video(frames, folder / name, fps=CLIP_FPS)
        export_video(object_mask(frames), folder / mask, fps=CLIP_FPS)
        rows.append({"video": name, "caption": scene.caption, "mask": mask})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {"orange": config.orange_clips, "replay": config.replay_clips}
    manifest.write_text(json.dumps({"settings": settings, "counts": counts}, indent=2) + "\n")
    return folder, False


# ----------------------------------------------------------------------------------------------------
# 2. Fine-tuning


def train_lora(config: TeachConfig, data: Path) -> tuple[Path, bool]:
    """Fine-tune a LoRA on `data` into `<work>/run` (resuming from its newest checkpoint). Returns the
    LoRA file and whether a finished run was reused."""
    from cogvideox.train.checkpoint import latest_checkpoint
    from cogvideox.train.config import FinetuneConfig
    from cogvideox.train.finetune import CHECKPOINT_PREFIX, finetune
    from cogvideox.train.lora import LORA_WEIGHTS_NAME

    out = Path(config.work) / "run"
    lora = out / LORA_WEIGHTS_NAME
    if (out / "config.json").is_file():
        # The trainer resumes with a changed learning rate; here a changed one would go unnoticed in the
        # report, so it needs a fresh run folder. (Rank, batch or seed changes the trainer refuses itself.)
        trained = json.loads((out / "config.json").read_text())
        trained_lr = trained.get("lr")
        if trained_lr != config.lr:
            raise InputError(f"{out} was trained with lr {trained_lr}; give another --work folder or --lr {trained_lr}")
        # A run from before masks existed trained unweighted, as mask_weight 1 does.
        trained_weight = trained.get("mask_weight", 1.0)
        if trained_weight != config.mask_weight:
            raise InputError(
                f"{out} was trained with mask_weight {trained_weight:g}; give another --work folder or "
                f"--mask-weight {trained_weight:g}"
            )
    latest = latest_checkpoint(out / "checkpoints", CHECKPOINT_PREFIX)
    if lora.is_file() and latest is not None and int(latest.stem.rsplit("-", 1)[1]) == config.steps:
        return lora, True
    finetune(FinetuneConfig(
        data=str(data),
        output=str(out),
        model=config.model,
        rank=config.rank,
        lr=config.lr,
        steps=config.steps,
        batch_size=config.batch_size,
        warmup_steps=min(config.warmup_steps, config.steps - 1),
        checkpoint_every=config.checkpoint_every,
        seed=config.seed,
        mask_weight=config.mask_weight,
        # The demo model is tiny: recomputing activations would cost time and save nothing that matters.
        gradient_checkpointing=False,
        progress=config.progress,
    ))
    return lora, False


# ----------------------------------------------------------------------------------------------------
# 3. Evaluation


def caption_subset(captions: tuple[str, ...], count: int, seed: int = 0) -> tuple[str, ...]:
    """A fixed subset of `count` of `captions`, kept in their order (all of them when count is their
    number). For the base captions it mixes training and held-out captions as they come."""
    picked = np.sort(np.random.default_rng([seed, 2]).permutation(len(captions))[:count])
    return tuple(captions[i] for i in picked)


def score_videos(pipe, captions, seeds, config: TeachConfig, samples: Path | None = None, label: str = "") -> dict:
    """Generate one video per (caption, seed), prompts batched per seed as `demo.evaluate` does, and
    judge each. A caption with an extra colour is judged with the extended palette, a base caption with
    the base palette (the score `demo.evaluate` gives); every video is also read with the extended
    palette to count those seen as orange. With `samples`, the first video of each seed is kept there."""
    from cogvideox.video import export_video

    videos = []
    for seed in seeds:
        for start in range(0, len(captions), config.eval_batch):
            chunk = list(captions[start : start + config.eval_batch])
            out = pipe(chunk, seed=seed, num_inference_steps=config.inference_steps,
                       guidance_scale=config.guidance, progress=False)
            for k, (caption, frames) in enumerate(zip(chunk, out.frames)):
                colour, _, direction, _ = world.parse_caption(caption, include_extra=True)
                extra = colour in world.EXTRA_COLOURS
                verdict = judge(frames, EXTENDED_PALETTE if extra else world.COLOURS)
                wide = verdict if extra else judge(frames, EXTENDED_PALETTE)
                videos.append({
                    "caption": caption,
                    "seed": seed,
                    "colour": verdict.colour,
                    "direction": verdict.direction,
                    "correct": verdict.matches(caption),
                    "colour_correct": verdict.colour == colour,
                    "direction_correct": verdict.direction == direction,
                    "seen_orange": wide.colour == "orange",
                })
                if samples is not None and start == 0 and k == 0:
                    samples.mkdir(parents=True, exist_ok=True)
                    export_video(frames, samples / f"{label}-seed{seed}.mp4", fps=CLIP_FPS)
    return summarise(videos)


def summarise(videos: list[dict]) -> dict:
    """Shares of correct videos (colour and direction, each alone, seen as orange) and the failures."""
    n = max(len(videos), 1)

    def share(key: str) -> float:
        return round(sum(v[key] for v in videos) / n, 4)

    failures = [f"{v['caption']} (seed {v['seed']}): seen {v['colour']} {v['direction']}"
                for v in videos if not v["correct"]]
    return {
        "videos": len(videos),
        "accuracy": share("correct"),
        "colour_accuracy": share("colour_correct"),
        "direction_accuracy": share("direction_correct"),
        "seen_orange": share("seen_orange"),
        "failures": failures[:20],
        "per_video": videos,
    }


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_parts(config: TeachConfig, lora: Path) -> tuple[dict, dict[str, str]]:
    """The four evaluation parts, `{(captions, variant): score}` for `CAPTION_SETS` x `VARIANTS`, each
    generated or reused from `<work>/eval/`; and `{part_name: "generated" | "reused"}`."""
    from cogvideox.pipeline import Pipeline
    from cogvideox.train.cache import file_digest, module_fingerprint

    work = Path(config.work)
    pipe = Pipeline.from_pretrained(config.model)
    # What the videos depend on: the weights (a retrained demo model makes old parts stale), the LoRA
    # file, the prompts and seeds, the sampler settings and the batching (noise is drawn per batch).
    model_id = _digest(*(module_fingerprint(m) for m in (pipe.transformer, pipe.vae, pipe.text_encoder.model)))
    lora_id = file_digest(lora)[:16]
    caption_sets = {
        "orange": caption_subset(world.extra_captions(), config.orange_captions, config.seed),
        "base": caption_subset(world.all_captions(), config.base_captions, config.seed),
    }
    seeds = tuple(range(config.seeds))
    sampler = (config.inference_steps, config.guidance, config.eval_batch)
    parts, how = {}, {}
    for variant in VARIANTS:
        if variant == "model+lora":
            pipe.load_lora(lora)
        for name, captions in caption_sets.items():
            label = part_name(name, variant)
            key = _digest(model_id, lora_id if variant == "model+lora" else None, captions, seeds, sampler)
            path = work / "eval" / f"{label}.json"
            if path.is_file():
                found = json.loads(path.read_text())
                if found.get("key") == key:
                    parts[(name, variant)], how[label] = found["score"], "reused"
                    continue
            t0 = time.time()
            s = score_videos(pipe, captions, seeds, config, samples=work / "samples", label=label)
            s["seconds"] = round(time.time() - t0, 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key, "score": s}, indent=2) + "\n")
            parts[(name, variant)], how[label] = s, "generated"
            if config.progress:
                print(f"evaluated {label}: {s['videos']} videos, {s['accuracy']:.1%} correct, {s['seconds']} s",
                      file=sys.stderr)
    return parts, how


def vae_draws_orange(config: TeachConfig) -> dict:
    """How often the model's VAE gives back an orange object as orange: one clip per evaluated orange
    caption, encoded, decoded and judged with the extended palette. The LoRA trains the transformer alone, so a
    colour the VAE cannot reconstruct cannot be taught; this tells that case apart from a failed
    fine-tune before the long stages run."""
    import torch

    from cogvideox.pipeline import Pipeline
    from cogvideox.sampling import to_uint8_frames

    vae = Pipeline.from_pretrained(config.model).vae
    captions = caption_subset(world.extra_captions(), config.orange_captions, config.seed)
    right, failures = 0, []
    with torch.no_grad():
        for i, caption in enumerate(captions):
            scene = world.scene_for_caption(caption, np.random.default_rng([config.seed, i]), include_extra=True)
            x = world.to_model_range(world.render(scene))[None]
            verdict = judge(to_uint8_frames(vae.decode(vae.encode(x).mode())[0]), EXTENDED_PALETTE)
            right += verdict.colour == "orange"
            if verdict.colour != "orange":
                failures.append(f"{caption}: reconstructed as {verdict.colour}")
    return {"videos": len(captions), "orange": right / len(captions), "failures": failures}


# ----------------------------------------------------------------------------------------------------
# The experiment


def teach(config: TeachConfig) -> dict:
    """Run (or resume) the experiment; returns the report, also written to `<work>/report.json`."""
    work = Path(config.work)
    work.mkdir(parents=True, exist_ok=True)
    timings, stages = {}, {}

    vae_check = vae_draws_orange(config)
    if vae_check["orange"] < TARGET_ACCURACY:
        print(f"warning: the model's VAE gives back orange as orange in only {vae_check['orange']:.0%} of "
              f"{vae_check['videos']} reconstructions; a LoRA on the transformer cannot teach a colour the VAE "
              "cannot draw", file=sys.stderr)

    t0 = time.time()
    data, reused = make_data(config)
    timings["data_s"], stages["data"] = round(time.time() - t0, 1), "reused" if reused else "rendered"

    t0 = time.time()
    lora, reused = train_lora(config, data)
    timings["finetune_s"], stages["finetune"] = round(time.time() - t0, 1), "reused" if reused else "trained"

    t0 = time.time()
    parts, stages["evaluate"] = evaluate_parts(config, lora)
    timings["evaluate_s"] = round(time.time() - t0, 1)

    losses = [json.loads(line) for line in (work / "run" / "loss.jsonl").read_text().splitlines() if line.strip()]
    orange, base = parts[("orange", "model+lora")], parts[("base", "model+lora")]
    before = parts[("base", "model")]
    report = {
        "config": asdict(config),
        "vae_reconstructs_orange": vae_check,
        "data": {"folder": "data", "orange_clips": config.orange_clips, "replay_clips": config.replay_clips},
        "finetune": {
            "lora": str(lora.relative_to(work)),
            "steps": config.steps,
            "first_loss": losses[0]["loss"] if losses else None,
            "final_loss": losses[-1]["loss"] if losses else None,
        },
        "evaluation": {
            name: {variant: {k: v for k, v in parts[(name, variant)].items() if k != "per_video"}
                   for variant in VARIANTS}
            for name in CAPTION_SETS
        },
        "summary": {
            "orange_accuracy": orange["accuracy"],
            "orange_colour_accuracy": orange["colour_accuracy"],
            "orange_accuracy_without_lora": parts[("orange", "model")]["accuracy"],
            "base_accuracy_before": before["accuracy"],
            "base_accuracy_after": base["accuracy"],
            "base_seen_orange_after": base["seen_orange"],
            "orange_learned": orange["accuracy"] >= TARGET_ACCURACY,
            "base_kept": base["accuracy"] >= before["accuracy"] - KEPT_TOLERANCE,
        },
        "stages": stages,
        "seconds": timings,
    }
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(report: dict) -> str:
    """The report's evaluation as a plain-text table."""
    rows = [("captions", "model", "videos", "correct", "colour", "direction", "seen orange")]
    for name, label in (("orange", "orange"), ("base", "base subset")):
        for variant in VARIANTS:
            s = report["evaluation"][name][variant]
            rows.append((label, variant, str(s["videos"]),
                         *(f"{s[k]:.1%}" for k in ("accuracy", "colour_accuracy", "direction_accuracy", "seen_orange"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    s = report["summary"]
    vae = report["vae_reconstructs_orange"]
    lines += [
        "",
        f"the VAE gives back orange as orange: {vae['orange']:.1%} of {vae['videos']} reconstructions",
        f"orange learned (>= {TARGET_ACCURACY:.0%} correct): {'yes' if s['orange_learned'] else 'no'} "
        f"({s['orange_accuracy']:.1%})",
        f"old concepts kept (at most {KEPT_TOLERANCE:.0%} lower): {'yes' if s['base_kept'] else 'no'} "
        f"({s['base_accuracy_before']:.1%} -> {s['base_accuracy_after']:.1%})",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    from cogvideox.cli import USER_ERROR, RUN_ERROR, _Parser
    from cogvideox.cli_args import non_negative_int, positive_float, positive_int

    p = _Parser(prog="python -m cogvideox.demo.teach", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TeachConfig(work="")
    p.add_argument("--work", default="runs/teach", help="data, run, evaluation and report folder (default: %(default)s)")
    p.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    p.add_argument("--clips", type=positive_int, default=d.clips, help="training clips (default: %(default)s)")
    p.add_argument("--replay", type=float, default=d.replay,
                   help="share of the clips from the base world's training captions (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="fine-tuning steps (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="LoRA learning rate (default: %(default)s)")
    p.add_argument("--rank", type=positive_int, default=d.rank, help="LoRA rank (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--mask-weight", type=positive_float, default=d.mask_weight,
                   help="loss weight of the latent cells the object covers; the rest weigh 1 (default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=d.seeds, help="seeds per evaluated caption (default: %(default)s)")
    p.add_argument("--orange-captions", type=positive_int, default=d.orange_captions,
                   help="orange captions evaluated, of 36 (default: %(default)s)")
    p.add_argument("--base-captions", type=positive_int, default=d.base_captions,
                   help="base captions evaluated with and without the LoRA (default: %(default)s)")
    p.add_argument("--inference-steps", type=positive_int, default=d.inference_steps,
                   help="denoising steps per generated video (default: %(default)s)")
    p.add_argument("--eval-batch", type=positive_int, default=d.eval_batch,
                   help="prompts generated together (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=d.seed, help="data, training and subset seed (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        config = TeachConfig(
            work=args.work, model=args.model, clips=args.clips, replay=args.replay, steps=args.steps, lr=args.lr,
            rank=args.rank, batch_size=args.batch_size, mask_weight=args.mask_weight, seeds=args.seeds,
            orange_captions=args.orange_captions, base_captions=args.base_captions,
            inference_steps=args.inference_steps, eval_batch=args.eval_batch,
            seed=args.seed, progress=not args.no_progress,
        )
        report = teach(config)
    except (CogVideoXError, ConfigError) as e:
        print(f"{p.prog}: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, no traceback
        user_mistake = isinstance(e, (InputError, LoadError, ConfigError))
        return USER_ERROR if user_mistake else RUN_ERROR
    print(table(report))
    print(f"\nreport: {Path(args.work) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

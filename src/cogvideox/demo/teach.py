"""Teach the demo model a concept it has never seen: `python -m cogvideox.demo.teach --work runs/teach`.

The concept (`--concept`) is one of the demo world's extra concepts: the motion "diagonally" (up and to
the right at 45 degrees, the default) or the colour "orange". The experiment, in three resumable stages
(run the same command again to continue where it stopped):

1. data: render clips of the concept's captions in turn (orange: every shape, direction and background;
   diagonally: every shape, colour and background) into `<work>/data` as MP4s with a `metadata.jsonl`,
   plus a share of clips of the base world's training captions ("replay", never a held-out caption) so
   the old concepts keep being trained; each clip has a mask video of its object's pixels (`masks/`,
   the row's "mask");
2. fine-tune: a LoRA on the model (the shipped demo model by default) with `cogvideox.train.finetune`,
   into `<work>/run`, with the latent cells the object covers weighted `mask_weight` x (the object is a
   few percent of the frame: unweighted, the loss is almost all background and barely sees the object);
   the trainer resumes from its newest checkpoint;
3. evaluate, with and without the LoRA, on the same captions, seeds and noise:
   - the concept's captions: correct when the judge, with its colour or direction palette extended by
     the concept, sees the caption's colour and direction;
   - a fixed subset of the base captions (training and held-out alike), judged exactly as
     `cogvideox.demo.evaluate` does (the base palettes), plus how often the extended palette reads such
     a video as the concept (the new concept bleeding into the old ones).
   Each part is kept in `<work>/eval/` under a key of everything it depends on (concept, model and LoRA
   weights, captions, seeds, sampler settings), so only stale parts are generated again. The result is
   `<work>/report.json` and a table on stdout; `<work>/samples/` holds a few of the generated videos.

Before all that, the model's VAE encodes and decodes one clip per evaluated concept caption: the LoRA
trains the transformer alone, so a concept the VAE cannot draw cannot be taught (the shipped VAE gives
orange back as red, yellow, purple or blue; it draws the diagonal motion).

The words. The demo tokenizer is a sentencepiece word model over the 22 words of the base captions, so
"orange" and "diagonally" become its unknown token <unk>. No base caption contains <unk>, so
"a orange circle moving left on a black background" has exactly the token layout of a base caption
with a token of its own in the colour position, and what the LoRA learns is "<unk> as the colour means
orange" (for "a red circle moving diagonally on a black background": "<unk> as the direction means up
and to the right"). The captions keep the template's "a" ("an orange" would become a single <unk>
piece, one token shorter than the template); the motion is "diagonally", not "up-right", which the
pipeline's tokenizer reads as "up" and <unk>, a token more than the template and one that already means
a motion.
The honest consequence: every other unknown word ("pink", "an orange") reads as the same token and
will draw the concept too; teaching the word itself would need a new tokenizer piece and a T5
embedding row, which a LoRA on the transformer cannot add.
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

CAPTION_SETS = ("concept", "base")
VARIANTS = ("model", "model+lora")


@dataclass(frozen=True)
class Concept:
    """A concept to teach: an extra colour or direction of the demo world (`world.EXTRA_COLOURS`,
    `world.EXTRA_DIRECTIONS`), with its captions and the judge palettes that can see it."""

    word: str
    kind: str  # "colour" or "direction"

    @property
    def captions(self) -> tuple[str, ...]:
        """Every caption of the concept in the base world, in a fixed order."""
        return world.concept_captions(self.word)

    @property
    def colours(self) -> tuple[str, ...]:
        """The judge's colour palette: the base colours, and the concept when it is a colour."""
        return world.COLOURS + (self.word,) if self.kind == "colour" else world.COLOURS

    @property
    def directions(self) -> tuple[str, ...]:
        """The judge's direction palette: the base directions, and the concept when it is a direction."""
        return world.DIRECTIONS + (self.word,) if self.kind == "direction" else world.DIRECTIONS

    def verdict(self, frames):
        """The judge's verdict on uint8 frames [F, H, W, 3], with the palettes extended by the concept."""
        return judge(frames, self.colours, self.directions)

    def seen(self, verdict) -> bool:
        """Whether a verdict (of the extended palettes) sees the concept."""
        return (verdict.colour if self.kind == "colour" else verdict.direction) == self.word


CONCEPTS = {
    **{word: Concept(word, "colour") for word in world.EXTRA_COLOURS},
    **{word: Concept(word, "direction") for word in world.EXTRA_DIRECTIONS},
}
DEFAULT_CONCEPT = "diagonally"  # the shipped VAE can draw it (it cannot draw orange)


def part_name(captions: str, variant: str) -> str:
    """The file-name label of an evaluation part, e.g. "concept-model-lora"."""
    return f"{captions}-{variant.replace('+', '-')}"


@dataclass
class TeachConfig:
    """One run of the experiment. The defaults: 192 clips (half of them replay), 2000 LoRA steps of batch
    8, and videos of 50 steps for 2 seeds x (every concept caption + 24 base captions), with and without
    the LoRA: 312 videos for "diagonally" (54 captions), 240 for orange (36 captions); about 8 minutes in
    all on two CPU cores. With a quarter replay and 1000 steps the diagonal was learnt but the base
    captions lost 8 points; half replay and 1000 steps kept them but fell short on the diagonal
    (BENCHMARKS.md)."""

    work: str  # everything goes here: data/, run/, eval/, samples/, report.json
    concept: str = DEFAULT_CONCEPT  # a key of CONCEPTS: "diagonally" or "orange"
    model: str | None = None  # None: the shipped demo model
    # Data
    clips: int = 192  # training clips in all
    replay: float = 0.5  # share of them from the base world's training captions
    # Fine-tuning (a LoRA on the attention projections)
    steps: int = 2000
    lr: float = 1e-3
    rank: int = 16
    batch_size: int = 8
    warmup_steps: int = 50
    checkpoint_every: int = 100
    mask_weight: float = 10.0  # loss weight of the object's latent cells, as in the demo model's own training
    quantize_base: str | None = None  # "int8": the frozen linears the LoRA leaves alone in int8 while training
    # Evaluation
    seeds: int = 2  # seeds per caption, for concept and base captions alike
    concept_captions: int | None = None  # how many of the concept's captions; None: all of them
    base_captions: int = 24  # size of the fixed subset of base captions
    inference_steps: int = 50
    guidance: float | None = None  # None: the model's recommended scale (its sampling.json)
    eval_batch: int = 16
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.concept not in CONCEPTS:
            raise InputError(f"unknown concept {self.concept!r}; choose one of {', '.join(CONCEPTS)}")
        if self.concept_captions is None:
            self.concept_captions = len(CONCEPTS[self.concept].captions)
        for name in ("clips", "steps", "rank", "batch_size", "checkpoint_every", "seeds", "concept_captions",
                     "base_captions", "inference_steps", "eval_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.replay < 1:
            raise InputError(f"replay must be a share in [0, 1), got {self.replay!r}")
        if self.clips - self.replay_clips < 1:
            raise InputError(
                f"{self.clips} clips with replay {self.replay} leave no {self.concept} clip; give more clips"
            )
        for name, pool in (("concept_captions", CONCEPTS[self.concept].captions),
                           ("base_captions", world.all_captions())):
            if getattr(self, name) > len(pool):
                raise InputError(f"{name} must be at most {len(pool)}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr!r}")
        if not (isinstance(self.mask_weight, (int, float)) and self.mask_weight > 0):
            raise InputError(f"mask_weight must be positive, got {self.mask_weight!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def taught(self) -> Concept:
        """The concept this run teaches."""
        return CONCEPTS[self.concept]

    @property
    def replay_clips(self) -> int:
        return round(self.clips * self.replay)

    @property
    def concept_clips(self) -> int:
        return self.clips - self.replay_clips


# ----------------------------------------------------------------------------------------------------
# 1. Data


def training_clips(config: TeachConfig) -> list[world.Scene]:
    """The scenes of the training clips: the concept's captions in turn (each of their words equally
    often), then replay scenes drawn from the base training captions."""
    captions = config.taught.captions
    scenes = [
        world.scene_for_caption(captions[i % len(captions)], [config.seed, 0, i], include_extra=True)
        for i in range(config.concept_clips)
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


def data_settings(config: TeachConfig) -> dict:
    """What the rendered clips depend on, as the data manifest records it."""
    concept = config.taught
    if concept.kind == "colour":
        looks = {f"{concept.word}_rgb": list(world.colour_rgb(concept.word))}
    else:
        looks = {f"{concept.word}_vector": list(world.direction_vector(concept.word))}
    return {"concept": concept.word, "clips": config.clips, "replay": config.replay, "seed": config.seed,
            "frames": world.FRAMES, "height": world.HEIGHT, "width": world.WIDTH, **looks, "masks": MASK_KIND}


def make_data(config: TeachConfig) -> tuple[Path, bool]:
    """Render the training clips into `<work>/data` (MP4s, their object masks and metadata.jsonl). Returns
    the folder and whether an earlier, complete rendering was reused. Raises `InputError` when the folder
    holds the data of another concept or other settings; a folder rendered before masks existed is
    rendered again."""
    from cogvideox.video import export_video

    folder = Path(config.work) / "data"
    settings = data_settings(config)
    manifest = folder / MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text()).get("settings") or {}
        found.setdefault("concept", "orange")  # rendered before there was a choice: orange was the concept
        if found == settings:
            return folder, True
        if found["concept"] != settings["concept"]:
            raise InputError(
                f"{folder} holds clips of the concept {found['concept']!r}; give another --work folder or "
                f"--concept {found['concept']}"
            )
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
        kind = config.concept if i < config.concept_clips else "replay"
        name = f"{CLIPS_DIR}/{kind}-{i:04d}.mp4"
        mask = f"{MASKS_DIR}/{kind}-{i:04d}.mp4"
        frames = world.render(scene)
        export_video(frames, folder / name, fps=CLIP_FPS)
        export_video(object_mask(frames), folder / mask, fps=CLIP_FPS)
        rows.append({"video": name, "caption": scene.caption, "mask": mask})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {config.concept: config.concept_clips, "replay": config.replay_clips}
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
        quantize_base=config.quantize_base,
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
    judge each. A caption of the concept is judged with the palettes extended by the concept, a base
    caption with the base palettes (the score `demo.evaluate` gives); every video is also read with the
    extended palettes to count those seen as the concept. With `samples`, the first video of each seed
    is kept there."""
    from cogvideox.video import export_video

    concept = config.taught
    videos = []
    for seed in seeds:
        for start in range(0, len(captions), config.eval_batch):
            chunk = list(captions[start : start + config.eval_batch])
            out = pipe(chunk, seed=seed, num_inference_steps=config.inference_steps,
                       guidance_scale=config.guidance, progress=False)
            for k, (caption, frames) in enumerate(zip(chunk, out.frames)):
                colour, _, direction, _ = world.parse_caption(caption, include_extra=True)
                wide = concept.verdict(frames)
                verdict = wide if concept.word in (colour, direction) else judge(frames)
                videos.append({
                    "caption": caption,
                    "seed": seed,
                    "colour": verdict.colour,
                    "direction": verdict.direction,
                    "correct": verdict.matches(caption),
                    "colour_correct": verdict.colour == colour,
                    "direction_correct": verdict.direction == direction,
                    "seen_concept": concept.seen(wide),
                })
                if samples is not None and start == 0 and k == 0:
                    samples.mkdir(parents=True, exist_ok=True)
                    export_video(frames, samples / f"{label}-seed{seed}.mp4", fps=CLIP_FPS)
    return summarise(videos)


def summarise(videos: list[dict]) -> dict:
    """Shares of correct videos (colour and direction, each alone, seen as the concept) and the failures."""
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
        "seen_concept": share("seen_concept"),
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
    # file, the prompts and seeds, the sampler settings and the batching (noise is drawn per batch); and
    # the concept, which sets the judge's palettes.
    model_id = _digest(*(module_fingerprint(m) for m in (pipe.transformer, pipe.vae, pipe.text_encoder.model)))
    lora_id = file_digest(lora)[:16]
    caption_sets = {
        "concept": caption_subset(config.taught.captions, config.concept_captions, config.seed),
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
            key = _digest(config.concept, model_id, lora_id if variant == "model+lora" else None, captions, seeds,
                          sampler)
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


def vae_draws_concept(config: TeachConfig) -> dict:
    """How often the model's VAE gives back the concept: one clip per evaluated concept caption,
    encoded, decoded and judged with the palettes extended by the concept; `seen_concept` is the share
    in which the judge sees the concept. The LoRA trains the transformer alone, so a concept the VAE
    cannot reconstruct cannot be taught; this tells that case apart from a failed fine-tune before the
    long stages run."""
    import torch

    from cogvideox.pipeline import Pipeline
    from cogvideox.sampling import to_uint8_frames

    concept = config.taught
    vae = Pipeline.from_pretrained(config.model).vae
    captions = caption_subset(concept.captions, config.concept_captions, config.seed)
    right, failures = 0, []
    with torch.no_grad():
        for i, caption in enumerate(captions):
            scene = world.scene_for_caption(caption, np.random.default_rng([config.seed, i]), include_extra=True)
            x = world.to_model_range(world.render(scene))[None]
            verdict = concept.verdict(to_uint8_frames(vae.decode(vae.encode(x).mode())[0]))
            if concept.seen(verdict):
                right += 1
            else:
                failures.append(f"{caption}: reconstructed as {verdict.colour} {verdict.direction}")
    return {"concept": concept.word, "videos": len(captions), "seen_concept": right / len(captions),
            "failures": failures}


# ----------------------------------------------------------------------------------------------------
# The experiment


def teach(config: TeachConfig) -> dict:
    """Run (or resume) the experiment; returns the report, also written to `<work>/report.json`."""
    work = Path(config.work)
    work.mkdir(parents=True, exist_ok=True)
    timings, stages = {}, {}

    word = config.concept
    vae_check = vae_draws_concept(config)
    if vae_check["seen_concept"] < TARGET_ACCURACY:
        print(f"warning: the judge sees {word} in only {vae_check['seen_concept']:.0%} of {vae_check['videos']} "
              f"of the model's VAE reconstructions of {word} clips; a LoRA on the transformer cannot teach what "
              "the VAE cannot draw", file=sys.stderr)

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
    taught, base = parts[("concept", "model+lora")], parts[("base", "model+lora")]
    before = parts[("base", "model")]
    report = {
        "concept": word,
        "config": asdict(config),
        "vae_reconstructs_concept": vae_check,
        "data": {"folder": "data", "concept_clips": config.concept_clips, "replay_clips": config.replay_clips},
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
            "concept": word,
            "concept_accuracy": taught["accuracy"],
            "concept_colour_accuracy": taught["colour_accuracy"],
            "concept_direction_accuracy": taught["direction_accuracy"],
            "concept_accuracy_without_lora": parts[("concept", "model")]["accuracy"],
            "base_accuracy_before": before["accuracy"],
            "base_accuracy_after": base["accuracy"],
            "base_seen_concept_after": base["seen_concept"],
            "concept_learned": taught["accuracy"] >= TARGET_ACCURACY,
            "base_kept": base["accuracy"] >= before["accuracy"] - KEPT_TOLERANCE,
        },
        "stages": stages,
        "seconds": timings,
    }
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(report: dict) -> str:
    """The report's evaluation as a plain-text table."""
    word = report["concept"]
    rows = [("captions", "model", "videos", "correct", "colour", "direction", f"seen {word}")]
    for name, label in (("concept", word), ("base", "base subset")):
        for variant in VARIANTS:
            s = report["evaluation"][name][variant]
            shares = (s[k] for k in ("accuracy", "colour_accuracy", "direction_accuracy", "seen_concept"))
            rows.append((label, variant, str(s["videos"]), *(f"{share:.1%}" for share in shares)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    s = report["summary"]
    vae = report["vae_reconstructs_concept"]
    lines += [
        "",
        f"{word} seen in the VAE's reconstructions: {vae['seen_concept']:.1%} of {vae['videos']}",
        f"{word} learned (>= {TARGET_ACCURACY:.0%} correct): {'yes' if s['concept_learned'] else 'no'} "
        f"({s['concept_accuracy']:.1%})",
        f"old concepts kept (at most {KEPT_TOLERANCE:.0%} lower): {'yes' if s['base_kept'] else 'no'} "
        f"({s['base_accuracy_before']:.1%} -> {s['base_accuracy_after']:.1%})",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    from cogvideox.cli import RUN_ERROR, USER_ERROR, _Parser
    from cogvideox.cli_args import non_negative_int, positive_float, positive_int

    p = _Parser(prog="python -m cogvideox.demo.teach", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TeachConfig(work="")
    p.add_argument("--work", default="runs/teach", help="data, run, evaluation and report folder (default: %(default)s)")
    p.add_argument("--concept", default=d.concept,
                   help=f"what to teach: {' or '.join(CONCEPTS)} (default: %(default)s)")
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
    p.add_argument("--quantize-base", choices=("int8",), default=None,
                   help="train the LoRA against an int8 copy of the linears it leaves alone (cogvideox train "
                   "--quantize-base); the evaluation loads it into the model as shipped")
    p.add_argument("--seeds", type=positive_int, default=d.seeds, help="seeds per evaluated caption (default: %(default)s)")
    counts = ", ".join(f"{len(c.captions)} for {word}" for word, c in CONCEPTS.items())
    p.add_argument("--concept-captions", type=positive_int, default=None,
                   help=f"concept captions evaluated (default: all of them: {counts})")
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
            work=args.work, concept=args.concept, model=args.model, clips=args.clips, replay=args.replay,
            steps=args.steps, lr=args.lr, rank=args.rank, batch_size=args.batch_size, mask_weight=args.mask_weight,
            quantize_base=args.quantize_base,
            seeds=args.seeds, concept_captions=args.concept_captions, base_captions=args.base_captions,
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

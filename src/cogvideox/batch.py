"""Many prompts, one video each: `cogvideox batch prompts.txt --output-dir out/`.

    cogvideox batch prompts.txt -o out/                                   # one GPU
    torchrun --nproc-per-node 8 -m cogvideox batch prompts.txt -o out/    # 8 videos at a time
    torchrun --nproc-per-node 8 -m cogvideox batch prompts.txt -o out/ --parallel cfg=2,ulysses=2

The prompts file holds one prompt per line (blank lines and lines starting with # are skipped); for an
image-to-video model each line ends with `@@` and its first frame's image file (`a cat jumps@@cat.png`,
the official tools' form; relative to the prompts file's folder). Prompt i (counting prompts only) becomes `NNNN-first-words.mp4` with seed `--seed + i`, so a re-run reproduces
it. Under torchrun the processes form groups of the `--parallel` layout's size (one process each without
it) and the groups take the prompts in turn; across nodes the output folder must be shared.

`manifest.jsonl` in the output folder gets one line per video as it finishes (prompt, seed, settings,
file, size, timings) or per failure (prompt, seed, settings, error). A re-run skips every video whose
file exists and whose manifest line has the same prompt, seed and settings (`video_settings`), so an
interrupted batch resumes where it stopped (under torchrun, a video finished in a round that another
process's death cut short keeps its line too: its process left it beside the video).
Videos there made with other settings, or of another prompt
or seed (another --seed, an edited line), are neither kept as if they were this run's nor silently replaced: the run stops, before loading the model, unless `--overwrite`
asks to make them again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from cogvideox import provenance
from cogvideox.errors import CogVideoXError, InputError
from cogvideox.files import lock_folder, parse_json, prepare_folder, read_json

MANIFEST = "manifest.jsonl"
LOCK = ".batch.lock"  # held by the batch writing into a folder
# Characters that show nothing: a line of only these is blank (str.strip() keeps them).
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file: one per line, blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no prompts file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is not part of line 1
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; give a text file with one prompt per line") from None
    # Lines end at \n alone (read_text turned \r\n and \r into it): str.splitlines() would also cut at a
    # form feed or a Unicode line separator pasted inside a prompt, making two prompts of one and moving
    # the numbers, seeds and file names of every prompt after it.
    prompts = [line.strip().strip(_INVISIBLE).strip() for line in text.split("\n")]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"{path} holds no prompts: write one prompt per line (# starts a comment)")
    return prompts


IMAGE_SEPARATOR = "@@"  # "prompt@@image" lines give an image-to-video model its first frame


def as_prompt_line(text: str) -> str:
    """`text` (a chat model's rewrite) as the prompt of one prompts-file line that reads back as it: on one
    line, not starting with the `#` of a comment (a Markdown heading would be skipped), and without an
    `@@` that would be taken for an image."""
    line = " ".join(text.split()).lstrip("#").strip()
    while IMAGE_SEPARATOR in line:
        line = line.replace(IMAGE_SEPARATOR, "@")
    return line


@dataclass(frozen=True)
class Line:
    """One line of a prompts file: the prompt, and the image after `@@` as written (None without one)."""

    prompt: str
    image: str | None = None


def split_lines(prompts: Sequence[str]) -> list[Line]:
    """`read_prompts`' lines split at their last `@@` into prompt and image; `InputError` for a side
    left empty."""
    lines = []
    for number, text in enumerate(prompts):  # numbered from 0, as the videos are
        if IMAGE_SEPARATOR not in text:
            lines.append(Line(text))
            continue
        prompt, image = (part.strip() for part in text.rsplit(IMAGE_SEPARATOR, 1))
        if not prompt or not image:
            missing = "prompt" if not prompt else "image file"
            raise InputError(f"prompt {number} ({_beginning(text)!r}) has no {missing} around its @@: write "
                             "PROMPT@@IMAGE")  # fmt: skip
        lines.append(Line(prompt, image))
    return lines


def check_images(lines: Sequence[Line], image_to_video: bool, root: Path) -> None:
    """An image-to-video model needs an existing image on every line (relative names from `root`, the
    prompts file's folder), a text-to-video model none: `InputError` naming the first line that is not
    so, before any model loads."""
    for number, line in enumerate(lines):
        where = f"prompt {number} ({_beginning(line.prompt)!r})"
        if image_to_video and line.image is None:
            raise InputError(f"{where} has no first frame: the model is image-to-video, so every line ends with "
                             "@@ and an image file (a cat jumps@@cat.png)")  # fmt: skip
        if not image_to_video and line.image is not None:
            raise InputError(f"{where} gives an image (@@{line.image}), but the model is text-to-video; use an "
                             "image-to-video model (-I2V) or drop the @@ part")  # fmt: skip
        if line.image is not None and not (root / line.image).is_file():
            raise InputError(f"{where}: no image file at {root / line.image}")


def video_name(index: int, prompt: str) -> str:
    """`0007-a-panda-playing-a-guitar.mp4`: the prompt's place, then its first words for people."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:6]
    slug = "-".join(words)[:48].rstrip("-") or "video"
    return f"{index:04d}-{slug}.mp4"


@dataclass(frozen=True)
class Item:
    """One video of the batch."""

    index: int
    prompt: str
    seed: int
    file: str  # name inside the output folder
    image: str | None = None  # the first frame, as the prompts file names it (recorded, compared on resume)
    image_file: Path | None = None  # ... and where it is read from


def plan(prompts: Sequence[str], seed: int = 0, images: Sequence | None = None, root: Path | None = None) -> list[Item]:
    """The videos: prompt i gets seed + i, which must stay a valid seed for the last prompt too, and
    image i (a path, relative ones from `root`) when `images` are given."""
    last = seed + len(prompts) - 1
    if prompts and last >= 2**64:
        raise InputError(
            f"--seed {seed} with {len(prompts)} prompts gives the last one seed {last}, past 2**64 - 1; "
            f"use a seed up to {2**64 - len(prompts)}"
        )
    if images is not None and len(images) != len(prompts):
        raise InputError(f"{len(images)} images for {len(prompts)} prompts: give one image per prompt")
    images = [None if im is None else str(im) for im in images] if images is not None else [None] * len(prompts)
    root = root or Path()
    return [
        Item(i, p, seed + i, video_name(i, p), im, None if im is None else root / im)
        for i, (p, im) in enumerate(zip(prompts, images))
    ]


def video_settings(
    model: str | None, scheduler: str, request, fps: float, levers: str = "none", resize: str | None = None,
    variant: str | None = None,
) -> dict:
    """What decides a video besides its prompt and seed, as a manifest entry records it.

    model: the model folder as resolved (a hub snapshot's folder names its commit); scheduler: "ddim" or
    "dpm"; request: the `GenerationRequest` of `check_request`, every default resolved, so that
    `--frames 49` and the model's default 49 are the same setting; fps: the MP4s' frame rate; levers:
    the speed levers that change the video (`lossy_levers`); resize: how first frames reach the video size
    ("stretch" or "crop"; None without images); variant: the weights' variant ("fp16"), kept only when
    given (the records of plain weights stay as they were).
    Left out on purpose: device, dtype, offloading, `--vae-tiling`, the `--parallel` layout and the
    lossless levers (`--compile`, the exact attention kernels) choose how the same video is computed (they
    change it by rounding, or by blending at tile seams, at most), and a batch must stay resumable on
    other hardware.
    """
    return {
        "model": model,
        "scheduler": scheduler,
        "steps": request.num_inference_steps,
        "guidance": request.guidance_scale,
        "dynamic_cfg": request.dynamic_cfg if request.use_dynamic_cfg else "off",
        "negative_prompt": request.negative_prompts[0],
        "max_sequence_length": request.max_sequence_length,
        "frames": request.num_frames,
        "height": request.height,
        "width": request.width,
        "fps": fps,
        "lossy_levers": levers,
        "resize": resize,
        "riflex": request.riflex,
    } | ({"variant": variant} if variant is not None else {})


LOSSY_ATTENTION = ("sage", "sage-emulated", "fa3-fp8", "fa3-fp8-emulated")


def lossy_levers(quantize: str | None = None, attention: str | None = None, cache: float | None = None,
                 quantize_text: str | None = None) -> str:  # fmt: skip
    """The speed levers among these that make another video than the exact path ("fp8, int8 T5, sage
    attention, cache 0.1"), or "none": quantised linears (the transformer's, T5's), 8-bit attention, and a
    step cache that may skip steps (threshold 0 computes every step, bit for bit the uncached video)."""
    parts = [quantize] if quantize else []
    if quantize_text:
        parts.append(f"{quantize_text} T5")
    if attention in LOSSY_ATTENTION:
        parts.append(f"{attention} attention")
    if cache:
        parts.append(f"cache {cache:g}")
    return ", ".join(parts) or "none"


def pipeline_levers(pipe) -> str:
    """`lossy_levers` of what `accelerate` did to a loaded pipeline (`provenance.lever_settings`)."""
    return lossy_levers(**provenance.lever_settings(pipe))


def scheduler_kind(scheduler) -> str:
    """The kind of a scheduler object, "ddim" or "dpm" (its class name for any other)."""
    from cogvideox.schedulers import SCHEDULERS

    kinds = (kind for kind, cls in SCHEDULERS.items() if isinstance(scheduler, cls))
    return next(kinds, type(scheduler).__name__)


def pipeline_settings(pipe, prompt: str, request: dict, fps: float, given: str | None = None) -> dict:
    """`video_settings` of a loaded pipeline called with `request` (model unknown: None); guidance left
    out takes the model's recommendation, as the call does, and arguments `check_request` does not
    take are not recorded. given: the input file the call resizes, "image" (a first frame) or "video" (a
    video it redraws), whose `resize` is recorded as `generate` records it; None for none."""
    import inspect

    from cogvideox import loading
    from cogvideox.request import check_request

    guidance = loading.fill_sampling(
        pipe.sampling_defaults,
        **{name: request.get(name) for name in ("guidance_scale", "use_dynamic_cfg", "dynamic_cfg")},
    )
    known = inspect.signature(check_request).parameters
    shaping = {name: value for name, value in (request | guidance).items() if name in known}
    checked = pipe.check_request(prompt, task="image" if given == "image" else "text", **shaping)
    resize = request.get("resize", "stretch") if given is not None else None
    return video_settings(None, scheduler_kind(pipe.scheduler), checked, fps, pipeline_levers(pipe), resize)


def _latest_entries(output_dir: Path) -> dict[str, dict]:
    """The last manifest entry of each video file in the folder (none when there is no manifest)."""
    manifest = output_dir / MANIFEST
    latest: dict[str, dict] = {}
    if manifest.is_file():
        # We write ASCII (json.dumps escapes the rest): bytes that are not UTF-8 are damage, like a line cut
        # short by a crash, and spoil only their own line.
        for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = parse_json(line)
            except ValueError:
                continue  # a line cut short by a crash or damaged: its video is redone
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                latest[entry["file"]] = entry
    return latest


# What a manifest entry written before settings were recorded still tells: the size and rate of its file.
_LEGACY_SETTINGS = ("frames", "height", "width", "fps")
# Settings recorded since a later version, and what an entry without them was made with: batches had no
# speed levers before they were recorded.
_ADDED_SETTINGS = {"lossy_levers": "none", "resize": None, "riflex": False, "prompt_enhancer": "off"}
# Settings recorded only when set: a run without one still differs from an entry that has it.
_OPTIONAL_SETTINGS = ("variant",)


def _show(value) -> str:
    """A value for a message: strings quoted, integers whole (a seed), other numbers as short as they go."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return "unknown" if value is None else str(value)


def _beginning(prompt, length: int = 60):
    """A prompt shortened for a one-line message (anything else as it is)."""
    if isinstance(prompt, str) and len(prompt) > length:
        return prompt[: length - 3] + "..."
    return prompt


def _difference(entry: dict, item: Item, settings: dict) -> str | None:
    """The first thing in which a manifest entry differs from how `item` is to be made: its prompt, its
    seed ("seed 4, now 5"), its first frame's image file, then a setting ("steps 3, now 5"); None when they agree. A video of another
    prompt or seed in the item's file (another --seed, an edited prompts file) is finished work as much
    as one of other settings, and is not replaced unasked either.

    An entry without settings, written before they were recorded, is compared on what it does record:
    the size and rate of its file. The rest is unknown and taken to agree, as that version's resume
    assumed: a batch interrupted before an upgrade resumes after it instead of stopping or starting over,
    while a video of another size or rate still counts as made with other settings.
    """
    if entry.get("prompt") != item.prompt:
        return f"prompt {_show(_beginning(entry.get('prompt')))}, now {_show(_beginning(item.prompt))}"
    if entry.get("seed") != item.seed:
        return f"seed {_show(entry.get('seed'))}, now {_show(item.seed)}"
    if entry.get("image") != item.image:
        return f"image {_show(entry.get('image'))}, now {_show(item.image)}"
    from cogvideox.cli_args import recorded_model

    made = entry.get("settings")
    names = list(settings)
    if not isinstance(made, dict):
        made, names = entry, [name for name in _LEGACY_SETTINGS if name in settings]
    names += [name for name in _OPTIONAL_SETTINGS if name in made and name not in settings]
    for name in names:
        value = made.get(name, _ADDED_SETTINGS.get(name))
        if name == "model" and isinstance(value, str) and recorded_model(Path(value)) is None:
            value = None  # the demo model, recorded by its folder before it was recorded as None
        if value != settings.get(name):
            unset = {"model": "the demo", "variant": "none (the plain weights)"}.get(name)
            was, now = (unset if v is None and unset else _show(v) for v in (value, settings.get(name)))
            return f"{name.replace('_', ' ')} {was}, now {now}"
    return None


def survey(output_dir: str | Path, items: Sequence[Item], settings: dict) -> tuple[set[int], dict[int, str]]:
    """What the folder already holds of `items`: (indices finished with these settings, {index: how it
    differs} for those whose file holds a video of another prompt, seed or settings). An item counts when
    its file is a playable video and the latest manifest line for that file has its prompt, seed and
    settings; lines from before settings were recorded count as finished when the size and rate they
    record match (see `_difference`)."""
    output_dir = Path(output_dir)
    latest = _latest_entries(output_dir)
    done, other = set(), {}
    for item in items:
        entry = latest.get(item.file)
        if entry is None or not _playable(output_dir / item.file):
            continue  # nothing there, or nothing worth keeping: made (again) by this run
        difference = _difference(entry, item, settings)
        if difference is None:
            done.add(item.index)
        else:
            other[item.index] = difference
    return done, other


def _playable(path: Path) -> bool:
    """Whether `path` is an MP4 with frames (read from its header): an empty or damaged file left by a
    crash or a full disk is made again, not counted as finished."""
    import av

    try:
        if path.stat().st_size == 0:
            return False
        with av.open(str(path)) as container:
            return bool(container.streams.video) and container.streams.video[0].frames > 0
    except (OSError, av.FFmpegError):
        return False


def finished(output_dir: str | Path, items: Sequence[Item], settings: dict) -> set[int]:
    """Indices of the items already done with these settings (see `survey`)."""
    return survey(output_dir, items, settings)[0]


def refuse_other_settings(output_dir: str | Path, other: dict[int, str]) -> None:
    """Stop when the folder holds videos made with other settings: keeping them would pass them off as
    this run's, making them again would throw away work nobody asked to redo."""
    if other:
        first = other[min(other)]
        raise InputError(
            f"{output_dir} holds {len(other)} video(s) made with other settings ({first}); use another "
            "--output-dir, or --overwrite to make them again"
        )


def run_batch(
    pipe,
    prompts: Sequence[str],
    output_dir: str | Path,
    *,
    mesh=None,
    images: Sequence | None = None,
    seed: int = 0,
    fps: float | None = None,
    settings: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    enhancer=None,
    **request,
) -> list[dict]:
    """Generate one video per prompt into `output_dir`, skipping those finished by an earlier run.

    pipe: a `Pipeline`, or a `ParallelPipeline` on `mesh` when several processes share a video.
    prompts: one video each; a single string is one prompt, as in the pipeline call (not one per letter).
    images: for an image-to-video model, the first frame of each prompt's video as an image file.
    mesh: this process's `cogvideox.parallel.Mesh` under torch.distributed; its groups (`mesh.replicas`
        of them) take the prompts in turn, in lockstep rounds. Default: a `ParallelPipeline`'s own mesh;
        else, under torch.distributed, one group per process; else one process.
    settings: what the videos are made with (`video_settings`), recorded in each manifest entry and
        compared with an earlier run's; default: those of `pipe` and `request`, model None.
    overwrite: make again the videos an earlier run made with other settings (or of another prompt or
        seed in the same file); without it they stop
        the batch with an `InputError` before any video is made.
    enhancer: a `cogvideox.enhance.PromptEnhancer` that rewrites each prompt just before its video (the
        manifest keeps the rewrite; one that fails leaves the prompt as written); one process per video.
    request: the other arguments of the pipeline call (num_inference_steps, guidance_scale, ...).
    Returns the manifest entries this call wrote (on global rank 0; elsewhere an empty list). The
    progress bar shows on global rank 0 only (torchrun's RANK before the process group is up).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    output_dir = Path(output_dir)
    items = plan(prompts, seed, images)
    fps = fps or pipe.default_fps
    if settings is None:
        given = "image" if images is not None else None
        settings = pipeline_settings(pipe, prompts[0], request, fps, given) if prompts else {}
        settings["prompt_enhancer"] = enhancer_setting(enhancer)
    mesh = mesh or _default_mesh(pipe)
    if enhancer is not None and mesh.layout.size > 1:
        from cogvideox.cli_args import ENHANCER_WITH_PARALLEL

        raise InputError(ENHANCER_WITH_PARALLEL)
    with _claim(output_dir, items, settings, overwrite) as done:
        return _make_videos(pipe, items, done, output_dir, mesh, fps, settings, progress, request, enhancer)


def _default_mesh(pipe):
    """The mesh of a batch called without one. Under torch.distributed every process runs `run_batch`,
    and a single-process mesh would make each of them the leader of a group of one taking every prompt:
    every video made once per process, and listed once per process in the manifest."""
    import torch.distributed as dist

    from cogvideox.parallel import Layout, build_mesh, single_process_mesh

    if getattr(pipe, "mesh", None) is not None:
        return pipe.mesh
    if dist.is_initialized():
        return build_mesh(Layout())  # one group of one per process: the processes share out the prompts
    return single_process_mesh()


@contextmanager
def _claim(output_dir: Path, items: Sequence[Item], settings: dict, overwrite: bool) -> Iterator[set[int]]:
    """Hold the output folder for the batch: created, locked against another batch, and surveyed once, on
    global rank 0, whose findings every process gets. Yields the indices of the items already finished;
    raises `InputError` in every process when another batch holds the folder or when it holds videos made
    otherwise (unless `overwrite`). The `batch` command claims the folder before it loads the model, so
    that neither mistake costs a model load, and keeps it until the last video is written."""
    lock = []

    def look() -> set[int]:
        prepare_folder(output_dir)
        lock.append(_lock_folder(output_dir))
        fold_pending(output_dir)
        remove_leftovers(output_dir, items)
        warn_strangers(output_dir, items)
        done, other = survey(output_dir, items, settings)
        if not overwrite:
            refuse_other_settings(output_dir, other)
        return done

    try:
        yield _from_root(look)  # one view of the folder for everyone
    finally:
        for handle in lock:
            handle.close()  # releases the lock


def remove_leftovers(output_dir: Path, items: Sequence[Item]) -> None:
    """Delete the temporary files (`.0007-a-panda.XXXX.mp4.part`) that videos of this batch left when a
    run was killed while writing them. Called under the folder's lock: no other batch writes them now."""
    for item in items:
        for part in output_dir.glob(f".{Path(item.file).stem}.*.mp4.part"):
            part.unlink(missing_ok=True)


def _pending(output_dir: Path, file: str) -> Path:
    """Where a group's leader leaves the manifest entry of its video (`.0007-a-panda.mp4.entry`) until rank 0
    has put the round's entries into the manifest: a round cut short by another process's death keeps the
    lines of the videos finished in it (`fold_pending`). One writer per file, so a folder shared by several
    nodes is safe, which appends to the manifest from several processes would not be."""
    return output_dir / f".{file}.entry"


def _leave_pending(output_dir: Path, file: str, entry: dict) -> dict:
    """`entry`, left at its `_pending` place; with a "stop" when the folder takes no more files."""
    try:
        line = json.dumps({k: v for k, v in entry.items() if k != "stop"})  # as the manifest gets it
        _pending(output_dir, file).write_text(line + "\n", encoding="utf-8")
    except OSError as e:
        why = f"cannot write {_pending(output_dir, file)}: {e.strerror or e}; the batch stopped there"
        return {"stop": why} | entry
    return entry


def fold_pending(output_dir: Path) -> None:
    """Put into the manifest the entries that leaders left for a round that never ended (another process
    died in it), then delete them. Called under the folder's lock; an entry the manifest already ends with
    (rank 0 died between its append and the deletion) is not repeated, and a damaged one is dropped (its
    video is made again)."""
    latest = _latest_entries(output_dir)
    found = []
    for path in sorted(output_dir.glob(".*.mp4.entry")):
        try:
            entry = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict) and latest.get(entry.get("file")) != entry:
            found.append(entry)
    if found:
        _append(output_dir / MANIFEST, found)
    for path in output_dir.glob(".*.mp4.entry"):
        path.unlink(missing_ok=True)


def strangers(output_dir: Path, items: Sequence[Item]) -> list[str]:
    """The videos of the folder's manifest that none of `items` makes: of lines since removed or moved (a
    video's name holds its line's place, so every line after a removed one is made anew, under a new
    name), or of another batch."""
    ours = {item.file for item in items}
    return sorted(name for name in _latest_entries(output_dir) if name not in ours and (output_dir / name).is_file())


def warn_strangers(output_dir: Path, items: Sequence[Item]) -> None:
    """Say which videos of the folder this batch leaves as they are, so that a batch resumed after an edit
    of its prompts file does not silently stand beside the videos of the old lines."""
    found = strangers(output_dir, items)
    if found:
        names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        warnings.warn(
            f"{output_dir} holds {len(found)} video(s) that no line of the prompts makes now ({names}): of "
            "lines since removed or moved, or of another batch; they are left as they are",
            stacklevel=2,
        )


def enhancer_setting(enhancer) -> str:
    """How a batch's prompts are rewritten, as its settings record it: the chat model, or "off"."""
    return "off" if enhancer is None else enhancer.model


def _make_videos(pipe, items, done, output_dir, mesh, fps, settings, progress, request, enhancer=None) -> list[dict]:
    import torch.distributed as dist

    from cogvideox.cli import global_rank

    distributed = dist.is_initialized()
    is_root = not distributed or dist.get_rank() == 0
    todo = [item for item in items if item.index not in done]
    files = {item.index: item.file for item in items}
    written: list[dict] = []
    shown = progress and global_rank() == 0
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="video", disable=not shown)
    with bar:
        for round_start in range(0, math.ceil(len(todo) / mesh.replicas) * mesh.replicas, mesh.replicas):
            slot = round_start + mesh.replica
            entry = None
            if slot < len(todo):
                entry = _one_video(pipe, todo[slot], output_dir, fps, settings, mesh.is_leader, request, enhancer)
                if entry is not None:  # kept at once: the exchange below fails if another process died
                    entry = _leave_pending(output_dir, todo[slot].file, entry)
            entries = [entry]
            if distributed:
                entries = [None] * dist.get_world_size()
                dist.all_gather_object(entries, entry)
            entries = [e for e in entries if e is not None]
            stop = next((e.pop("stop") for e in entries if "stop" in e), None)
            if is_root:
                _append(output_dir / MANIFEST, entries)
                for e in entries:
                    _pending(output_dir, files[e["index"]]).unlink(missing_ok=True)
                written += entries
                bar.update(len(entries))
            if stop is not None:  # the folder takes no more files: every process stops alike
                raise InputError(stop)
    return written


def _lock_folder(output_dir: Path):
    """The batch's lock on its output folder (see `files.lock_folder`)."""
    return lock_folder(output_dir, LOCK, "batch", "writing into", "--output-dir")


def _from_root(work):
    """`work()` run on global rank 0 alone, its result handed to every process under torch.distributed;
    an `InputError` there is raised in every process alike, so that none is left waiting for the others."""
    import torch.distributed as dist  # here, not at the top: `cogvideox --help` need not load torch

    outcome = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome = [(work(), None)]
        except InputError as e:
            outcome = [(None, str(e))]
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    result, problem = outcome[0]
    if problem is not None:
        raise InputError(problem)
    return result


def _append(manifest: Path, entries: list[dict]) -> None:
    """Add entries as JSON lines, each flushed as it is written."""
    try:
        _append_lines(manifest, entries)
    except OSError as e:
        raise InputError(f"cannot write {manifest}: {e.strerror or e}; the batch stopped there") from None


def _append_lines(manifest: Path, entries: list[dict]) -> None:
    with open(manifest, "a+b") as f:
        # A line cut short by a crash has no newline: end it, or the next line would be glued to it.
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        for e in entries:
            f.write((json.dumps(e) + "\n").encode("utf-8"))
            f.flush()


def _one_video(
    pipe, item: Item, output_dir: Path, fps: float, settings: dict, leader: bool, request, enhancer=None
) -> dict | None:
    """Generate and (on the group's leader) write one video; its manifest entry on the leader."""
    from cogvideox.conditioning import load_image
    from cogvideox.video import export_or_rescue

    record = {"index": item.index, "prompt": item.prompt, "seed": item.seed, "settings": settings}
    if item.image is not None:
        record["image"] = item.image
    prompt = item.prompt
    try:
        # An undecodable image fails its own video.
        image = load_image(item.image_file) if item.image_file is not None else None
        if enhancer is not None:  # one that fails is logged, and the line is used as written
            prompt = enhancer.enhance(item.prompt, image) or item.prompt
            if prompt != item.prompt:
                record["enhanced_prompt"] = prompt
        result = pipe(prompt, seed=item.seed, image=image, progress=False, **request)  # the batch has its own bar
    except CogVideoXError as e:  # a failed video is recorded and the batch goes on
        return record | {"error": " ".join(str(e).split())} if leader else None
    if not leader:
        return None
    start = time.perf_counter()
    frames = result.frames[0]
    idea = item.prompt if prompt != item.prompt else None
    made = provenance.record(prompt, item.seed, settings, image=item.image, prompt_idea=idea,
                             **provenance.lever_settings(pipe))  # fmt: skip
    try:
        export_or_rescue(frames, output_dir / item.file, fps=fps, metadata=made)
    except InputError as e:  # the folder takes no more files (a full disk): this video rescued, stop
        return record | {"error": str(e), "stop": f"{e}; the batch stopped there, re-run it to go on"}
    timings = result.timings | {"write": time.perf_counter() - start}
    cache = pipe.acceleration.cache if pipe.acceleration is not None else None
    if cache is not None:
        record["cache"] = {"computed": cache.computed, "calls": cache.calls}  # this video's transformer calls
    return record | {
        "file": item.file,
        "frames": int(frames.shape[0]),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "fps": fps,
        "timings": {stage: round(seconds, 3) for stage, seconds in timings.items()},
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------
# The `batch` command


def add_batch_parser(commands) -> None:
    """Add `batch` to the `cogvideox` command's sub-parsers."""
    from cogvideox.cli_args import (
        add_enhancer_arguments,
        add_memory_arguments,
        add_model_arguments,
        add_sampling_arguments,
        add_speed_arguments,
        file_name,
        frame_rate,
        layout,
    )

    bat = commands.add_parser(
        "batch",
        help="generate one video per line of a prompts file, resumable, on one or many GPUs",
        description="Generate one MP4 per prompt (one per line; blank lines and # comments skipped; "
        "PROMPT@@IMAGE for an image-to-video model) into "
        "--output-dir, with a manifest.jsonl line per finished video. Re-running skips finished videos. "
        "Under torchrun the prompts are spread over the processes (or over groups of --parallel's size).",
    )
    arg = bat.add_argument
    arg(
        "prompts",
        type=file_name,
        help="text file with one prompt per line; for an image-to-video model each line ends with @@ and "
        "the first frame's image file, relative to this file's folder (a cat jumps@@cat.png)",
    )
    arg("-o", "--output-dir", required=True, type=file_name,
        help="folder for the videos and manifest.jsonl (created if missing)")
    add_model_arguments(
        bat, device_help="cpu, cuda or cuda:N (default: cuda when available; cuda:LOCAL_RANK under torchrun)"
    )
    add_sampling_arguments(
        bat, seed_default=0, seed_help="seed of the first prompt; prompt i gets seed+i (default: 0)"
    )
    arg("--fps", type=frame_rate, help="frame rate of the MP4s (default: the model's, 8 or 16)")
    arg(
        "--resize",
        choices=("stretch", "crop"),
        help="how an image-to-video batch's first frames reach the video size: 'stretch' as the reference "
        "does, 'crop' keeps the aspect ratio by cutting the centred region first (default: stretch)",
    )
    add_memory_arguments(bat)
    add_speed_arguments(bat)
    arg(
        "--parallel",
        type=layout,
        metavar="LAYOUT",
        help="processes per video under torchrun, e.g. cfg=2,ulysses=2 (see `generate --help`); the videos "
        "are those of a single-process batch; with --vae-tiling the tiles are split over the processes, "
        "without it each process decodes whole videos; default: one process per video",
    )
    arg(
        "--overwrite",
        action="store_true",
        help="make again the videos in --output-dir that an earlier run made with other settings, another "
        "--seed or another prompt on that line (without it such videos stop the batch before the model "
        "loads); videos made with these settings are kept",
    )
    arg("--quiet", action="store_true", help="no progress bars, only the final report")
    add_enhancer_arguments(bat, "each prompt into a detailed description just before its video (the manifest "
                           "keeps the rewrite)")  # fmt: skip
    bat.set_defaults(run=_batch)


def _batch(args: argparse.Namespace) -> int:
    from cogvideox import loading
    from cogvideox.cli import RUN_ERROR, _quiet_libraries
    from cogvideox.cli_args import (
        locate_model,
        memory_settings,
        prompt_enhancer,
        recorded_model,
        report_offload,
        request_from_args,
        speed_settings,
        warn_idle_guidance,
        warn_idle_riflex,
    )
    from cogvideox.parallel import launch, parallelize, single_process_mesh
    from cogvideox.pipeline import Pipeline
    from cogvideox.request import check_request, default_fps

    lines = split_lines(read_prompts(args.prompts))
    prompts = [line.prompt for line in lines]
    enhancer = prompt_enhancer(args)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output-dir {output_dir} is a file; give a folder")
    _quiet_libraries()

    # Every prompt is checked against the model, and the folder against the settings, before any loading.
    device, folder, configs = locate_model(args)
    image_to_video = configs.transformer.is_image_to_video
    root = Path(args.prompts).parent
    check_images(lines, image_to_video, root)
    if args.resize is not None and not image_to_video:
        raise InputError("--resize only applies to the first frames of an image-to-video model's batch")
    request = request_from_args(args, folder)
    resize = (args.resize or "stretch") if image_to_video else None
    train_steps = configs.scheduler.num_train_timesteps
    task = "image" if image_to_video else "text"
    checked = [
        check_request(configs.transformer, configs.vae, prompt, num_train_timesteps=train_steps, task=task,
                      **request)  # fmt: skip
        for prompt in prompts
    ]
    warn_idle_riflex(checked[0], configs.transformer)
    warn_idle_guidance(checked[0], args)
    if resize is not None:
        request["resize"] = resize
    scheduler = scheduler_kind(loading.load_scheduler(folder, args.scheduler))
    fps = args.fps or default_fps(configs.transformer)
    accelerate = speed_settings(args, device)
    speed = accelerate or {}
    levers = lossy_levers(speed.get("quantize"), speed.get("attention"), speed.get("cache"), speed.get("quantize_text"))
    settings = video_settings(recorded_model(folder), scheduler, checked[0], fps, levers, resize, args.variant)
    settings["prompt_enhancer"] = enhancer_setting(enhancer)
    items = plan(prompts, args.seed, [line.image for line in lines] if image_to_video else None, root)

    mesh, device = launch.join(args.parallel, device, configs.transformer, request["guidance_scale"] > 1,
                               one_group=False)
    is_root = mesh is None or (mesh.replica == 0 and mesh.is_leader)
    with _claim(output_dir, items, settings, args.overwrite) as done:  # before loading, held to the end
        start, entries = time.perf_counter(), []
        if len(done) < len(items):  # a finished batch run again loads no model
            pipe = Pipeline.from_pretrained(
                folder, dtype=args.dtype, device=device, scheduler=args.scheduler, variant=args.variant,
                **memory_settings(args, device),
            )
            if accelerate:
                pipe.accelerate(**accelerate)
            if is_root:  # after quantising, which may let "auto" choose a faster mode
                report_offload(pipe, args, device)
            if mesh is not None and mesh.layout.size > 1:
                pipe = parallelize(pipe, mesh)  # tiling as the single-process batch has it: the same videos
            start = time.perf_counter()
            entries = _make_videos(pipe, items, done, output_dir, mesh or single_process_mesh(), fps, settings,
                                   not args.quiet, request, enhancer)  # fmt: skip
    failed = _from_root(lambda: [e for e in entries if "error" in e])  # every process exits alike
    launch.leave(mesh)
    if not is_root:
        return RUN_ERROR if failed else 0
    made = len(entries) - len(failed)
    skipped = len(prompts) - len(entries)
    print(
        f"wrote {made} video(s) to {output_dir} in {time.perf_counter() - start:.1f}s ({skipped} finished "
        f"earlier, {len(failed)} failed){_stage_totals(entries)} | manifest {output_dir / MANIFEST}"
    )
    for e in failed:  # on stderr, as every other error: a script reading stdout gets the report alone
        print(f"cogvideox: error: prompt {e['index']} ({e['prompt'][:40]!r}): {e['error']}", file=sys.stderr)
    return RUN_ERROR if failed else 0


def _stage_totals(entries: list[dict]) -> str:
    """The seconds per stage summed over the videos this run made (over all processes under torchrun),
    for the report: " | text 0.4s, denoise 21.0s, decode 2.1s, write 0.3s", or "" when it made none."""
    totals: dict[str, float] = {}
    for entry in entries:
        for stage, seconds in entry.get("timings", {}).items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    if not totals:
        return ""
    from cogvideox.cli import stage_times

    return " | " + stage_times(totals)

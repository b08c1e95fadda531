"""Many prompts, one video each: `cogvideox batch prompts.txt --output-dir out/`.

    cogvideox batch prompts.txt -o out/                                   # one GPU
    torchrun --nproc-per-node 8 -m cogvideox batch prompts.txt -o out/    # 8 videos at a time
    torchrun --nproc-per-node 8 -m cogvideox batch prompts.txt -o out/ --parallel cfg=2,ulysses=2

The prompts file holds one prompt per line (blank lines and lines starting with # are skipped). Prompt i
(counting prompts only) becomes `NNNN-first-words.mp4` with seed `--seed + i`, so a re-run reproduces
it. Under torchrun the processes form groups of the `--parallel` layout's size (one process each without
it) and the groups take the prompts in turn; across nodes the output folder must be shared.

`manifest.jsonl` in the output folder gets one line per video as it finishes (prompt, seed, file, size,
timings) or per failure (prompt, seed, error). A re-run skips every video whose file exists and whose
manifest line has the same prompt and seed, so an interrupted batch resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist
from tqdm.auto import tqdm

from cogvideox.errors import CogVideoXError, InputError

MANIFEST = "manifest.jsonl"


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file: one per line, blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no prompts file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; give a text file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"{path} holds no prompts: write one prompt per line (# starts a comment)")
    return prompts


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


def plan(prompts: Sequence[str], seed: int = 0) -> list[Item]:
    return [Item(i, p, seed + i, video_name(i, p)) for i, p in enumerate(prompts)]


def finished(output_dir: str | Path, items: Sequence[Item]) -> set[int]:
    """Indices of the items already done: the file exists and its latest manifest line matches."""
    output_dir = Path(output_dir)
    manifest = output_dir / MANIFEST
    latest: dict[str, dict] = {}
    if manifest.is_file():
        for line in manifest.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: its video is redone
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                latest[entry["file"]] = entry
    done = set()
    for item in items:
        entry = latest.get(item.file)
        if (
            entry is not None
            and entry.get("prompt") == item.prompt
            and entry.get("seed") == item.seed
            and (output_dir / item.file).is_file()
        ):
            done.add(item.index)
    return done


def run_batch(
    pipe,
    prompts: Sequence[str],
    output_dir: str | Path,
    *,
    mesh=None,
    seed: int = 0,
    fps: float | None = None,
    progress: bool = True,
    **request,
) -> list[dict]:
    """Generate one video per prompt into `output_dir`, skipping those finished by an earlier run.

    pipe: a `Pipeline`, or a `ParallelPipeline` on `mesh` when several processes share a video.
    mesh: this process's `cogvideox.parallel.Mesh` under torch.distributed (None: one process); its
        groups (`mesh.replicas` of them) take the prompts in turn, in lockstep rounds.
    request: the other arguments of the pipeline call (num_inference_steps, guidance_scale, ...).
    Returns the manifest entries this call wrote (on global rank 0; elsewhere an empty list).
    """
    from cogvideox.parallel import single_process_mesh

    mesh = mesh or single_process_mesh()
    output_dir = Path(output_dir)
    distributed = dist.is_initialized()
    is_root = not distributed or dist.get_rank() == 0
    items = plan(prompts, seed)
    done = [finished(output_dir, items) if is_root else None]
    if distributed:
        dist.broadcast_object_list(done, src=0)  # one view of the folder for everyone
    todo = [item for item in items if item.index not in done[0]]
    fps = fps or pipe.default_fps
    written: list[dict] = []
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="video", disable=not (progress and is_root))
    with bar:
        for round_start in range(0, math.ceil(len(todo) / mesh.replicas) * mesh.replicas, mesh.replicas):
            slot = round_start + mesh.replica
            entry = None
            if slot < len(todo):
                entry = _one_video(pipe, todo[slot], output_dir, fps, mesh.is_leader, request)
            entries = [entry]
            if distributed:
                entries = [None] * dist.get_world_size()
                dist.all_gather_object(entries, entry)
            if is_root:
                entries = [e for e in entries if e is not None]
                _append(output_dir / MANIFEST, entries)
                written += entries
                bar.update(len(entries))
    return written


def _append(manifest: Path, entries: list[dict]) -> None:
    """Add entries as JSON lines, each flushed as it is written."""
    with open(manifest, "a+b") as f:
        # A line cut short by a crash has no newline: end it, or the next line would be glued to it.
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        for e in entries:
            f.write((json.dumps(e) + "\n").encode("utf-8"))
            f.flush()


def _one_video(pipe, item: Item, output_dir: Path, fps: float, leader: bool, request) -> dict | None:
    """Generate and (on the group's leader) write one video; its manifest entry on the leader."""
    from cogvideox.video import export_video

    record = {"index": item.index, "prompt": item.prompt, "seed": item.seed}
    try:
        result = pipe(item.prompt, seed=item.seed, progress=False, **request)  # the batch has its own bar
    except CogVideoXError as e:  # a failed video is recorded and the batch goes on
        return record | {"error": " ".join(str(e).split())} if leader else None
    if not leader:
        return None
    start = time.perf_counter()
    frames = result.frames[0]
    export_video(frames, output_dir / item.file, fps=fps)
    timings = result.timings | {"write": time.perf_counter() - start}
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
    from cogvideox.cli_args import add_model_arguments, add_sampling_arguments, positive_float

    bat = commands.add_parser(
        "batch",
        help="generate one video per line of a prompts file, resumable, on one or many GPUs",
        description="Generate one MP4 per prompt (one per line; blank lines and # comments skipped) into "
        "--output-dir, with a manifest.jsonl line per finished video. Re-running skips finished videos. "
        "Under torchrun the prompts are spread over the processes (or over groups of --parallel's size).",
    )
    arg = bat.add_argument
    arg("prompts", help="text file with one prompt per line")
    arg("-o", "--output-dir", required=True, help="folder for the videos and manifest.jsonl (created if missing)")
    add_model_arguments(
        bat, device_help="cpu, cuda or cuda:N (default: cuda when available; cuda:LOCAL_RANK under torchrun)"
    )
    add_sampling_arguments(
        bat, seed_default=0, seed_help="seed of the first prompt; prompt i gets seed+i (default: 0)"
    )
    arg("--fps", type=positive_float, help="frame rate of the MP4s (default: the model's, 8 or 16)")
    arg(
        "--vae-tiling",
        action="store_true",
        help="decode in overlapping tiles (less GPU memory; always on with --parallel, so the decode is "
        "split too)",
    )
    arg(
        "--parallel",
        metavar="LAYOUT",
        help="processes per video under torchrun, e.g. cfg=2,ulysses=2 (see `generate --help`); default: "
        "one process per video",
    )
    arg("--quiet", action="store_true", help="no progress bars, only the final report")
    bat.set_defaults(run=_batch)


def _batch(args: argparse.Namespace) -> int:
    from cogvideox.cli import RUN_ERROR, _quiet_libraries
    from cogvideox.cli_args import locate_model, request_from_args
    from cogvideox.parallel import launch, parallelize
    from cogvideox.parallel.decode import enable_tile_split
    from cogvideox.pipeline import Pipeline
    from cogvideox.request import check_request

    prompts = read_prompts(args.prompts)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output-dir {output_dir} is a file; give a folder")
    _quiet_libraries()

    # Every prompt is checked against the model before any loading.
    device, folder, configs = locate_model(args)
    request = request_from_args(args, folder)
    train_steps = configs.scheduler.num_train_timesteps
    for prompt in prompts:
        check_request(configs.transformer, configs.vae, prompt, num_train_timesteps=train_steps, **request)

    mesh, device = launch.join(args.parallel, device, configs.transformer, request["guidance_scale"] > 1,
                               one_group=False)
    is_root = mesh is None or (mesh.replica == 0 and mesh.is_leader)
    if is_root:
        output_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()  # the folder exists before anyone looks into it
    pipe = Pipeline.from_pretrained(folder, dtype=args.dtype, device=device, scheduler=args.scheduler)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if mesh is not None and mesh.layout.size > 1:
        enable_tile_split(pipe.vae)
        pipe = parallelize(pipe, mesh)
    start = time.perf_counter()
    entries = run_batch(
        pipe, prompts, output_dir, mesh=mesh, seed=args.seed, fps=args.fps, progress=not args.quiet, **request
    )
    launch.leave(mesh)
    if not is_root:
        return 0
    failed = [e for e in entries if "error" in e]
    made = len(entries) - len(failed)
    skipped = len(prompts) - len(entries)
    print(
        f"wrote {made} video(s) to {output_dir} in {time.perf_counter() - start:.1f}s ({skipped} finished "
        f"earlier, {len(failed)} failed) | manifest {output_dir / MANIFEST}"
    )
    for e in failed:
        print(f"cogvideox: error: prompt {e['index']} ({e['prompt'][:40]!r}): {e['error']}")
    return RUN_ERROR if failed else 0

"""Captions for fine-tuning data: a chat model that sees images describes each video of a folder, and the
captions land in the folder's `metadata.jsonl`, the layout `cogvideox train` reads.

CogVideoX learned from dense captions (the paper's CogVLM2-Caption: a paragraph on the subject, its
motion, the setting, the light and the camera), and fine-tunes best on captions of the same kind. Any
OpenAI-compatible endpoint whose model sees images writes them here (GPT-4o, GLM-4V, Qwen2-VL under vLLM,
llava under llama.cpp or Ollama...): it is shown a few frames spread over the clip, in order.

The folder's captions are never lost: `metadata.jsonl` is rewritten whole after each caption (complete or
not at all), captions already there are kept (unless `overwrite`), so a run stopped at any point goes on
where it stopped. Captions of the official layout (`prompts.txt` + `videos.txt`) are carried over into it.
A video that cannot be decoded is reported by name and skipped; when the endpoint fails for several
videos in a row the run stops, keeping what it wrote.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cogvideox.chat import ChatEndpoint, ChatError, jpeg_part
from cogvideox.errors import InputError
from cogvideox.files import lock_folder, write_into_place

if TYPE_CHECKING:
    import numpy as np

ENV_URL = "COGVIDEOX_CAPTIONER"
ENV_MODEL = "COGVIDEOX_CAPTIONER_MODEL"
ENV_KEY = "COGVIDEOX_CAPTIONER_API_KEY"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_FRAMES = 6
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".gif")
FRAME_SIDE = 512  # each frame's longer side as sent: enough to describe, small enough for six at once
STOP_AFTER = 3  # the endpoint failing for this many videos in a row stops the run
LOCK = ".caption.lock"  # held by the run captioning a folder

SYSTEM_PROMPT = (
    "You caption videos for training a text-to-video model. You see {frames} frames of one short clip, in "
    "order, spread evenly from its start to its end. Write one paragraph that describes the clip as it "
    "plays: the main subject and how it looks, what it does and how it moves over the clip, the setting, "
    "the lighting and colours, the shot and how the camera moves. Describe only what is visible; do not "
    "mention frames, images or a video, and do not guess names. Present tense, under 120 words. Reply "
    "with the caption only: no title, no quotes, no list."
)


class CaptionError(ChatError):
    """The captioner answered nothing usable (after any retries)."""


class VideoCaptioner(ChatEndpoint):
    """Writes a caption of a video from `frames` frames of it. `context`: what the clips have in common
    (who or what is in them, the style), said to the model so it can name things."""

    role = "the captioner"
    error = CaptionError
    key_variable = ENV_KEY

    def __init__(
        self,
        base_url: str,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        frames: int = DEFAULT_FRAMES,
        context: str | None = None,
        timeout: float = 120.0,
        attempts: int = 3,
        backoff: float = 1.0,
    ) -> None:
        super().__init__(base_url, model, api_key, timeout, attempts, backoff)
        if not 1 <= frames <= 32:
            raise InputError(f"frames must be from 1 to 32, got {frames}")
        self.frames = frames
        self.context = context.strip() if context else None

    def messages(self, frames: np.ndarray) -> list[dict]:
        """The chat sent for a clip's frames (uint8 [N, H, W, 3], in order)."""
        system = SYSTEM_PROMPT.format(frames=len(frames))
        if self.context:
            system += f" What the clips have in common, to name things by: {self.context}"
        text = {"type": "text", "text": "Caption this clip."}
        pictures = [jpeg_part(frame, FRAME_SIDE) for frame in frames]
        return [{"role": "system", "content": system}, {"role": "user", "content": [text, *pictures]}]

    def caption(self, video: str | Path) -> str:
        """The caption of a video file; `InputError` when it cannot be decoded, `CaptionError` when the
        endpoint fails."""
        from cogvideox.video import decode_failure, sample_frames

        try:
            frames = sample_frames(video, self.frames)
        except Exception as e:  # PyAV's errors for a damaged file, ValueError for one without frames
            raise InputError(f"cannot decode it ({decode_failure(e, video)})") from None
        return self.complete(self.body(self.messages(frames), max_tokens=300, temperature=0.2))


@dataclass
class CaptionReport:
    written: list[str] = field(default_factory=list)  # captioned in this run
    kept: int = 0  # had a caption and were left alone
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (video, why): cannot be decoded
    failed: list[tuple[str, str]] = field(default_factory=list)  # (video, why): the endpoint failed
    stopped: str | None = None  # why the run stopped early, if it did
    left: int = 0  # with no caption written when a Ctrl-C stopped the run: the next run's to caption


def read_entries(folder: Path) -> list[dict]:
    """The folder's entries, each a dict with at least "video": `metadata.jsonl`'s objects as they are,
    else the official layout's pairs, else none. `InputError` for a `metadata.jsonl` line that is not an
    object with a video path (rewriting the file would lose it: it must be mended first)."""
    from cogvideox.train.data import METADATA_FILE, entry_video, json_object, read_line_files, read_text, text_lines

    path = folder / METADATA_FILE
    if path.is_file():
        entries = []
        for number, line in enumerate(text_lines(read_text(path)), start=1):
            if not line.strip():
                continue
            entry = json_object(line)
            if entry is None or not isinstance(entry_video(entry), str):
                raise InputError(f'{path} line {number} is not an object with a "video" path; mend or remove it')
            if "video" not in entry:
                entry = {"video": entry.pop("file_name"), **entry}
            entries.append(entry)
        return entries
    found = read_line_files(folder)
    if found is None:
        return []
    # Training skips a line that is not UTF-8 text; rewriting the listing would lose it: it must be mended first.
    unreadable = next((s for s in found[1] if s.reason.startswith("not UTF-8 text")), None)
    if unreadable is not None:
        raise InputError(f"{folder / unreadable.name} is not UTF-8 text; save the file as UTF-8")
    return [{"video": name, "caption": caption} for name, caption, _ in found[0]]


def _as_found(name: str) -> str:
    """An entry's path as `find_videos` names the file: "./clips/a.mp4" and "clips//a.mp4" are clips/a.mp4."""
    return Path(os.path.normpath(name)).as_posix()


def find_videos(folder: Path, entries: list[dict]) -> list[str]:
    """Video files under `folder` (relative POSIX paths, sorted), hidden folders and the entries' masks
    left out."""
    masks = {_as_found(e["mask"]) for e in entries if isinstance(e.get("mask"), str)}
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() not in VIDEO_SUFFIXES:
            continue
        if path.is_file() and relative.as_posix() not in masks:
            found.append(relative.as_posix())
    return sorted(found)


def caption_folder(
    folder: str | Path,
    captioner: VideoCaptioner,
    prefix: str = "",
    overwrite: bool = False,
    jobs: int = 1,
    progress: bool = False,
) -> CaptionReport:
    """Caption every video of `folder` that has no caption yet (every one with `overwrite`), `jobs` at a
    time, writing `metadata.jsonl` after each. `prefix` goes before each new caption (a trigger word for
    a LoRA: "In the style of xyz, "). `progress`: a progress bar. `InputError` when another run is
    captioning the folder. A Ctrl-C (or SIGTERM) stops the run at once, what it wrote kept; once it began
    captioning, the `KeyboardInterrupt` carries its `report` (`left` set), for the count of both."""
    folder = Path(folder)
    if folder.is_file():
        raise InputError(f"{folder} is a file; give the folder of videos to caption, such as {folder.parent}")
    if not folder.is_dir():
        raise InputError(f"no folder at {folder}")
    _, _, todo, report = _plan(folder, overwrite)
    if not todo:  # nothing to write: no lock either (a read-only folder whose videos all have captions)
        return report
    # Two runs in one folder would each rewrite metadata.jsonl from what they read, losing the other's.
    with lock_folder(folder, LOCK, "caption run", "captioning", "folder"):
        return _caption_folder(folder, captioner, prefix, overwrite, jobs, progress)


def _plan(folder: Path, overwrite: bool) -> tuple[list[dict], int, list[dict], CaptionReport]:
    """The folder's entries (metadata.jsonl's, then the videos found that it does not list), how many of
    them it lists, the entries to caption, and the report of the others (kept, or their file missing)."""
    from cogvideox.train.data import entry_caption

    entries = read_entries(folder)
    by_video = {_as_found(e["video"]): e for e in entries}
    listed = len(entries)  # entries past these were found in the folder, and are written once captioned
    for name in find_videos(folder, entries):
        if name not in by_video:
            by_video[name] = {"video": name}
            entries.append(by_video[name])
    report = CaptionReport()
    todo = []
    for entry in entries:
        if entry_caption(entry) and not overwrite:
            report.kept += 1
        elif (folder / entry["video"]).is_file():
            todo.append(entry)
        else:
            report.skipped.append((entry["video"], "file not found"))
    return entries, listed, todo, report


def _caption_folder(
    folder: Path, captioner: VideoCaptioner, prefix: str, overwrite: bool, jobs: int, progress: bool
) -> CaptionReport:
    from tqdm.auto import tqdm

    from cogvideox.train.data import CAPTION_KEYS, METADATA_FILE

    entries, listed, todo, report = _plan(folder, overwrite)  # again, under the lock
    if not todo:
        return report

    def write() -> None:
        kept = entries[:listed] + [e for e in entries[listed:] if "caption" in e]
        lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept)
        write_into_place(folder / METADATA_FILE, lambda temporary: Path(temporary).write_text(lines, "utf-8"))

    failures_in_a_row = 0
    waiting = iter(todo)  # started `jobs` at a time, so that a stopped run starts nothing more
    results: queue.Queue = queue.Queue()
    running = 0
    bar = tqdm(total=len(todo), desc="captioning", unit="video", disable=not progress)
    try:
        with bar:

            def start_next() -> None:
                nonlocal running
                entry = next(waiting, None)
                if entry is not None and report.stopped is None:
                    _in_background(lambda: captioner.caption(folder / entry["video"]), entry, results)
                    running += 1

            for _ in range(max(1, jobs)):
                start_next()
            while running:
                entry, caption, error = _next_result(results)
                running -= 1
                if isinstance(error, InputError):
                    report.skipped.append((entry["video"], str(error)))
                elif isinstance(error, CaptionError):
                    report.failed.append((entry["video"], str(error)))
                    failures_in_a_row += 1
                    if failures_in_a_row >= STOP_AFTER and report.stopped is None:
                        report.stopped = f"{captioner.role} failed for {STOP_AFTER} videos in a row: {error}"
                elif error is not None:
                    raise error  # a bug of ours, with its traceback
                else:
                    failures_in_a_row = 0
                    for other in CAPTION_KEYS[1:]:  # one caption per entry: ours
                        entry.pop(other, None)
                    entry["caption"] = prefix + caption
                    write()
                    report.written.append(entry["video"])
                bar.update()
                start_next()
    except KeyboardInterrupt as e:  # what was written is in metadata.jsonl already: the report says how much
        report.left = len(todo) - len(report.written)
        e.report = report
        raise
    return report


def _in_background(work, entry: dict, results: queue.Queue) -> None:
    """Run `work()` in a daemon thread, putting (entry, its result, None) or (entry, None, the exception)
    on `results`. Daemon threads, not a thread pool: Ctrl-C stops the run at once, where a pool's threads
    are waited for, a request and its retries (minutes against a dead endpoint), before the process ends."""

    def run() -> None:
        try:
            results.put((entry, work(), None))
        except Exception as e:  # handed to the caller's thread, which decides
            results.put((entry, None, e))

    threading.Thread(target=run, name=f"caption {entry['video']}", daemon=True).start()


def _next_result(results: queue.Queue) -> tuple:
    """The next result from `results`, waited for in short spells: a Ctrl-C that comes just before a
    wait would otherwise be held up until a result comes."""
    while True:
        try:
            return results.get(timeout=0.2)
        except queue.Empty:
            pass

"""Fine-tuning data: a folder of videos and captions, decoded into fixed-size clips in buckets.

Two folder layouts are read:
- the official trainer's: `prompts.txt` (or `prompt.txt`) and `videos.txt`, one entry per line, line i
  of one belonging to line i of the other; video paths are relative to the folder;
- `metadata.jsonl`: one `{"video": "clips/a.mp4", "caption": "..."}` object per line, optionally with
  `"mask": "masks/a.mp4"`: a video of the same frame rate and length (or one image for every frame)
  whose bright pixels mark the region the loss stresses (see `FinetuneConfig.mask_weight`).

A clip becomes `frames x height x width` pixels: frames are taken at a target frame rate from the
start of the video, and each frame is scaled to cover the bucket's size and centre-cropped (the aspect
ratio is kept, nothing is stretched). With several buckets each video goes to the one closest to its
aspect ratio among those it has enough frames for. A mask goes through the same frame selection and
crop as its video, so it stays aligned with it. A video that cannot be used (missing, unreadable, too
short, without a caption, with a missing or unreadable mask) is reported by name and skipped; it never
stops a run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cogvideox.errors import InputError
from cogvideox.files import parse_json
from cogvideox.video import decode_failure, read_frames

METADATA_FILE = "metadata.jsonl"
# A mask file with one of these endings is a single image applied to every frame.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPT_FILES = ("prompts.txt", "prompt.txt")
VIDEOS_FILE = "videos.txt"
CAPTION_KEYS = ("caption", "prompt", "text")  # a metadata.jsonl entry's caption, under the first it has


@dataclass(frozen=True)
class Clip:
    """One training example before decoding: the video file, its caption, the name it is reported by,
    and optionally a mask file (bright = the region the loss stresses)."""

    video: Path
    caption: str
    name: str
    mask: Path | None = None


@dataclass(frozen=True)
class Bucket:
    """A clip shape: frames x height x width pixels."""

    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> Bucket:
        """`"49x480x720"` (frames x height x width) -> Bucket."""
        parts = text.lower().replace(" ", "").split("x")
        try:
            frames, height, width = (int(p) for p in parts)
        except ValueError:
            raise InputError(f"cannot read {text!r} as a bucket; write FRAMESxHEIGHTxWIDTH such as 49x480x720") from None
        return cls(frames, height, width)


@dataclass
class Skipped:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


# ----------------------------------------------------------------------------------------------------
# The folder


def read_text(path: Path, errors: str = "strict") -> str:
    """A listing file's text: UTF-8, with or without the byte-order mark Windows editors write."""
    try:
        return path.read_text(encoding="utf-8-sig", errors=errors)
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise InputError(f"{path} line {line} is not UTF-8 text; save the file as UTF-8") from None


def text_lines(text: str) -> list[str]:
    """`text`'s lines, split at newlines alone (\n, \r\n, \r), as a text file is read line by line:
    `str.splitlines` also splits at a form feed or a Unicode line separator that a caption may hold,
    which in the official layout pairs every later caption with the wrong video."""
    lines = re.split(r"\r\n|\r|\n", text)
    if lines[-1] == "":  # the newline ending the last line starts no line
        lines.pop()
    return lines


def read_lines(path: Path) -> list[str | None]:
    """A listing file's lines, stripped, without the blank lines at its end; None for a line that is not
    UTF-8 text (its neighbours are read: one damaged line must not stop a run)."""
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")  # bad bytes become lone surrogates
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    lines: list[str | None] = []
    for line in text_lines(text):
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            lines.append(None)
        else:
            lines.append(line.strip())
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def scan_folder(root: str | Path) -> tuple[list[Clip], list[Skipped]]:
    """The clips a data folder lists, and the entries skipped with the reason (missing file, no caption).

    Raises `InputError` when the folder does not exist or holds neither layout.
    """
    root = Path(root)
    if root.is_file():
        raise InputError(
            f"data {root} is a file; give the folder holding {METADATA_FILE} (or prompts.txt and {VIDEOS_FILE})"
        )
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist")
    if (root / METADATA_FILE).is_file():
        entries, skipped = _read_jsonl(root / METADATA_FILE)
    else:
        found = read_line_files(root)
        if found is None:
            raise InputError(
                f"{root} holds neither {METADATA_FILE} nor prompts.txt + {VIDEOS_FILE}; see docs/finetune.md for "
                "the two layouts"
            )
        entries, skipped = found
    clips = []
    for name, caption, mask in entries:
        path = root / name
        if not path.is_file():
            skipped.append(Skipped(name, "a folder, not a video file" if path.is_dir() else "file not found"))
        elif not caption:
            skipped.append(Skipped(name, "no caption"))
        elif mask is not None and not (root / mask).is_file():
            skipped.append(Skipped(name, f"mask {mask} not found"))
        else:
            clips.append(Clip(path, caption, name, None if mask is None else root / mask))
    return clips, skipped


def _read_jsonl(path: Path) -> tuple[list[tuple[str, str, str | None]], list[Skipped]]:
    """The entries of `metadata.jsonl`; a line that is not one (not UTF-8, not JSON, not an object with a
    video path) is skipped and named, and the others are read. Lines are split at newlines alone: a caption
    may hold a raw U+2028, which `str.splitlines` would split at."""
    entries, skipped = [], []
    try:
        lines = path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n")  # the BOM Windows editors write
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    for number, raw in enumerate(lines, start=1):
        where = f"{path.name} line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(Skipped(where, "not UTF-8 text"))
            continue
        if not line.strip():
            continue
        row = json_object(line)
        if row is None:
            skipped.append(Skipped(where, "not a JSON object"))
            continue
        video = entry_video(row)
        if not isinstance(video, str) or not video:
            skipped.append(Skipped(f"{path.name} line {number}", 'no "video" path'))
            continue
        mask = row.get("mask")
        if mask is not None and (not isinstance(mask, str) or not mask):
            skipped.append(Skipped(video, f'"mask" must be a file path, got {mask!r}'))
            continue
        entries.append((video, entry_caption(row), mask))
    return entries, skipped


def json_object(line: str) -> dict | None:
    """A metadata.jsonl line's JSON object; None for a line that is not one."""
    try:
        row = parse_json(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def entry_video(row: dict):
    """A metadata.jsonl entry's video path as given: "video", or "file_name" as Hugging Face datasets say."""
    return row.get("video") or row.get("file_name")


def entry_caption(row: dict) -> str:
    """A metadata.jsonl entry's caption (under the first of `CAPTION_KEYS` that holds text: an export may
    leave an empty or null column beside the one it filled), stripped; "" for none."""
    captions = (row.get(key) for key in CAPTION_KEYS)
    return next((c.strip() for c in captions if isinstance(c, str) and c.strip()), "")


def read_line_files(root: Path) -> tuple[list[tuple[str, str, None]], list[Skipped]] | None:
    """The official layout's entries (video, caption, no mask) and what was skipped; None when `root` lacks
    prompts.txt (or prompt.txt) or videos.txt."""
    prompts = next((root / n for n in PROMPT_FILES if (root / n).is_file()), None)
    if prompts is None or not (root / VIDEOS_FILE).is_file():
        return None
    captions, names = read_lines(prompts), read_lines(root / VIDEOS_FILE)
    # Blank last lines count too: an empty caption is a caption.
    written = len(text_lines(read_text(prompts, errors="surrogateescape")))
    entries, skipped = [], []
    for i, name in enumerate(names):
        # Line i of one file belongs to line i of the other: a line that cannot be read drops its pair.
        if name is None:
            skipped.append(Skipped(f"{VIDEOS_FILE} line {i + 1}", "not UTF-8 text"))
            continue
        if not name:
            continue
        if i < len(captions) and captions[i] is None:
            skipped.append(Skipped(f"{prompts.name} line {i + 1}", f"not UTF-8 text (the caption of {name})"))
            continue
        if i < written:
            entries.append((name, captions[i] if i < len(captions) else "", None))
        else:  # the two files are out of step: say so, not merely "no caption"
            skipped.append(Skipped(name, f"no caption: {prompts.name} has {written} line(s), {VIDEOS_FILE} "
                                         f"{len(names)}"))  # fmt: skip
    if len(captions) > len(names):
        skipped.append(Skipped(prompts.name, f"{len(captions) - len(names)} caption(s) past the last video"))
    return entries, skipped


# ----------------------------------------------------------------------------------------------------
# Decoding


def cover_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float frames [T, C, h, w] -> [T, C, height, width]: scaled to cover the target (area-preserving
    antialiased bilinear), then centre-cropped, so the aspect ratio is kept."""
    _, _, h, w = frames.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[:, :, top : top + height, left : left + width]


def to_model_input(frames: np.ndarray, bucket: Bucket) -> torch.Tensor:
    """uint8 frames [T, h, w, 3] (T >= bucket.frames) -> float32 video [3, F, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames[: bucket.frames])).permute(0, 3, 1, 2).float() / 255.0
    x = cover_crop(x, bucket.height, bucket.width).clamp(0.0, 1.0)
    return (x * 2.0 - 1.0).permute(1, 0, 2, 3).contiguous()


def choose_bucket(buckets: list[Bucket], frames: int, height: int, width: int) -> Bucket | None:
    """The bucket for a video of `frames` frames (at the target rate) and `height x width` pixels: among
    those it has enough frames for, the closest in aspect ratio, then the longest, then the largest;
    None when it is too short for all of them."""
    fitting = [b for b in buckets if b.frames <= frames]
    if not fitting:
        return None
    aspect = math.log(width / height)

    def key(b: Bucket):
        return (round(abs(math.log(b.width / b.height) - aspect), 6), -b.frames, -b.height * b.width)

    return min(fitting, key=key)


def load_clip(clip: Clip, buckets: list[Bucket], fps: float | None) -> tuple[torch.Tensor, Bucket]:
    """Decode a clip into its bucket: (video [3, F, H, W] in [-1, 1], bucket). Raises `ClipError` with a
    reason for a video that cannot be used."""
    frames, bucket = _decode(clip, buckets, fps)
    return to_model_input(frames, bucket), bucket


def load_masked_clip(
    clip: Clip, buckets: list[Bucket], fps: float | None
) -> tuple[torch.Tensor, torch.Tensor | None, Bucket]:
    """`load_clip` plus the clip's mask: (video [3, F, H, W] in [-1, 1], mask [F, H, W] in [0, 1] or None,
    bucket). Raises `ClipError` with a reason for a video or mask that cannot be used."""
    frames, bucket = _decode(clip, buckets, fps)
    mask = load_mask(clip, bucket, fps, frames.shape[1:3])
    return to_model_input(frames, bucket), mask, bucket


def _decode(clip: Clip, buckets: list[Bucket], fps: float | None) -> tuple[np.ndarray, Bucket]:
    longest = max(b.frames for b in buckets)
    try:
        frames = read_frames(clip.video, fps, longest)
    except Exception as e:  # PyAV's errors for damaged files have many types
        raise ClipError(f"cannot decode ({decode_failure(e, clip.video)})") from None
    bucket = choose_bucket(buckets, len(frames), frames.shape[1], frames.shape[2])
    if bucket is None:
        shortest = min(b.frames for b in buckets)
        rate = f" at {fps:g} fps" if fps else ""
        held = "a still picture (1 frame)" if len(frames) == 1 else f"{len(frames)} frames{rate}"
        raise ClipError(f"too short: {held}, the shortest bucket needs {shortest}")
    return frames, bucket


def to_mask(frames: np.ndarray, bucket: Bucket) -> torch.Tensor:
    """uint8 mask frames [T, h, w, 3] (T >= bucket.frames) -> float32 [F, H, W] in [0, 1] (the mean over
    RGB / 255), cropped exactly as `to_model_input` crops the video."""
    x = torch.from_numpy(np.ascontiguousarray(frames[: bucket.frames])).float().mean(-1, keepdim=True) / 255.0
    x = cover_crop(x.permute(0, 3, 1, 2), bucket.height, bucket.width).clamp(0.0, 1.0)
    return x[:, 0].contiguous()


def load_mask(clip: Clip, bucket: Bucket, fps: float | None, video_size: tuple[int, int]) -> torch.Tensor | None:
    """The clip's mask in its bucket, float32 [F, H, W] in [0, 1], or None for a clip without one.

    A mask video is sampled at the same frame rate from its start, like its video; an image is used for
    every frame. `video_size` (height, width) is the video's: a mask of another aspect ratio would be
    cropped differently and is refused. Raises `ClipError` with a reason for a mask that cannot be used.
    """
    if clip.mask is None:
        return None
    image = clip.mask.suffix.lower() in IMAGE_SUFFIXES
    try:
        frames = read_frames(clip.mask, None if image else fps, 1 if image else bucket.frames)
    except Exception as e:  # PyAV's errors for damaged files have many types
        raise ClipError(f"cannot decode mask {clip.mask.name} ({decode_failure(e, clip.mask)})") from None
    if image:
        frames = np.repeat(frames[:1], bucket.frames, axis=0)
    elif len(frames) < bucket.frames:
        rate = f" at {fps:g} fps" if fps else ""
        raise ClipError(f"mask {clip.mask.name} is too short: {len(frames)} frames{rate}, the clip has {bucket.frames}")
    height, width = video_size
    if abs(math.log((frames.shape[2] / frames.shape[1]) / (width / height))) > 0.01:
        raise ClipError(
            f"mask {clip.mask.name} is {frames.shape[2]}x{frames.shape[1]}, the video {width}x{height}: "
            "they must have the same aspect ratio"
        )
    return to_mask(frames, bucket)


class ClipError(Exception):
    """A video that cannot be used for training (the message says why)."""


def check_buckets(buckets: list[Bucket], transformer_config, vae_config) -> list[Bucket]:
    """Every bucket must be a shape the model takes: 8k+1 frames, sides multiples of 16 (and within the
    1.5 models' position grid). Raises `InputError` naming the bucket."""
    from cogvideox.request import check_frames, check_size

    if not buckets:
        raise InputError("give at least one bucket (FRAMESxHEIGHTxWIDTH)")
    for b in buckets:
        try:
            check_frames(b.frames, transformer_config, vae_config)
            check_size(b.height, b.width, b.frames, transformer_config, vae_config)
        except InputError as e:
            raise InputError(f"bucket {b}: {e}") from None
    return list(dict.fromkeys(buckets))

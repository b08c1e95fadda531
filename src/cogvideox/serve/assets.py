"""The other forms of a finished video that `GET /v1/videos/{id}/content?variant=...` serves: OpenAI's
`thumbnail` and `spritesheet`, and an animated `gif`. Each is made from the MP4 on its first request,
written under a temporary name and renamed (complete or absent), and kept beside the MP4 until the video is
deleted."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cogvideox.files import write_into_place
from cogvideox.video import export_video, read_video

# variant -> (file name suffix after the job id, media type); "video" is the MP4 itself.
VARIANTS = {
    "video": (".mp4", "video/mp4"),
    "thumbnail": (".thumbnail.webp", "image/webp"),
    "spritesheet": (".spritesheet.jpg", "image/jpeg"),
    "gif": (".gif", "image/gif"),
}
SPRITE_WIDTH = 160  # pixels across each frame of a spritesheet (smaller videos keep their width)


def asset_path(video: Path, variant: str) -> Path:
    """Where `variant` of the MP4 at `video` lives."""
    return video.with_name(video.name.removesuffix(".mp4") + VARIANTS[variant][0])


def derived_paths(video: Path) -> list[Path]:
    """Every file made from the MP4 at `video` (present or not): deleted with it."""
    return [asset_path(video, variant) for variant in VARIANTS if variant != "video"]


def make_asset(video: Path, variant: str, fps: float) -> Path:
    """`variant` of the MP4 at `video` (a GIF plays at `fps`), made if it is not there yet."""
    path = asset_path(video, variant)
    if variant == "video" or path.is_file():
        return path
    frames, _ = read_video(video)
    if variant == "gif":
        return export_video(frames, path, fps=fps)
    if variant == "thumbnail":
        picture, options = frames[0], dict(format="WEBP", quality=90)
    else:
        picture, options = spritesheet(frames), dict(format="JPEG", quality=85)
    _save_image(picture, path, options)
    return path


def spritesheet(frames: np.ndarray, width: int = SPRITE_WIDTH) -> np.ndarray:
    """Every frame, scaled to `width` pixels across (never up), in a grid of ceil(sqrt(F)) columns
    filled row by row; the cells after the last frame stay black. uint8 [rows * h, cols * w, 3]."""
    from PIL import Image

    count, height, frame_width, _ = frames.shape
    scale = min(1.0, width / frame_width)
    w, h = max(1, round(frame_width * scale)), max(1, round(height * scale))
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    sheet = np.zeros((rows * h, columns * w, 3), np.uint8)
    for index, frame in enumerate(frames):
        tile = np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.LANCZOS)) if scale < 1 else frame
        row, column = divmod(index, columns)
        sheet[row * h : (row + 1) * h, column * w : (column + 1) * w] = tile
    return sheet


def _save_image(picture: np.ndarray, path: Path, options: dict) -> None:
    from PIL import Image

    write_into_place(path, lambda file: Image.fromarray(picture).save(file, **options))

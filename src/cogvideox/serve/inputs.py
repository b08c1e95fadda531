"""The files jobs bring (`input_reference`): a picture, the first frame of an image-to-video model's video,
or a video, which a text-to-video model redraws (video-to-video). Each is decoded when the request comes,
so a file that is neither is a 400 and never a failed job, then kept in the data folder until the job is
deleted: a picture as PNG, a video as sent. A worker elsewhere reads it from the same folder, as it
writes the videos there."""

from __future__ import annotations

import io
import logging
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from cogvideox.errors import InputError
from cogvideox.files import write_into_place

if TYPE_CHECKING:  # the worker reads stored inputs without the web stack
    import numpy as np

    from cogvideox.serve.body import Upload

log = logging.getLogger("cogvideox.serve")

# Far above any video size (1.5 makes 1360x768), well below what would take a worker's memory: a 40 MP
# photo is 120 MB as RGB.
MAX_PIXELS = 40_000_000
# A video's frames are decoded whole, on the API server and again on the worker: 49 frames of 8K are 4.9 GB
# from a 50 KB file of black frames. 4K (what phones record) is 1.2 GB, and far above any video size.
MAX_VIDEO_PIXELS = 3840 * 2160
FORMATS = ("PNG", "JPEG", "WEBP")

_NAME = re.compile(r"[0-9a-f]{32}\.(png|video)")


def input_path(data_dir: str | Path, name: str) -> Path:
    """Where the stored input `name` (a `store_image` or `store_video` answer) lives."""
    if not _NAME.fullmatch(name):
        raise InputError(f"not a stored input: {name!r}")
    return Path(data_dir) / "inputs" / name


def is_picture(upload: Upload) -> bool:
    """Whether the file is a picture (of any format Pillow reads) rather than something else, a video."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(upload.data)):
            return True
    except Image.DecompressionBombError:  # a picture too large to open: `store_image` says so
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def store_image(upload: Upload, data_dir: str | Path, param: str = "input_reference") -> str:
    """Decode `upload` (PNG, JPEG or WebP, turned upright from its EXIF orientation, in RGB) and keep it;
    its name for `input_path`. ApiError 400 naming `param` for a file that is not such a picture."""
    from PIL import Image, ImageOps

    from cogvideox.conditioning import load_image
    from cogvideox.serve.errors import ApiError

    if not upload.data:
        raise ApiError(400, "invalid_image", f"{param}: the file is empty", param)
    try:
        with Image.open(io.BytesIO(upload.data)) as opened:
            if opened.format not in FORMATS:
                raise ApiError(400, "invalid_image",
                               f"{param}: a {opened.format} file; send a PNG, JPEG or WebP picture", param)  # fmt: skip
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise _too_big(param, f"{width}x{height} is")
            opened.load()
            picture = load_image(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours, met when it opens the file
        raise _too_big(param, "the picture is") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ApiError(400, "invalid_image", f"{param}: cannot decode the file as a picture ({e}); "
                       "send a PNG, JPEG or WebP", param) from None  # fmt: skip
    return _keep(data_dir, ".png", lambda temporary: picture.save(temporary, format="PNG"))


def _too_big(param: str, what: str):
    from cogvideox.serve.errors import ApiError

    return ApiError(400, "invalid_image", f"{param}: {what} over {MAX_PIXELS // 10**6} megapixels; send a smaller "
                    "picture (it is resized to the video anyway)", param)  # fmt: skip


def store_video(upload: Upload, data_dir: str | Path, fps: float, max_frames: int, param: str = "input_reference"):
    """Keep `upload` as sent and decode it as the worker will (`read_input_video`); (its name for
    `input_path`, the number of frames it gives, at most `max_frames`). ApiError 400 naming `param` for a
    file that is not a video."""
    from cogvideox.serve.errors import ApiError

    if not upload.data:
        raise ApiError(400, "invalid_video", f"{param}: the file is empty", param)
    name = _keep(data_dir, ".video", lambda temporary: Path(temporary).write_bytes(upload.data))
    width, height = _frame_size(input_path(data_dir, name))
    if width * height > MAX_VIDEO_PIXELS:
        remove_input(data_dir, name)
        raise ApiError(400, "invalid_video", f"{param}: its frames are {width}x{height}, over 4K (3840x2160 "
                       "pixels); send a smaller video (it is resized to the video size anyway)", param)  # fmt: skip
    try:
        frames = read_input_video(data_dir, name, fps, max_frames)
    except InputError as e:
        remove_input(data_dir, name)
        # PyAV's reason names the file it opened: the client's name, not the server's path, goes back.
        why = str(e).split(" as a video ", 1)[-1].replace(str(input_path(data_dir, name)), upload.filename or "file")
        raise ApiError(400, "invalid_video", f"{param}: cannot decode the file as a picture or a video {why}",
                       param) from None  # fmt: skip
    return name, len(frames)


def _frame_size(path: Path) -> tuple[int, int]:
    """(width, height) of a video file's frames, from its header, without decoding any; (0, 0) for a file
    PyAV cannot open as a video (decoding it then says why)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return 0, 0
            context = container.streams.video[0].codec_context
            return context.width, context.height
    except (av.FFmpegError, OSError, ValueError):
        return 0, 0


def read_input_video(data_dir: str | Path, name: str, fps: float, max_frames: int) -> np.ndarray:
    """The frames of a stored video, sampled at `fps` from its start, at most `max_frames`, upright."""
    from cogvideox.conditioning import load_video

    return load_video(input_path(data_dir, name), max_frames, fps)


def _keep(data_dir: str | Path, suffix: str, write) -> str:
    """A new input file, written by `write(temporary path)` and renamed into place; its name."""
    from cogvideox.serve.errors import ApiError

    name = secrets.token_hex(16) + suffix
    path = input_path(data_dir, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_into_place(path, write)
    except (OSError, InputError) as e:  # the server's folder, not the request: the operator's to mend
        log.error("cannot store an input in %s: %s", path.parent, e)
        raise ApiError(
            500, "internal_error", "the server could not store the file; its operator has the details"
        ) from None
    return name


def remove_input(data_dir: str | Path, name: str | None) -> None:
    """Delete a stored input (nothing when `name` is None or it is gone already)."""
    if name is not None:
        input_path(data_dir, name).unlink(missing_ok=True)

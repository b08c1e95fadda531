"""The first frames image-to-video jobs bring (`input_reference`): decoded when the request comes, so a file
that is no picture is a 400 and never a failed job, then kept in the data folder, as PNG, until the job is
deleted. A worker elsewhere reads it from the same folder, as it writes the videos there."""

from __future__ import annotations

import io
import logging
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from cogvideox.errors import InputError
from cogvideox.files import write_into_place

if TYPE_CHECKING:  # the worker reads stored frames without the web stack
    from cogvideox.serve.body import Upload

log = logging.getLogger("cogvideox.serve")

# Far above any video size (1.5 makes 1360x768), well below what would take a worker's memory: a 40 MP
# photo is 120 MB as RGB.
MAX_PIXELS = 40_000_000
FORMATS = ("PNG", "JPEG", "WEBP")

_NAME = re.compile(r"[0-9a-f]{32}")


def image_path(data_dir: str | Path, name: str) -> Path:
    """Where the first frame `name` (a `store_image` answer) lives."""
    if not _NAME.fullmatch(name):
        raise InputError(f"not a stored first frame: {name!r}")
    return Path(data_dir) / "inputs" / f"{name}.png"


def store_image(upload: Upload, data_dir: str | Path, param: str = "input_reference") -> str:
    """Decode `upload` (PNG, JPEG or WebP, turned upright from its EXIF orientation, in RGB) and keep it;
    its name for `image_path`. ApiError 400 naming `param` for a file that is not such a picture."""
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
                too_big = f"{width}x{height} is over {MAX_PIXELS // 10**6} megapixels"
                raise ApiError(400, "invalid_image", f"{param}: {too_big}; send a smaller picture (it is resized "
                               "to the video anyway)", param)  # fmt: skip
            opened.load()
            picture = load_image(ImageOps.exif_transpose(opened))
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ApiError(400, "invalid_image", f"{param}: cannot decode the file as a picture ({e}); "
                       "send a PNG, JPEG or WebP", param) from None  # fmt: skip
    name = secrets.token_hex(16)
    path = image_path(data_dir, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_into_place(path, lambda temporary: picture.save(temporary, format="PNG"))
    except (OSError, InputError) as e:  # the server's folder, not the request: the operator's to mend
        log.error("cannot store an input image in %s: %s", path.parent, e)
        raise ApiError(
            500, "internal_error", "the server could not store the image; its operator has the details"
        ) from None
    return name


def remove_image(data_dir: str | Path, name: str | None) -> None:
    """Delete a stored first frame (nothing when `name` is None or it is gone already)."""
    if name is not None:
        image_path(data_dir, name).unlink(missing_ok=True)

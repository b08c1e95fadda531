"""Video files: frames -> H.264 MP4 (PyAV: FFmpeg's libraries, no ffmpeg binary needed) or animated GIF
(Pillow), and back."""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
import warnings
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from cogvideox.errors import InputError
from cogvideox.files import parse_json, probe_writable, write_all_into_place, write_into_place, write_or_rescue
from cogvideox.values import is_finite_number

# Visually lossless for these short clips and still a few hundred kB; "medium" is x264's default speed.
# The macroblock tree (x264's lookahead-driven quantiser offsets) is off because with it the same frames
# do not always give the same file: some runs encode a few B/P frames differently (up to ~25/255 per
# pixel after decoding), even with one thread. Without it, equal frames give byte-identical files.
_X264_OPTIONS = {"crf": "18", "preset": "medium", "x264-params": "mbtree=0"}


# The file kinds a video is written as, by the name's suffix: .png is a sequence of numbered frames.
VIDEO_SUFFIXES = (".mp4", ".gif", ".png")
# The frame number in a frame sequence's name, as FFmpeg's image2 names it: %d or %0Nd.
FRAME_NUMBER = re.compile(r"%0?\d*d")

# Float frames may stray this far outside [0, 1] (rounding in whoever made them) and are clipped.
_FLOAT_SLACK = 1e-3


def _from_torch(value):
    """A torch tensor as a numpy array (bf16 and fp16 widened to fp32, from any device); anything else as
    it is. torch is only looked at when the caller has imported it."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        return value
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()


def as_frames(frames: np.ndarray | Sequence) -> np.ndarray:
    """uint8 [F, H, W, 3] from a uint8 array or tensor, a list of [H, W, 3] frames (arrays, tensors or RGB
    pictures), or floats in [0, 1]."""
    frames = _from_torch(frames)
    if not isinstance(frames, np.ndarray):
        if isinstance(frames, str | bytes) or not isinstance(frames, Sequence):
            raise InputError(f"frames must be an array [F, H, W, 3] or a list of [H, W, 3] frames, got {type(frames).__name__}")
        if len(frames) == 0:
            raise InputError("no frames: a video needs at least one")
        try:
            frames = np.stack([np.asarray(_from_torch(f)) for f in frames])
        except ValueError:
            raise InputError("all frames must have the same size") from None
    array = frames
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise InputError(f"expected frames shaped [F, H, W, 3] with F >= 1, got {list(array.shape)}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("the frames hold NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:
            hint = (" (they look like 0..255: pass them as uint8)" if low >= 0 and high <= 255
                    else " (they look like [-1, 1]: map them with x * 0.5 + 0.5)" if low >= -1 and high <= 1
                    else "")  # fmt: skip
            raise InputError(f"float frames must be in [0, 1], got values from {low:g} to {high:g}{hint}")
        # Same rounding as the pipeline's own uint8 frames.
        return (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    raise InputError(f"frames must be uint8 or floats in [0, 1], got {array.dtype}")


# The frame rates a file carries: fractions with a denominator up to 1001 (29.97 is 30000/1001).
MIN_FPS, MAX_FPS = 1 / 1001, 1000


def check_fps(fps) -> Fraction:
    """A frame rate as the exact fraction the file will carry, or `InputError`."""
    if not (isinstance(fps, Fraction) or is_finite_number(fps)) or fps <= 0:
        raise InputError(f"fps must be a finite positive number, got {fps!r}")
    if not MIN_FPS <= fps <= MAX_FPS:
        raise InputError(f"fps must be between 1/1001 and {MAX_FPS}, got {fps!r}")
    return Fraction(fps if isinstance(fps, int | Fraction) else float(fps)).limit_denominator(1001)


def _encoder_name() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "h264"


def check_video_path(path: str | os.PathLike, flag: str = "") -> Path:
    """`path` as a `Path` if a video can be written there, else an `InputError` saying why (`flag`, e.g.
    "--output", starts the message): a name ending in .mp4 or .gif (the suffix says the format), or a
    numbered .png name for a frame sequence (frames/%04d.png), not a folder, in an existing folder this
    process can create files in. Checked before minutes of work."""
    path = _check_video_name(path, flag)
    try:
        probe_writable(path.parent)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def _as_path(path) -> Path:
    """`path` as a `Path`, or `InputError` for anything that is not a file name."""
    if not isinstance(path, str | os.PathLike):
        raise InputError(f"a video path must be a str or a pathlib.Path, got {type(path).__name__}")
    return Path(path)


def _check_video_name(path: str | os.PathLike, flag: str = "") -> Path:
    """`check_video_path` without the write test: the name and its folder."""
    path = _as_path(path)
    what = f"{flag} {path}" if flag else str(path)
    if str(path) == "-":
        raise InputError(f"{what}: a video is written to a file, not to standard output; give a file name such as "
                         "video.mp4")  # fmt: skip
    if path.is_dir():
        raise InputError(f"{what} is a folder; give a file name such as {path / 'video.mp4'}")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        stem = path.stem if path.stem and not path.stem.startswith(".") else "video"
        raise InputError(f"{what}: videos are written as MP4 (H.264), GIF or numbered PNG frames; give a name "
                         f"ending in .mp4 or .gif, such as {stem}.mp4, or one such as frames/%04d.png")
    if path.suffix.lower() == ".png" and not _numbers_frames(path.name):
        raise InputError(f"{what}: a frame sequence needs one frame number in its name, written %04d (or %d), "
                         f"such as {path.parent / '%04d.png'}; write any other % as %%")
    if not path.parent.is_dir():
        raise InputError(f"{flag + ' ' if flag else ''}folder {path.parent} does not exist")
    return path


def export_video(
    frames: np.ndarray | Sequence, path: str | os.PathLike, fps: float = 8, metadata: dict | None = None
) -> Path:
    """Write frames (uint8 [F, H, W, 3] or floats in [0, 1]: an array, a tensor, or a list of [H, W, 3]
    frames or RGB pictures) at `fps` as an H.264 MP4 (yuv420p), as an animated GIF when `path` ends in
    .gif, or as numbered PNG files for a name such as frames/%04d.png (frame i, from 0, in
    frames/0000.png, ...; no frame rate; the frames of an earlier, longer sequence of that name past the
    new one's end are deleted). `metadata` (how the video was made: JSON values) is stored in the file's
    comment (each PNG's), where `read_metadata` finds it.

    The file appears complete or not at all: it is written under a temporary name in the same folder and
    renamed into place (PNG frames: all of them, once every one is written). yuv420p (the pixel format
    every player decodes) needs an even width and height.
    """
    frames = as_frames(frames)
    _, height, width, _ = frames.shape
    path = _check_video_name(path)
    kind = path.suffix.lower()
    if kind == ".mp4" and (height % 2 or width % 2):
        raise InputError(f"H.264 in yuv420p needs an even width and height, got {width}x{height}")
    rate = check_fps(fps)
    comment = None
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InputError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}")
        try:
            comment = json.dumps(metadata, ensure_ascii=False)
        except (TypeError, ValueError) as e:  # an object JSON has no form for, a circular reference
            raise InputError(f"metadata must hold JSON values only: {e}") from None
    if kind == ".png":
        _write_png_sequence(frames, path, comment)
        return path
    if kind == ".gif":
        _check_gif_rate(path, len(frames), rate)
    write = _write_gif if kind == ".gif" else _write_mp4
    return write_into_place(path, lambda file: write(frames, file, rate, comment))


def _check_gif_rate(path: Path, count: int, rate: Fraction) -> None:
    """A frame rate a GIF cannot store is an error (a frame longer than its 16-bit delay); one faster than
    it plays is a warning."""
    longest = max(gif_delays(count, rate))
    if longest > GIF_LONGEST_MS:
        raise InputError(f"a GIF shows one picture for at most {GIF_LONGEST_MS / 1000:g} s, and at {float(rate):g} fps "
                         f"a frame lasts {longest / 1000:g} s; raise the frame rate or write an MP4")  # fmt: skip
    if rate > GIF_MAX_FPS:
        warnings.warn(f"{path} plays at {GIF_MAX_FPS} fps, not {float(rate):g}: a GIF shows each frame for at least "
                      f"{1000 // GIF_MAX_FPS} ms; write an MP4 for a faster rate", stacklevel=3)  # fmt: skip


def _numbers_frames(name: str) -> bool:
    """Whether `name` % i gives each frame its own name: one frame number, and any other % doubled
    (a stray one, as in "100%-%04d.png", is a format error; "%%04d.png" names every frame alike)."""
    if len(FRAME_NUMBER.findall(name)) != 1:
        return False
    try:
        return name % 0 != name % 1
    except (TypeError, ValueError):
        return False


def is_frame_sequence(path: str | os.PathLike) -> bool:
    """Whether `path` names a PNG frame sequence (frames/%04d.png), as `export_video` writes one."""
    path = Path(path)
    return path.suffix.lower() == ".png" and _numbers_frames(path.name)


def video_exists(path: str | os.PathLike) -> bool:
    """Whether there is a video at `path`, to read or that `export_video` would replace: a file, or a frame
    sequence's first frame."""
    path = Path(path)
    return frame_paths(path, 1)[0].is_file() if is_frame_sequence(path) else path.is_file()


def _read_frame_sequence(pattern: Path, max_frames: int) -> list[np.ndarray]:
    """The frames of a PNG sequence from frame 0 up to the first missing number (at most `max_frames`), as
    uint8 [H, W, 3]. A sequence carries no frame rate: its frames are taken as they are."""
    from PIL import Image

    frames = []
    while len(frames) < max_frames and (file := frame_paths(pattern, len(frames) + 1)[-1]).is_file():
        try:
            with Image.open(file) as picture:
                frames.append(np.asarray(picture.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # damaged, or no picture
            raise InputError(f"cannot read frame {file} of {pattern} as a picture ({e})") from None
        if frames[-1].shape != frames[0].shape:
            raise InputError(f"frame {file} of {pattern} is {frames[-1].shape[1]}x{frames[-1].shape[0]}, the "
                             f"first {frames[0].shape[1]}x{frames[0].shape[0]}: a video's frames are one size")
    return frames


def frame_paths(pattern: str | os.PathLike, count: int) -> list[Path]:
    """The files of a `count`-frame sequence named like frames/%04d.png: frames/0000.png, ..."""
    pattern = Path(pattern)
    return [pattern.with_name(pattern.name % i) for i in range(count)]


def _write_png_sequence(frames: np.ndarray, pattern: Path, comment: str | None) -> None:
    from PIL import Image, PngImagePlugin

    info = None
    if comment is not None:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("Comment", comment)  # UTF-8, unlike a plain text chunk

    def write(temporaries: list[str]) -> None:
        for frame, temporary in zip(frames, temporaries):
            Image.fromarray(np.ascontiguousarray(frame), mode="RGB").save(temporary, format="PNG", pnginfo=info)

    write_all_into_place(frame_paths(pattern, len(frames)), write)
    _remove_frames_from(pattern, len(frames))


def _remove_frames_from(pattern: Path, first: int) -> None:
    """Delete the frames numbered `first` on of an earlier, longer sequence of the same name: left there,
    they would play on after the new video's end, as if part of it."""
    number = first
    while (stale := pattern.with_name(pattern.name % number)).is_file():
        stale.unlink()
        number += 1


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata `export_video` stored in a video file; {} for a file without any (or another
    program's comment). A PNG sequence is named by any of its frames or by its pattern (frames/%04d.png).
    `InputError` for a file that is not a readable video."""
    import av

    path = _as_path(path)
    if is_frame_sequence(path):
        path = frame_paths(path, 1)[0]  # the first frame's record is the sequence's
    if not path.is_file():
        raise InputError(f"no video file at {path}")
    try:
        if path.suffix.lower() in (".gif", ".png"):  # a GIF, or one frame of a PNG sequence
            from PIL import Image

            with Image.open(path) as picture:
                comment = picture.info.get("comment", picture.info.get("Comment", b""))
            comment = comment.decode("utf-8", errors="replace") if isinstance(comment, bytes) else str(comment)
        else:
            with av.open(str(path)) as container:
                comment = container.metadata.get("comment", "")
    except (OSError, av.FFmpegError) as e:
        raise InputError(f"cannot read {path} as a video ({decode_failure(e, path)})") from None
    try:
        metadata = parse_json(comment) if comment else {}
    except ValueError:  # another program's comment, or one nested past the parser's stack
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _write_mp4(frames: np.ndarray, file: str, rate: Fraction, comment: str | None = None) -> None:
    import av

    _, height, width, _ = frames.shape
    with av.open(file, mode="w", format="mp4") as container:
        if comment is not None:
            container.metadata["comment"] = comment
        stream = container.add_stream(_encoder_name(), rate=rate, options=dict(_X264_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts = index
            picture.time_base = 1 / rate
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames


# The fastest a GIF plays: each frame is shown for at least 20 ms (see `gif_delays`).
GIF_MAX_FPS = 50
# The longest a GIF shows one picture: its delay is a 16-bit count of hundredths of a second.
GIF_LONGEST_MS = 655_350


def gif_delays(count: int, rate: Fraction) -> list[int]:
    """Each frame's display time in ms for a GIF at `rate` frames/s. A GIF counts in hundredths of a
    second, so 8 fps (12.5 each) alternates 120 and 130 ms: frame i starts at i / rate to the nearest
    hundredth, and the whole lasts count / rate (to it) rather than drifting 4% short. At least 20 ms
    each: browsers play shorter delays at 100 ms."""
    starts = [round(Fraction(100 * i) / rate) for i in range(count + 1)]
    return [10 * max(100 // GIF_MAX_FPS, b - a) for a, b in zip(starts, starts[1:])]


def gif_palette(frame: np.ndarray):
    """A uint8 [H, W, 3] frame as the 256-colour palette image a GIF stores (a PIL image)."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(frame), mode="RGB")
    return picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def _write_gif(frames: np.ndarray, file: str, rate: Fraction, comment: str | None = None) -> None:
    # Each frame gets its own 256-colour palette by median cut, undithered: on the demo model's videos
    # 0.08/255 from the frames on average (dithering would add noise to flat backgrounds). Identical
    # neighbours are merged by Pillow into one longer frame, which plays the same.
    pictures = [gif_palette(frame) for frame in frames]
    extra = {} if comment is None else {"comment": comment.encode("utf-8")}
    try:
        pictures[0].save(file, format="GIF", save_all=True, append_images=pictures[1:],
                         duration=gif_delays(len(frames), rate), loop=0, **extra)  # fmt: skip
    except OverflowError:  # Pillow's merged picture of identical frames lasts past the 16-bit delay
        raise InputError(f"the video stays on one picture for more than {GIF_LONGEST_MS / 1000:g} s at "
                         f"{float(rate):g} fps, longer than a GIF can show one; raise the frame rate or write an "
                         "MP4") from None  # fmt: skip


def export_or_rescue(
    frames: np.ndarray | Sequence, path: str | os.PathLike, fps: float = 8, metadata: dict | None = None
) -> Path:
    """`export_video`, but if the folder stopped taking files since it was checked (a full disk, a lost
    mount), write the video to the temporary folder instead and raise `InputError` saying where, rather
    than lose minutes of generation."""
    return write_or_rescue(Path(path), lambda target: export_video(frames, target, fps=fps, metadata=metadata), "video")


def decode_failure(e: Exception, path: str | os.PathLike) -> str:
    """Why `path` could not be decoded, from PyAV's (or PIL's) error, on one line: without the path, which
    the caller's message names, and without FFmpeg's error number ("[Errno 1094995529] Invalid data ...")."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(e).replace(f": '{path}'", "").replace(str(path), "the file"))
    return " ".join(text.split()) or type(e).__name__


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """The frames of a video file as uint8 [F, H, W, 3] (all of them, or the first `max_frames`: a long
    video decoded whole may not fit in memory), upright, and its frame rate (0.0 when unknown, as for a
    PNG frame sequence named like frames/%04d.png). `InputError` for a file that is missing or cannot be
    decoded."""
    import av

    path = _as_path(path)
    if max_frames is not None and (not isinstance(max_frames, numbers.Integral) or isinstance(max_frames, bool)
                                   or max_frames < 1):  # fmt: skip
        raise InputError(f"max_frames must be a positive integer (or None for every frame), got {max_frames!r}")
    if not video_exists(path):
        raise InputError(f"no video file at {path}")
    try:
        frames, rate = _decode(path, None, max_frames or 2**31)
    except _NoVideoStream:
        raise InputError(f"{path} has no video stream") from None
    except av.FFmpegError as e:  # a damaged file, or one that is not a video
        raise InputError(f"cannot decode {path} as a video ({decode_failure(e, path)})") from None
    if not frames:
        raise InputError(f"{path} holds no video frames")
    return np.stack(frames), rate or 0.0


def frame_rate(path: str | os.PathLike) -> float | None:
    """A video file's frame rate as its header gives it (nothing is decoded), or None when it gives none.
    `InputError` for a file that is missing or not a video."""
    import av

    path = _as_path(path)
    if not video_exists(path):
        raise InputError(f"no video file at {path}")
    if is_frame_sequence(path):
        return None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            return _stream_rate(container.streams.video[0])
    except av.FFmpegError as e:
        raise InputError(f"cannot decode {path} as a video ({decode_failure(e, path)})") from None


def _stream_rate(stream) -> float | None:
    """A video stream's frame rate as its header gives it, or None when it gives none."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _upright(frame) -> np.ndarray:
    """A decoded frame as uint8 [H, W, 3], turned as players show it: a phone video is stored sideways
    with a display-matrix rotation (counterclockwise degrees), and its aspect ratio is the turned one."""
    image = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


class _NoVideoStream(ValueError):
    def __init__(self) -> None:
        super().__init__("no video stream")


def read_frames(path: str | Path, fps: float | None, max_frames: int) -> np.ndarray:
    """Up to `max_frames` frames from the start of a video, resampled to `fps` (None: every frame), as
    uint8 [T, H, W, 3], upright (a rotation flag is applied). Each target time takes the frame nearest
    to it, by the frames' timestamps, so a variable frame rate keeps its timing. Decoding stops once
    enough frames are in. Raises whatever PyAV raises for a damaged file, and ValueError for a file
    without a video stream or frames."""
    frames, _ = _decode(path, fps, max_frames)
    if not frames:
        raise ValueError("no frames")
    return np.stack(frames)


def sample_frames(path: str | Path, count: int) -> np.ndarray:
    """`count` frames spread evenly over a whole video, from its first, as uint8 [count, H, W, 3], upright:
    what it shows, from start to end (a captioner's view). A video of unknown length gives its first
    `count` frames. Errors as `read_frames`."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise _NoVideoStream()
        stream = container.streams.video[0]
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / av.time_base
        else:
            rate = stream.average_rate
            seconds = stream.frames / float(rate) if stream.frames and rate else 0.0
    return read_frames(path, count / seconds if seconds > 0 else None, count)


def _decode(path: str | Path, fps: float | None, max_frames: int) -> tuple[list[np.ndarray], float | None]:
    """`read_frames`' frames as a list (empty for a video without any), and the stream's frame rate (None
    for a PNG frame sequence, whose frames are all taken)."""
    import av

    if is_frame_sequence(path):
        return _read_frame_sequence(Path(path), max_frames), None
    frames: list[np.ndarray] = []

    def take(frame, until: float) -> None:
        """`frame` for every target time up to `until` (repeated when the target rate is higher)."""
        nonlocal next_time
        keep = 0
        while next_time <= until + 1e-9 and len(frames) + keep < max_frames:
            keep += 1
            next_time = (len(frames) + keep) / fps
        if keep:
            frames.extend([_upright(frame)] * keep)

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise _NoVideoStream()
        stream = container.streams.video[0]
        source_fps = _stream_rate(stream)
        every = fps is None or source_fps is None
        if every:
            fps, step = 1.0, 1.0  # every frame: frame i at time i, target i at time i
        else:
            step = source_fps
        next_time = 0.0  # the time of the next frame to keep, at the target rate
        start, t = None, -math.inf
        previous = None  # (frame, time): its share of the target times is known at the next frame
        for frame in container.decode(stream):
            # Times from the timestamps, counted from the first frame's (containers often offset
            # them, and a clip is sampled from its own first frame); a frame without one, or one
            # that goes back, follows the previous one by the stream's average period.
            if start is None and frame.time is not None and not every:
                start = frame.time
            stamp = None if frame.time is None or start is None else frame.time - start
            t = stamp if stamp is not None and stamp > t else max(t + 1 / step, 0.0)
            if previous is not None:
                take(previous[0], (previous[1] + t) / 2)  # the targets nearer to it than to this one
            previous = (frame, t)
            if len(frames) >= max_frames:
                break
        if previous is not None and len(frames) < max_frames:
            take(previous[0], previous[1] + 0.5 / step)
    return frames[:max_frames], source_fps

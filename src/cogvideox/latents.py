"""Latent videos on disk: what `generate --output name.safetensors` and `cogvideox encode` write, and
`cogvideox decode` turns into a video.

One safetensors file per video: the tensor `latents` [F, C, h, w] as the transformer sees them (scaled by
the VAE's scaling factor, without CogVideoX 1.5's padding frame), kept in the dtype they were made in so
that decoding them gives the direct run's video exactly. Its metadata says which model made them, the
frame rate of the video they stand for, how they were made ("generate" or "encode"), and for generated
latents the same provenance record the video file would have held (`cogvideox info` reads it from either).

The official demo's `only_save_latents` did this with `torch.save`; a safetensors file loads without
running code from the file.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cogvideox import inversion
from cogvideox.errors import InputError
from cogvideox.files import probe_writable, write_into_place
from cogvideox.values import is_finite_number

FORMAT = "cogvideox-latents"
SUFFIX = ".safetensors"
MADE_BY = ("generate", "encode")


@dataclass
class LatentVideo:
    """One video's latents and what they need to be decoded and described.

    latents: [F, C, h, w], scaled as the transformer denoises them; model: the folder or hub id of the
    model (None: the embedded demo model); fps: the frame rate of the decoded video; made_by: "generate"
    or "encode"; record: the provenance record of a generated video (`provenance.record`), else None;
    source: the video file `encode` read, else None.
    """

    latents: torch.Tensor
    model: str | None
    fps: float
    made_by: str = "generate"
    record: dict | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.made_by not in MADE_BY:
            raise InputError(f"made_by must be one of {', '.join(MADE_BY)}, got {self.made_by!r}")
        if not isinstance(self.latents, torch.Tensor) or self.latents.ndim != 4:
            got = list(self.latents.shape) if isinstance(self.latents, torch.Tensor) else type(self.latents).__name__
            raise InputError(f"latents must be one video's tensor [frames, channels, height, width], got {got}")
        if not self.latents.is_floating_point():
            raise InputError(f"latents must be floating-point, got {self.latents.dtype}")
        for key, kind in {"model": str, "record": dict, "source": str}.items():
            value = getattr(self, key)
            if value is not None and not isinstance(value, kind):
                raise InputError(f"{key} must be a {kind.__name__} or None, got {value!r}")
        if not is_finite_number(self.fps) or self.fps <= 0:
            raise InputError(f"fps must be a positive number, got {self.fps!r}")

    @property
    def num_frames(self) -> int:
        """Frames of the decoded video: 4(F-1)+1 for the released models."""
        return 4 * (self.latents.shape[0] - 1) + 1

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file whole or not at all (a reader never sees half of it); `path` is a .safetensors name
        in a folder that exists (`InputError` otherwise)."""
        path = check_latents_path(_given_path(path), flag="path")
        fields = dict(model=self.model, fps=self.fps, made_by=self.made_by, record=self.record, source=self.source)
        metadata = {"format": FORMAT, "video": json.dumps(fields, ensure_ascii=False)}
        tensors = {"latents": self.latents.detach().cpu().contiguous()}
        return write_into_place(Path(path), lambda temporary: save_file(tensors, temporary, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentVideo:
        """Read a file written by `save`; `InputError` saying what the file is when it is not one."""
        path = _given_path(path)
        if not path.is_file():
            raise InputError(f"no latents file at {path}")
        if not is_latents_path(path):
            raise InputError(f"{path} is not a latents file: those are .safetensors files written by cogvideox "
                             "generate --output NAME.safetensors or by cogvideox encode")  # fmt: skip
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") == inversion.FORMAT:
                    raise InputError(f"{path} holds inverted noise (cogvideox invert); sample it with "
                                     "cogvideox regenerate, which denoises before decoding")  # fmt: skip
                if metadata.get("format") != FORMAT or "latents" not in f.keys():
                    raise InputError(f"{path} holds no latent video (files written by cogvideox generate "
                                     "--output NAME.safetensors or by cogvideox encode)")  # fmt: skip
                latents = f.get_tensor("latents")
            fields = json.loads(metadata["video"])
            return cls(latents=latents, **_checked_fields(path, fields))
        except InputError:
            raise
        except Exception as e:  # a damaged file or foreign metadata; RecursionError for "[[[[..." included
            raise InputError(f"cannot read {path} as latents: {' '.join(str(e).split())}") from None


def _checked_fields(path: Path, fields) -> dict:
    """The `video` metadata of a latents file, each field of the type `LatentVideo` holds; `InputError`
    naming the first that is not (a damaged or edited file: a traceback later, in decode or info)."""
    damaged = f"cannot read {path} as latents: its metadata is damaged"
    if not isinstance(fields, dict):
        raise InputError(f"{damaged} (a JSON {type(fields).__name__}, not an object)")
    for key, kind in {"model": str, "record": dict, "source": str}.items():
        if fields.get(key) is not None and not isinstance(fields[key], kind):
            raise InputError(f"{damaged} ({key} is {fields[key]!r}, not a {kind.__name__})")
    if fields.get("made_by", MADE_BY[0]) not in MADE_BY:
        raise InputError(f"{damaged} (made_by is {fields['made_by']!r}, not one of {', '.join(MADE_BY)})")
    fps = fields.get("fps")
    if not is_finite_number(fps) or fps <= 0:
        raise InputError(f"{damaged} (fps is {fps!r}, not a positive number)")
    return fields


def _holds_inversion(path: str | os.PathLike) -> bool:
    """Whether `path` is a safetensors file of `cogvideox invert` (read from its header alone)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == inversion.FORMAT
    except Exception:  # not a safetensors file: `LatentVideo.load` says what it is
        return False


def describe_unrecorded(path: str | os.PathLike) -> str:
    """What `cogvideox info` says of a latents file without a generation record: encoded latents, or the
    noise of a DDIM inversion."""
    if _holds_inversion(path):
        inverted = inversion.Inversion.load(path)
        return (f"{path}: noise of a DDIM inversion (cogvideox invert) of {inverted.num_frames} frames at "
                f"{inverted.width}x{inverted.height} in {inverted.num_inference_steps} steps, prompt "
                f"{inverted.prompt!r}; sample it with: cogvideox regenerate {shlex.quote(str(path))}")  # fmt: skip
    latent = LatentVideo.load(path)
    if latent.made_by == "encode":
        return f"{path}: latents of {latent.source or 'a video'} made by cogvideox encode (no generation to record)"
    return f"{path}: latents without a cogvideox record"


def read_record(path: str | os.PathLike) -> dict:
    """The provenance record kept in a latents file ({} for encoded latents and inversions), for
    `cogvideox info`."""
    if _holds_inversion(path):
        return {}
    return LatentVideo.load(path).record or {}


def is_latents_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == SUFFIX


def _given_path(path) -> Path:
    """A file name given to `save` or `load` as a `Path`; `InputError` for no name (None, "", a number)."""
    if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)).strip():
        raise InputError(f"path must be a file name (a str or os.PathLike), got {path!r}")
    return Path(path)


def check_latents_path(path: str | os.PathLike, flag: str = "--output") -> Path:
    """`path` as a `Path` if a latents file can be written there, else an `InputError` saying why; checked
    before minutes of work."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file name such as {path / 'latents.safetensors'}")
    if not is_latents_path(path):
        stem = path.stem if path.stem and not path.stem.startswith(".") else "latents"
        raise InputError(f"{flag} {path}: the latents are written as safetensors; give a name such as {stem}{SUFFIX}")
    if not path.parent.is_dir():
        raise InputError(f"{flag} folder {path.parent} does not exist")
    try:
        probe_writable(path.parent)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    return path

"""What the served model can make, read from its configs alone, so the API can refuse a request it cannot
serve before it is queued, on a machine that never loads the weights (an API server in front of GPU workers).

The worker's `Pipeline.check_request` stays the final word; this only keeps impossible jobs off the queue.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from cogvideox import loading
from cogvideox.errors import InputError
from cogvideox.models.config import TransformerConfig, VAEConfig
from cogvideox.request import size_step

# CogVideoX 1.5's config sample size is the upper bound of its RoPE table; the official demos generate at
# 1360x768 (the same cap `Pipeline.default_size` applies).
_V15_NATIVE = (768, 1360)  # (height, width)

_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


def parse_size(text: str) -> tuple[int, int]:
    """ "WIDTHxHEIGHT" (OpenAI's order: "720x480" is 720 wide) -> (width, height)."""
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise InputError(f"size must look like WIDTHxHEIGHT, such as 720x480; got {text!r}")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class ModelSpec:
    """The served model's name and the videos it makes.

    sizes: "WxH" strings the service accepts, the native one first.
    num_frames: the frame count the model was trained at, the longest the service makes.
    frame_step: frame counts are frame_step * k + 1 (the VAE's temporal compression, twice: see
        `Pipeline.check_request`).
    image_to_video: every video starts from an uploaded first frame (`input_reference`).
    riflex: the model has rotary positions and no learned table, so a request may ask for RIFLEx and up
        to twice the trained length (RIFLEx's tested reach).
    one_length: a learned position table (5B-I2V) makes `num_frames` frames and no other count.
    loras: the names of the LoRAs a request may run (`serve --lora NAME=PATH`).
    """

    name: str
    sizes: tuple[str, ...]
    num_frames: int
    fps: int
    frame_step: int
    version: str
    guidance_scale: float = 6.0  # the model's recommended scale (its sampling.json), used when a request has none
    num_inference_steps: int = 50  # the Pipeline's default, for a request without one (capped at --max-steps)
    image_to_video: bool = False
    riflex: bool = False
    one_length: bool = False
    loras: tuple[str, ...] = ()

    @property
    def native_size(self) -> str:
        return self.sizes[0]

    @classmethod
    def from_folder(
        cls, folder: str | Path, name: str, extra_sizes: tuple[str, ...] = (), loras: tuple[str, ...] = ()
    ) -> ModelSpec:
        folder = Path(folder)
        transformer = TransformerConfig.from_json(folder / "transformer" / "config.json")
        vae = VAEConfig.from_json(folder / "vae" / "config.json")
        compression = vae.spatial_compression
        height, width = transformer.sample_height * compression, transformer.sample_width * compression
        if transformer.version == "1.5":
            height, width = min(height, _V15_NATIVE[0]), min(width, _V15_NATIVE[1])
        sizes = [f"{width}x{height}"]
        multiple = size_step(transformer, vae)
        for size in extra_sizes:
            w, h = parse_size(size)
            if w % multiple or h % multiple or w < multiple or h < multiple:
                raise InputError(f"size {size}: width and height must be positive multiples of {multiple}")
            if transformer.use_learned_positional_embeddings:
                raise InputError(f"size {size}: this model has a learned position table and makes {sizes[0]} only")
            if transformer.version == "1.5":
                max_h, max_w = transformer.sample_height * compression, transformer.sample_width * compression
                if h > max_h or w > max_w:
                    raise InputError(f"size {size}: this model makes at most {max_w}x{max_h}")
            if f"{w}x{h}" not in sizes:
                sizes.append(f"{w}x{h}")
        return cls(
            name=name,
            sizes=tuple(sizes),
            num_frames=transformer.sample_frames,
            fps=16 if transformer.version == "1.5" else 8,
            frame_step=2 * vae.temporal_compression,
            version=transformer.version,
            guidance_scale=loading.read_sampling_defaults(folder)["guidance_scale"],
            image_to_video=transformer.is_image_to_video,
            riflex=transformer.use_rotary_positional_embeddings and not transformer.use_learned_positional_embeddings,
            one_length=transformer.use_learned_positional_embeddings,
            loras=tuple(loras),
        )

    @classmethod
    def load(
        cls, model: str | None, name: str | None = None, extra_sizes: tuple[str, ...] = (), loras: tuple[str, ...] = (),
        variant: str | None = None,
    ) -> ModelSpec:
        """The spec of a `--model` value (folder, hub repo id, or None for the demo model) whose weights
        are read in `variant`."""
        folder = loading.resolve_model_dir(model, variant=variant)
        loading.check_model_dir(folder, variant=variant)
        return cls.from_folder(folder, name or default_model_name(model), extra_sizes, loras)

    @property
    def max_seconds(self) -> float:
        return self.num_frames / self.fps

    @property
    def riflex_frames(self) -> int | None:
        """The most frames a request with RIFLEx may ask for (twice the trained length), None without it."""
        return 2 * (self.num_frames - 1) + 1 if self.riflex else None

    @property
    def riflex_max_seconds(self) -> float | None:
        return self.riflex_frames / self.fps if self.riflex else None

    def frames_for(self, seconds: float | None, fps: float, riflex: bool = False) -> int:
        """The frame count of a clip of about `seconds` at `fps` (the model's own length when None); with
        `riflex`, up to `riflex_frames`."""
        if seconds is None:
            return self.num_frames
        steps = seconds * fps / self.frame_step  # inf for 1e308 s: refused below as too long
        frames = self.frame_step * max(1, round(steps)) + 1 if math.isfinite(steps) else math.inf
        if self.one_length and frames != self.num_frames:
            raise InputError(
                f"seconds: this model makes {self.num_frames} frames only ({self.num_frames / fps:g} s at {fps:g} fps; "
                f"its positions are a learned table); got {seconds:g}"
            )
        longest = self.riflex_frames if riflex else self.num_frames
        if frames > longest:
            hint = ""
            if self.riflex and not riflex and frames <= self.riflex_frames:
                hint = f", or up to {self.riflex_frames} frames with riflex: true"
            raise InputError(
                f"seconds: this model makes at most {longest} frames ({longest / fps:g} s at {fps:g} fps{hint}); "
                f"got {seconds:g}"
            )
        return frames

    def video_frames(self, frames: int, available: int, seconds: float | None) -> int:
        """The frames of a redrawn video (video-to-video): the `frames` its `seconds` asked for, when the
        video gives them at the request's frame rate; without `seconds`, the video's longest prefix of a
        length the model makes, at most `frames`. `InputError` for a video too short."""
        if seconds is not None:
            if frames > available:
                raise InputError(
                    f"seconds: the video gives {available} frames at this frame rate, fewer than the {frames} of "
                    f"{seconds:g} s; ask for fewer seconds"
                )
            return frames
        longest = (available - 1) // self.frame_step * self.frame_step + 1
        if longest < self.frame_step + 1:
            raise InputError(
                f"seconds: the video gives {available} frames at this frame rate; video-to-video needs at least "
                f"{self.frame_step + 1}"
            )
        return min(longest, frames)


def default_model_name(model: str | None) -> str:
    """The name clients use in `model`: the folder's or repo's last part ("CogVideoX-2b"); the demo's is
    "cogvideox-demo"."""
    if model is None:
        return "cogvideox-demo"
    return Path(str(model).rstrip("/")).name or str(model)

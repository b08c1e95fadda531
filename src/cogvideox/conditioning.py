"""What a generation starts from besides noise: a first frame (image-to-video) or a whole video (video-to-video).

Both go through the VAE encoder and a draw from its posterior, in the reference's order, so a seed gives
the reference's video:

- image-to-video (5B-I2V, 1.5-5B-I2V): the image is resized to the video size, encoded as a one-frame
  video, and its latent is the first of F latent frames (zeros after it), joined to the noisy latents on
  the channel axis at every step. The posterior draw comes BEFORE the noise draw.
- video-to-video: the video's latents are noised to the first timestep of a schedule cut by `strength`,
  and denoising runs from there. The posterior draw comes before the noise draw here too.

Images and frames are resized with PIL's Lanczos filter, as the reference's image processor does for
PIL images (given a numpy array or a tensor, the reference interpolates instead, so only PIL inputs are
resized exactly as there):
"stretch" (the reference's rule, the default) resizes to the target size whatever the aspect ratio;
"crop" keeps the aspect ratio, cutting the largest centred region of the target's shape out of the
source before resizing it ("cover", nothing is stretched, the edges are lost).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cogvideox.errors import InputError
from cogvideox.request import RESIZE_MODES
from cogvideox.schedulers import randn

Generator = torch.Generator | list[torch.Generator]

# The 1.5 image-to-video model was trained with this "ofs" value; the reference passes it at inference.
OFS = 2.0


# ---------------------------------------------------------------------------------------------------
# Reading and resizing pictures


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise InputError(
            "image-to-video and video-to-video need Pillow to resize pictures: pip install pillow"
        ) from None
    return Image, ImageOps


def load_image(image):
    """An RGB PIL image from a file path, a PIL image, or an array: uint8 [H, W, 3] (or [H, W]), or floats
    in [0, 1] [H, W, 3].

    A file is decoded, turned upright from its EXIF orientation and converted to RGB, as the reference's
    `load_image` does. Anything that cannot be decoded raises `InputError`.
    """
    Image, ImageOps = _pil()
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"no image file at {path}")
        try:
            with Image.open(path) as opened:
                opened.load()
                picture = ImageOps.exif_transpose(opened)
                return _to_rgb(picture)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"cannot decode {path} as an image ({e}); give a PNG, JPEG or WebP file") from None
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if np.issubdtype(array.dtype, np.floating) and array.ndim == 3 and array.shape[-1] == 3:
            from cogvideox.video import as_frames

            array = as_frames(array[None])[0]  # floats in [0, 1], as video frames may be
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
            raise InputError(
                f"an image array must be uint8 [H, W, 3] (or [H, W]) or floats in [0, 1] [H, W, 3], "
                f"got {array.dtype} {list(array.shape)}"
            )
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    raise InputError(f"image must be a file path, a PIL image or a uint8 array, got {type(image).__name__}")


def _to_rgb(picture):
    """A PIL image in RGB. 16-bit grayscale (PIL's "I;16" modes: 16-bit PNGs and TIFFs) is brought to 8 bits
    first: PIL's own conversion clips its values at 255 instead of scaling them, which turns nearly every
    pixel white."""
    if picture.mode.startswith("I;16"):
        Image, _ = _pil()
        high_bytes = (np.asarray(picture).astype(np.uint16) >> 8).astype(np.uint8)
        picture = Image.fromarray(high_bytes)
    if picture.mode in ("I", "F"):
        # 32-bit integers or floats, of no set range: PIL clips them at 0 and 255, which makes a float
        # picture in [0, 1] black and most 32-bit ones white. Taken as they are only when already 0..255.
        low, high = picture.getextrema()
        if picture.mode == "F" or low < 0 or high > 255:
            kind = "floating-point" if picture.mode == "F" else "32-bit integer"
            raise InputError(f"a {kind} image (PIL mode {picture.mode}, values {low:g} to {high:g}) has no "
                             "colour range to read: give it as 8-bit RGB (a uint8 array [H, W, 3], or floats "
                             "in [0, 1] as an array)")  # fmt: skip
    return picture.convert("RGB")


def resize(picture, height: int, width: int, mode: str = "stretch"):
    """A PIL image resized to width x height with Lanczos: "stretch" (the reference) or "crop" (cover)."""
    if mode not in RESIZE_MODES:
        raise InputError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    Image, _ = _pil()
    if picture.width < 1 or picture.height < 1:
        raise InputError(f"the image is empty ({picture.width}x{picture.height})")
    box = None
    if mode == "crop":
        # The largest centred box of the target's aspect ratio; PIL resamples straight from it.
        scale = min(picture.width / width, picture.height / height)
        w, h = width * scale, height * scale
        left, top = (picture.width - w) / 2, (picture.height - h) / 2
        box = (left, top, left + w, top + h)
    return picture.resize((width, height), resample=Image.LANCZOS, box=box)


def to_model_range(picture) -> torch.Tensor:
    """PIL image -> float32 [3, H, W] in [-1, 1] (x / 255 * 2 - 1, in float32 as the reference)."""
    array = np.asarray(picture, dtype=np.uint8).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


def prepare_image(image, height: int, width: int, mode: str = "stretch") -> torch.Tensor:
    """An image (see `load_image`) -> float32 [1, 3, 1, H, W] in [-1, 1]: a one-frame video for the VAE."""
    picture = resize(load_image(image), height, width, mode)
    return to_model_range(picture)[None, :, None]


def load_video(video, max_frames: int | None = None, fps: float | None = None) -> np.ndarray:
    """uint8 frames [T, H, W, 3] from a video file path (or a PNG frame sequence's, frames/%04d.png), a
    uint8 array or tensor (floats in [0, 1] too), or a list of frames (arrays, tensors or PIL images). A
    file's frames are turned upright (a phone's rotation flag), sampled at `fps` from its start when given
    (None, or a sequence, which has no frame rate: every frame as stored), and only the first `max_frames`
    are decoded when given (see `request.frames_to_read`). A file that cannot be decoded raises
    `InputError`."""
    from cogvideox.video import as_frames, decode_failure, read_frames, video_exists

    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if not video_exists(path):
            raise InputError(f"no video file at {path}")
        try:
            return read_frames(path, fps, max_frames or 2**31)
        except InputError:  # a frame sequence's, which says what is wrong
            raise
        except Exception as e:  # PyAV raises its own error types for damaged or foreign files
            raise InputError(f"cannot decode {path} as a video ({decode_failure(e, path)})") from None
    if isinstance(video, Sequence) and video and not isinstance(video[0], np.ndarray):
        Image, _ = _pil()
        video = [np.asarray(_to_rgb(f)) if isinstance(f, Image.Image) else f for f in video]
    return as_frames(video)


def resize_frames(frames: np.ndarray, height: int, width: int, mode: str = "stretch") -> np.ndarray:
    """uint8 frames [T, h, w, 3] -> uint8 [T, H, W, 3], each frame resized as an image."""
    Image, _ = _pil()
    return np.stack([np.asarray(resize(Image.fromarray(frame), height, width, mode)) for frame in frames])


def prepare_video(frames: np.ndarray, height: int, width: int, mode: str = "stretch") -> torch.Tensor:
    """uint8 frames [T, h, w, 3] -> float32 [1, 3, T, H, W] in [-1, 1], each frame resized as an image."""
    resized = torch.from_numpy(resize_frames(frames, height, width, mode)).float() / 255.0  # [T, H, W, 3]
    return (resized * 2.0 - 1.0).permute(3, 0, 1, 2)[None]  # [1, 3, T, H, W]


# ---------------------------------------------------------------------------------------------------
# Latents


def _posterior_samples(vae, pixels: torch.Tensor, generator: Generator, batch_size: int) -> torch.Tensor:
    """Encode `pixels` [1, 3, T, H, W] once and draw one posterior sample per video: [B, C, F, h, w].

    The reference encodes each video of the batch separately and samples right after, with generator i
    for video i (or the one generator, in turn); encoding is deterministic, so one encode and B draws
    give the same numbers.
    """
    posterior = vae.encode(pixels)
    generators = generator if isinstance(generator, list) else [generator]
    if len(generators) == 1:
        generators = generators * batch_size  # one generator draws for every video in turn
    return torch.cat([posterior.sample(g) for g in generators])


def image_latents(
    vae,
    image: torch.Tensor,
    generator: Generator,
    batch_size: int,
    latent_frames: int,
    dtype: torch.dtype,
    last: torch.Tensor | None = None,
) -> torch.Tensor:
    """The image-to-video conditioning [B, F, C, h, w]: the image's latent, then zeros.

    `image` is [1, 3, 1, H, W] in the pipeline dtype; F counts the 1.5 padding frame too (the image latent
    sits at frame 0, which decoding drops, exactly as the reference does). CogVideoX 1.0 scales by the
    VAE's scaling factor; the 1.5 models were trained with the latent divided by it instead
    (`invert_scale_latents` in their VAE config).

    `last`, a second picture like `image`, takes the last latent frame instead of zeros: the keyframe
    conditioning of CogVideoX-Interpolation (a 5B-I2V fine-tuned on first and last frames), drawn as its
    pipeline draws it, every video's first-frame sample, then every last-frame sample, then the noise.
    """
    scaling = vae.config.scaling_factor

    def latent_of(picture: torch.Tensor) -> torch.Tensor:  # [B, 1, C, h, w]
        sample = _posterior_samples(vae, picture, generator, batch_size).to(dtype).permute(0, 2, 1, 3, 4)
        return (1 / scaling) * sample if vae.config.invert_scale_latents else scaling * sample

    first = latent_of(image)
    ends = [latent_of(last)] if last is not None else []
    middle = latent_frames - 1 - len(ends)
    rest = torch.zeros((batch_size, middle, *first.shape[2:]), device=first.device, dtype=dtype)
    return torch.cat([first, rest, *ends], dim=1)


def video_latents(
    vae, video: torch.Tensor, generator: Generator, batch_size: int, dtype: torch.dtype, padding_frames: int = 0
) -> torch.Tensor:
    """The clean latents [B, F, C, h, w] of `video` [1, 3, T, H, W] (pipeline dtype), scaled as the
    transformer sees them. `padding_frames` copies of the first latent frame go in front (1.5 with an odd
    latent count; the 1.5 models saw the first latent frame doubled in training)."""
    latents = _posterior_samples(vae, video, generator, batch_size).to(dtype)  # [B, C, F, h, w]
    latents = vae.config.scaling_factor * latents.permute(0, 2, 1, 3, 4)
    if padding_frames:
        latents = torch.cat([latents[:, :1].expand(-1, padding_frames, -1, -1, -1), latents], dim=1)
    return latents


def noised_video_latents(
    clean: torch.Tensor, scheduler, timestep: torch.Tensor, generator: Generator
) -> torch.Tensor:
    """The start of video-to-video: the clean latents taken forward to `timestep` with fresh noise."""
    noise = randn(clean.shape, generator, device=clean.device, dtype=clean.dtype)
    return scheduler.add_noise(clean, noise, timestep.expand(clean.shape[0]))


def strength_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a schedule that video-to-video runs: the last int(n * strength) timesteps.

    The DDIM stride still follows the full schedule (50 steps at strength 0.8 run 40, from t = 799).
    """
    n = len(timesteps)
    run = min(int(n * strength), n)
    return timesteps[n - run :]


class ImageConditioned:
    """The transformer of an image-to-video model, seen by the sampler as a plain denoiser.

    Each call joins the image latents [B, F, C, h, w] to the noisy latents on the channel axis (repeated
    for the unconditional half under guidance) and passes `ofs` to the 1.5 model.
    """

    def __init__(self, transformer, image_latents: torch.Tensor) -> None:
        self.transformer = transformer
        self.image_latents = image_latents
        self.ofs = None
        if transformer.config.ofs_embed_dim:
            self.ofs = torch.full((1,), OFS, device=image_latents.device, dtype=image_latents.dtype)

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states, timestep, image_rotary_emb=None):
        condition = self.image_latents
        repeats = hidden_states.shape[0] // condition.shape[0]
        if repeats > 1:
            condition = torch.cat([condition] * repeats)  # [uncond ; cond] halves share the image
        model_input = torch.cat([hidden_states, condition], dim=2)  # [B, F, 2C, h, w]
        return self.transformer(
            model_input, encoder_hidden_states, timestep, ofs=self.ofs, image_rotary_emb=image_rotary_emb
        )

"""What a CogVideoX model can generate, decided from its configs alone, before any heavy work.

`check_request` turns the arguments of a generation call into a `GenerationRequest` (defaults filled in
from the model) or raises `InputError` saying what to change. It needs no weights, so a server can reject
a request before queueing it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cogvideox.errors import InputError
from cogvideox.models.config import TransformerConfig, VAEConfig

DYNAMIC_CFG_VARIANTS = ("reference", "smooth")

# What a generation starts from: noise only, a first frame, or a whole video.
TASKS = ("text", "image", "video")
# How a picture is brought to the video size (see cogvideox.conditioning): the reference's plain resize,
# or a centred crop to the target's aspect ratio, then a resize ("cover").
RESIZE_MODES = ("stretch", "crop")
DEFAULT_STRENGTH = 0.8  # video-to-video, the reference's default
I2V_MODELS = "THUDM/CogVideoX-5b-I2V or THUDM/CogVideoX1.5-5B-I2V"

# CogVideoX 1.5 was trained at 768x1360; its config's sample size (300x300 patches) is the RoPE table's
# upper bound, not a size to generate at (the reference would default to 2400x2400).
V15_DEFAULT_SIZE = (768, 1360)


@dataclass(frozen=True)
class GenerationRequest:
    """A checked generation request, every default resolved."""

    prompts: list[str]
    negative_prompts: list[str]
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    use_dynamic_cfg: bool
    dynamic_cfg: str
    videos_per_prompt: int
    max_sequence_length: int
    latent_frames: int  # including the 1.5 padding frames
    padding_frames: int  # extra latent frames at the front (1.5), dropped before decoding
    task: str = "text"  # "text", "image" (first frame given) or "video" (video-to-video)
    strength: float | None = None  # video-to-video: the fraction of the schedule that runs
    resize: str = "stretch"  # how the image or video frames are brought to height x width
    riflex: bool = False  # RIFLEx's slowed temporal RoPE frequency, for videos longer than the model's

    @property
    def batch_size(self) -> int:
        return len(self.prompts) * self.videos_per_prompt

    @property
    def denoising_steps(self) -> int:
        return denoising_steps(self.num_inference_steps, self.strength)

    @property
    def use_guidance(self) -> bool:
        """Classifier-free guidance runs only for scales above 1, as in the reference."""
        return self.guidance_scale > 1.0


def default_size(transformer: TransformerConfig, vae: VAEConfig) -> tuple[int, int]:
    """(height, width) the official demos use: the config's sample size, capped at 768x1360 for 1.5."""
    height = transformer.sample_height * vae.spatial_compression
    width = transformer.sample_width * vae.spatial_compression
    if transformer.version == "1.5":
        height, width = min(height, V15_DEFAULT_SIZE[0]), min(width, V15_DEFAULT_SIZE[1])
    return height, width


def default_fps(transformer: TransformerConfig) -> int:
    """The frame rate the model was trained at: 8 for CogVideoX 1.0, 16 for 1.5."""
    return 16 if transformer.version == "1.5" else 8


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_int(value, name: str) -> int:
    if not _is_int(value) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _prompt_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [_unicode(prompt, name)]
    if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        prompts = list(prompt)
        if not prompts:
            raise InputError(f"{name} is an empty list: give at least one prompt")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise InputError(f"{name} must hold strings, got {type(bad[0]).__name__}")
        return [_unicode(p, name) for p in prompts]
    raise InputError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")


def _unicode(text: str, name: str) -> str:
    """`text` if it is proper Unicode. A command-line argument that was not valid UTF-8 reaches Python
    with lone surrogates standing for its bytes, which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end]
        try:
            raw = bad.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate written in Python ("\ud800"), not a byte the shell passed
            raise InputError(f"{name} holds a lone surrogate {bad!r} at character {e.start}, which is not Unicode "
                             "text")  # fmt: skip
        raise InputError(f"{name} is not valid UTF-8 text (bytes {raw!r} at character {e.start})") from None
    return text


def check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    """Prompts and one negative prompt each ("" when none is given, as in the reference)."""
    prompts = _prompt_list(prompt, "prompt")
    if negative_prompt is None or isinstance(negative_prompt, str):
        return prompts, [_unicode(negative_prompt or "", "negative_prompt")] * len(prompts)
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != len(prompts):
        raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt")
    return prompts, negatives


def check_frames(num_frames, transformer: TransformerConfig, vae: VAEConfig) -> int:
    """The frame count must survive the VAE round trip.

    The VAE decodes F latent frames to 4(F-1)+1 video frames only when F is odd (its first decode chunk
    holds the lone first frame); an even F comes back as 4F frames (13 asked -> 16 made). So the counts
    that round-trip are 8k+1, as are the official 49, 81 and 161.
    """
    step = 2 * vae.temporal_compression
    if not _is_int(num_frames):
        raise InputError(f"num_frames must be a whole number of the form {step}k+1 (e.g. "
                         f"{transformer.sample_frames}), got {num_frames!r}")
    if num_frames < 1 or (num_frames - 1) % step:
        lower = max(1, ((num_frames - 1) // step) * step + 1)
        raise InputError(
            f"num_frames must be {step}k+1 (e.g. {transformer.sample_frames}), got {num_frames!r}; "
            f"nearest valid: {lower} or {lower + step}"
        )
    return int(num_frames)


def latent_frame_count(num_frames: int, vae: VAEConfig) -> int:
    return (num_frames - 1) // vae.temporal_compression + 1


def check_video_frames(
    num_frames, available: int, transformer: TransformerConfig, vae: VAEConfig
) -> int:
    """How many frames of a `available`-frame input video video-to-video uses.

    By default the model's own frame count (49 for 1.0, 81 for 1.5), or for a shorter video its longest
    prefix that comes back at its own length (8k+1 frames, 1.5 padded like text-to-video). CogVideoX 1.5
    also takes what the reference takes, an even latent frame count (8k+5 frames), unpadded; the VAE then
    decodes 3 frames more than it was given.
    """
    step = 2 * vae.temporal_compression
    if not _is_int(available) or available < 1:
        raise InputError("the video has no frames")
    if num_frames is None:
        longest = (available - 1) // step * step + 1
        return min(longest, (transformer.sample_frames - 1) // step * step + 1)
    if not _is_int(num_frames) or num_frames < 1:
        raise InputError(f"num_frames must be a positive integer, got {num_frames!r}")
    if num_frames > available:
        raise InputError(f"num_frames={num_frames} but the video has only {available} frames")
    patch_t = transformer.patch_size_t
    if patch_t and (num_frames - 1) % vae.temporal_compression == 0:
        if latent_frame_count(num_frames, vae) % patch_t == 0:
            return int(num_frames)
    return check_frames(num_frames, transformer, vae)


def check_last_image(request, vae: VAEConfig) -> None:
    """A last frame takes the last latent frame of an image-to-video request: there must be one besides
    the first frame's."""
    if request.latent_frames - request.padding_frames < 2:
        least = 2 * vae.temporal_compression + 1
        raise InputError(f"a last frame needs a video of at least {least} frames, got num_frames={request.num_frames}")


def frames_to_read(num_frames, transformer: TransformerConfig) -> int | None:
    """The most frames of an input video a request can use, so that a long file is not decoded whole (a
    minute of 1080p is gigabytes): `num_frames` when given, else the model's frame count, the most
    `check_video_frames` takes by default. None (no limit) for a bad `num_frames`, which the request's
    check then names."""
    if num_frames is None:
        return transformer.sample_frames
    return int(num_frames) if _is_int(num_frames) and num_frames > 0 else None


def check_task(transformer: TransformerConfig, task: str) -> None:
    """Can this model do the task? Image-to-video models need a first frame; the others cannot take one."""
    if task not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if transformer.is_image_to_video and task != "image":
        what = "text-to-video" if task == "text" else "video-to-video"
        raise InputError(
            f"this is an image-to-video model: give it the first frame (image=..., --image PHOTO); "
            f"{what} needs a text-to-video checkpoint"
        )
    if task == "image" and not transformer.is_image_to_video:
        raise InputError(
            "this is a text-to-video model and cannot take an image; use an image-to-video checkpoint "
            f"such as {I2V_MODELS}"
        )


def denoising_steps(num_inference_steps: int, strength: float | None) -> int:
    """Steps that run: all of them, or the last int(n * strength) for video-to-video."""
    if strength is None:
        return num_inference_steps
    return min(int(num_inference_steps * strength), num_inference_steps)


def check_strength(strength, num_inference_steps: int) -> float:
    """Video-to-video strength in (0, 1], large enough that at least one step runs."""
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise InputError(f"strength must be a number in (0, 1], got {strength!r}")
    if int(num_inference_steps * strength) < 1:
        raise InputError(
            f"strength {strength} of {num_inference_steps} steps runs no step; "
            f"use strength >= {least_strength(num_inference_steps):g} or more steps"
        )
    return float(strength)


def least_strength(num_inference_steps: int) -> float:
    """The smallest strength, in three significant digits, that runs one step of `num_inference_steps`:
    1 / n rounded up, since rounded to nearest (0.333 of 3) it may run none."""
    least = 1 / num_inference_steps
    scale = 10 ** (2 - math.floor(math.log10(least)))
    return math.ceil(least * scale) / scale


def size_step(transformer: TransformerConfig, vae: VAEConfig) -> int:
    """What a video's width and height are multiples of, in pixels: whole patches of latent pixels."""
    return vae.spatial_compression * transformer.patch_size


def check_size(
    height, width, num_frames: int, transformer: TransformerConfig, vae: VAEConfig
) -> tuple[int, int]:
    """Height and width in pixels: whole patches, and within what the variant's positions allow."""
    spatial = vae.spatial_compression
    multiple = size_step(transformer, vae)
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value < multiple or value % multiple:
            raise InputError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
    native = (transformer.sample_height * spatial, transformer.sample_width * spatial)
    if transformer.use_learned_positional_embeddings:
        # A learned position table (5B-I2V) exists for one video size only.
        if (height, width) != native or num_frames != transformer.sample_frames:
            raise InputError(
                f"this model only generates {native[1]}x{native[0]} (width x height) at "
                f"{transformer.sample_frames} frames; got {width}x{height} at {num_frames} frames"
            )
    if transformer.version == "1.5" and (height > native[0] or width > native[1]):
        # The 1.5 RoPE grid is sliced out of a table of sample_height/2 x sample_width/2 patches.
        raise InputError(
            f"this model generates at most {native[1]}x{native[0]} (width x height); got {width}x{height}"
        )
    return int(height), int(width)


def check_flag(value, name: str) -> bool:
    """A yes/no argument: True or False (numpy's bools too), not a string such as "false", which bool()
    would read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {value!r}")
    return bool(value)


MAX_TEXT_TOKENS = 512  # T5 v1.1 was trained on inputs of up to 512 tokens


def check_text_length(max_sequence_length, transformer: TransformerConfig) -> int:
    """T5 tokens per prompt; the model's own by default (226 for every released model)."""
    if max_sequence_length is None:
        return transformer.max_text_seq_length
    length = _positive_int(max_sequence_length, "max_sequence_length")
    if length > MAX_TEXT_TOKENS:
        raise InputError(
            f"max_sequence_length can be at most {MAX_TEXT_TOKENS} (T5's training length; this model "
            f"uses {transformer.max_text_seq_length}), got {length}"
        )
    table = transformer.use_learned_positional_embeddings or not transformer.use_rotary_positional_embeddings
    if table and length != transformer.max_text_seq_length:
        # An additive position table (2B, 5B-I2V) has text rows for exactly this many tokens.
        raise InputError(
            f"this model takes exactly {transformer.max_text_seq_length} text tokens; "
            f"got max_sequence_length={length}"
        )
    return length


def check_request(
    transformer: TransformerConfig,
    vae: VAEConfig,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 6.0,
    use_dynamic_cfg: bool = False,
    dynamic_cfg: str = "reference",
    num_videos_per_prompt: int = 1,
    max_sequence_length: int | None = None,
    num_train_timesteps: int = 1000,
    task: str = "text",
    strength: float | None = None,
    resize: str = "stretch",
    video_frames: int | None = None,
    riflex: bool = False,
) -> GenerationRequest:
    """Validate a generation request against a model's configs; raise `InputError` saying what to change.

    task: "text" (text-to-video), "image" (image-to-video: the caller has the first frame) or "video"
        (video-to-video from a `video_frames`-frame input; `num_frames` then picks how many of its frames
        to use, `strength` how much of the schedule runs, 0.8 by default).
    riflex: RIFLEx for a video longer than the model was trained on (models with RoPE only).
    """
    prompts, negatives = check_prompts(prompt, negative_prompt)
    check_task(transformer, task)
    if resize not in RESIZE_MODES:
        raise InputError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if task != "video" and strength is not None:
        raise InputError("strength only applies to video-to-video (give a video)")
    if check_flag(riflex, "riflex") and not transformer.use_rotary_positional_embeddings:
        raise InputError("riflex changes rotary positions, and this model has none (CogVideoX-2B's are a fixed "
                         "table); use a model with RoPE (CogVideoX-5b, 1.5)")  # fmt: skip

    if task == "video":
        if video_frames is None:
            raise InputError("video-to-video needs the input video's frame count")
        num_frames = check_video_frames(num_frames, video_frames, transformer, vae)
    else:
        default_frames = transformer.sample_frames if num_frames is None else num_frames
        num_frames = check_frames(default_frames, transformer, vae)
    default_height, default_width = default_size(transformer, vae)
    height, width = check_size(
        default_height if height is None else height,
        default_width if width is None else width,
        num_frames,
        transformer,
        vae,
    )
    steps = _positive_int(num_inference_steps, "num_inference_steps")
    if steps > num_train_timesteps:
        raise InputError(
            f"num_inference_steps can be at most {num_train_timesteps} (the training steps), got {steps}"
        )
    if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool):
        raise InputError(f"guidance_scale must be a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale):
        raise InputError(f"guidance_scale must be finite, got {guidance_scale!r}")
    if dynamic_cfg not in DYNAMIC_CFG_VARIANTS:
        raise InputError(f"dynamic_cfg must be one of {', '.join(DYNAMIC_CFG_VARIANTS)}, got {dynamic_cfg!r}")

    if task == "video":
        strength = check_strength(DEFAULT_STRENGTH if strength is None else strength, steps)

    latent_frames = latent_frame_count(num_frames, vae)
    padding = 0
    if transformer.patch_size_t is not None and latent_frames % transformer.patch_size_t:
        # CogVideoX 1.5 patches pairs of latent frames: pad at the front, drop after denoising.
        padding = transformer.patch_size_t - latent_frames % transformer.patch_size_t
    return GenerationRequest(
        prompts=prompts,
        negative_prompts=negatives,
        num_frames=num_frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=float(guidance_scale),
        use_dynamic_cfg=check_flag(use_dynamic_cfg, "use_dynamic_cfg"),
        dynamic_cfg=dynamic_cfg,
        videos_per_prompt=_positive_int(num_videos_per_prompt, "num_videos_per_prompt"),
        max_sequence_length=check_text_length(max_sequence_length, transformer),
        latent_frames=latent_frames + padding,
        padding_frames=padding,
        task=task,
        strength=strength,
        resize=resize,
        riflex=riflex,
    )

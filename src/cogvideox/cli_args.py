"""What the `cogvideox` commands share on the command line: value types, argument groups, the request.

`generate`, `batch`, `invert`/`regenerate`, `train`, `serve`/`worker` take a model, a dtype and a device
in the same words; `generate` and `batch` also sample the same way. Each group is added here once, so a
flag means the same thing (name, default, help) in every command that has it.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from cogvideox.video import MAX_FPS, MIN_FPS

# ---------------------------------------------------------------------------------------------------
# Value types: a bad value is a one-line argparse error that names the flag and what it expects.


def _number(kind: type, accepts: Callable[[float], bool], expected: str, out_of_range: str | None = None):
    """A `type=` for argparse: `kind(text)` when `accepts` it, else an error "expected <expected>"."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {out_of_range or expected}, got {text}")
        return value

    return parse


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")  # NaN is the one value unequal to itself


positive_int = _number(int, lambda x: x >= 1, "a positive integer")
non_negative_int = _number(int, lambda x: x >= 0, "a non-negative integer")
positive_float = _number(float, lambda x: x > 0 and _finite(x), "a positive number")
non_negative_float = _number(float, lambda x: x >= 0 and _finite(x), "a number >= 0", "a finite number >= 0")
finite_float = _number(float, _finite, "a number", "a finite number")
fraction = _number(float, lambda x: 0 < x <= 1, "a number in (0, 1]")
# A frame's height or width in pixels. H.264's largest level holds frames of sides up to about 16,900 pixels,
# and beyond 2**31 the image library cannot even be asked: a larger side is a typo, refused before any work.
MAX_FRAME_SIDE = 16384
frame_side = _number(int, lambda x: 1 <= x <= MAX_FRAME_SIDE, "a positive integer",
                     f"a size in pixels from 1 to {MAX_FRAME_SIDE}")
# generate --num-videos: the videos of one run are denoised as one batch, and a run writes each to its own
# file; more than this is a typo (or a job for `cogvideox batch`), refused before listing the file names.
MAX_NUM_VIDEOS = 1000
num_videos = _number(int, lambda x: 1 <= x <= MAX_NUM_VIDEOS, "a positive integer",
                     f"a number of videos from 1 to {MAX_NUM_VIDEOS} (use cogvideox batch for more)")
# A noise seed: torch's generators take 64 bits. The pipeline refuses a larger one too, but only once the
# model is loaded; as the flag is read, a typo costs nothing.
noise_seed = _number(int, lambda x: 0 <= x < 2**64, "a non-negative integer", "a seed from 0 to 2**64 - 1")
# An MP4's frame rate: what cogvideox.video.check_fps accepts.
frame_rate = _number(float, lambda x: MIN_FPS <= x <= MAX_FPS, "a frame rate", f"a frame rate from 1/1001 to {MAX_FPS}")


def non_blank(expected: str) -> Callable[[str], str]:
    """A `type=` for argparse that refuses an empty or blank value, most likely an unset variable
    (`--video "$CLIP"`), rather than reading it as the current folder, the default or no value at all."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected {expected}, got an empty one (an unset variable?)")
        return text

    return parse


file_name = non_blank("a file name")
model_name = non_blank("a model folder or a Hugging Face repo id")
device_name = non_blank("a device such as cpu, cuda or cuda:1")
layout = non_blank("a layout such as cfg=2,ulysses=2")


# ---------------------------------------------------------------------------------------------------
# Argument groups

MODEL_HELP = (
    "model folder in the diffusers layout, or a Hugging Face repo id such as THUDM/CogVideoX-2b (taken from "
    "the cache when present, else downloaded); default: the embedded demo model"
)
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available)"
# The start of every --output help for a video: the formats `cogvideox.video.export_video` writes.
VIDEO_OUTPUT_HELP = (
    "video file to write: .mp4 (H.264), .gif (animated GIF), or numbered PNG frames for a name such as "
    "frames/%%04d.png"
)


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    model_help: str = MODEL_HELP,
    device_help: str = DEVICE_HELP,
    revision: bool = True,
    offline: bool = True,
) -> None:
    """--model, --dtype, --device, --variant, and the hub's --revision and --offline where the command has
    them.

    The defaults are None (False for --offline): `train` lets its flags override a config file only
    when they are given.
    """
    arg = parser.add_argument
    arg("--model", default=None, type=model_name, help=model_help)
    arg("--dtype", help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU; 5B models need bf16)")
    arg("--device", help=device_help)
    arg("--variant", help="read the weights of this variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors), "
        "where a component has them, its plain weights where not (default: the plain weights)")
    if revision:
        arg("--revision", help="hub revision (branch, tag or commit) of --model (default: main)")
    if offline:
        arg("--offline", action="store_true", help="never download; use a local folder or the hub cache")


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the weights live while a command runs: --offload, --text-device and --vae-tiling.

    The commands that run a whole model take them alike, with offloading chosen from the free GPU memory
    by default: a 5B model that a 24 GB GPU holds only with offloading must not stop one command there.
    """
    arg = parser.add_argument
    arg(
        "--offload",
        choices=("auto", "none", "model", "stream", "sequential"),
        default="auto",
        help="keep weights in host memory, on the GPU only while used: 'model' one component at a time, "
        "'stream' transformer and T5 blocks copied ahead while others compute, 'sequential' one layer at a "
        "time (least memory, slowest); the video does not change. 'auto' (default) picks the fastest that "
        "fits the free GPU memory and says which; 'none' on the CPU",
    )
    arg("--text-device", type=device_name,
        help="where the T5 text encoder runs, e.g. cpu to keep it off the GPU (default: --device)")
    arg(
        "--vae-tiling",
        action="store_true",
        help="decode (and encode) in overlapping tiles of half the model's own size: much less GPU memory; "
        "pixels near tile seams differ slightly on the real models (as in the reference's tiled decode), "
        "visibly on the demo (default: off)",
    )


def memory_settings(args: argparse.Namespace, device) -> dict:
    """`Pipeline.from_pretrained`'s keyword arguments from the flags of `add_memory_arguments`, for a
    pipeline computing on `device`."""
    from cogvideox import loading

    if device.type == "cpu" and args.offload in ("model", "stream", "sequential"):
        warnings.warn(
            f"--offload {args.offload} keeps a GPU's weights in host memory; on the CPU the weights are there "
            "already, so it saves no memory",
            stacklevel=2,
        )
    text_device = loading.choose_device(args.text_device, "text_device") if args.text_device else None
    return dict(offload=args.offload, text_device=text_device, vae_tiling=args.vae_tiling)


def report_offload(pipe, args: argparse.Namespace, device) -> None:
    """Print what `--offload` chose, when it chose on a GPU or was asked for (on the CPU, 'auto' is
    always 'none': nothing worth a line)."""
    if pipe.offload_choice and (args.offload != "auto" or device.type == "cuda"):
        print(pipe.offload_choice)


def add_enhancer_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--prompt-enhancer and --enhancer-model: the chat endpoint that rewrites prompts (`cogvideox.enhance`),
    by default the one named in the environment, so that a user who always wants it sets it once."""
    from cogvideox import enhance

    arg = parser.add_argument
    arg(
        "--prompt-enhancer",
        metavar="URL",
        default=os.environ.get(enhance.ENV_URL) or None,
        help=f"rewrite {what} with this OpenAI-compatible chat endpoint, as the official demos do (such as "
        "https://api.openai.com/v1 or http://localhost:11434/v1); 'off' for none (default: "
        f"${enhance.ENV_URL}, else off); its key from ${enhance.ENV_KEY}",
    )
    arg(
        "--enhancer-model",
        metavar="NAME",
        default=os.environ.get(enhance.ENV_MODEL) or enhance.DEFAULT_MODEL,
        help=f"chat model of --prompt-enhancer (default: ${enhance.ENV_MODEL}, else {enhance.DEFAULT_MODEL})",
    )


ENHANCER_WITH_PARALLEL = (
    "--prompt-enhancer does not combine with --parallel (each process of a video would get its own rewrite); "
    "rewrite the prompts first with `cogvideox enhance` and pass the result"
)


def prompt_enhancer(args: argparse.Namespace, **kwargs):
    """The `PromptEnhancer` of the flags of `add_enhancer_arguments`, or None when off; `InputError` for
    an address that is not http(s), or with a command's --parallel. `kwargs` go to `PromptEnhancer`
    (timeout, attempts, backoff)."""
    from cogvideox.enhance import ENV_KEY, PromptEnhancer
    from cogvideox.errors import InputError

    url = (args.prompt_enhancer or "").strip()
    if not url or url.lower() == "off":
        return None
    if not url.lower().startswith(("http://", "https://")):
        raise InputError(f"--prompt-enhancer {url}: give the endpoint's address, such as http://localhost:11434/v1")
    if getattr(args, "parallel", None):
        raise InputError(ENHANCER_WITH_PARALLEL)
    return PromptEnhancer(url, args.enhancer_model, os.environ.get(ENV_KEY), **kwargs)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The speed levers (`cogvideox.fast`): --quantize, --quantize-text, --attention, --compile and --cache.

    `speed_settings` checks them against the device and turns them into `Pipeline.accelerate`'s keywords.
    """
    arg = parser.add_argument
    arg(
        "--quantize",
        choices=("int8", "fp8"),
        default=None,
        help="quantise the transformer's linear layers: int8 weight-only (half the bf16 weight memory) or "
        "fp8 with row-wise scales (NVIDIA GPU of compute capability 8.9+, bf16); default: off (exact)",
    )
    arg(
        "--quantize-text",
        choices=("int8",),
        default=None,
        help="quantise the T5 text encoder's linear layers to int8 weight-only, as the model card's INT8 does "
        "(T5-XXL: 8.9 GiB in bf16, 4.6 GiB so; the text states change by rounding); default: off",
    )
    arg(
        "--attention",
        choices=("auto", "cudnn", "flash", "efficient", "math", "fa3", "sage", "fa3-fp8", "sage-emulated",
                 "fa3-fp8-emulated"),
        default=None,
        help="the transformer's attention kernel: an SDPA backend (auto: cuDNN, flash, memory-efficient, math, "
        "the first that runs; exact up to rounding), fa3 (FlashAttention-3's Hopper kernel, exact up to "
        "rounding: the fa3-fwd package or a source build, NVIDIA GPU, bf16) or sage, 8-bit attention (INT8 "
        "Q.K^T, fp16 P.V; the sageattention package on an NVIDIA GPU, bf16/fp16; changes the video "
        "slightly, as --quantize does) or fa3-fp8 (FlashAttention-3's FP8 kernel on e4m3 Q, K, V, one scale "
        "per head; Hopper GPU, bf16; lossy, more than sage); sage-emulated and fa3-fp8-emulated run those "
        "two's math in plain PyTorch on any device (slow: to see what they do to a video); default: auto "
        "when any of --quantize, --compile, --cache is given, else PyTorch's choice",
    )
    arg(
        "--compile",
        action="store_true",
        help="torch.compile the transformer blocks (one compiled block reused by all; the first step "
        "warms up); default: off",
    )
    arg(
        "--cache",
        type=non_negative_float,
        metavar="THRESHOLD",
        help="step cache: skip all but the first transformer block on steps whose first-block residual "
        "changed by less than THRESHOLD (relative; 0 computes every step, ~0.05-0.2 skips some); default: off",
    )


def speed_settings(args: argparse.Namespace, device) -> dict | None:
    """`Pipeline.accelerate`'s keyword arguments from the flags of `add_speed_arguments` (None when none is
    given), after checking that they can run on `device` and with --offload: `InputError` otherwise, before
    any weights load."""
    from cogvideox import fast
    from cogvideox.errors import InputError

    given = (args.quantize, args.compile, args.cache, args.attention, args.quantize_text)
    if all(value is None or value is False for value in given):
        return None
    options = dict(quantize=args.quantize, compile=args.compile, cache=args.cache, attention=args.attention or "auto")
    if args.quantize_text is not None:
        options["quantize_text"] = args.quantize_text
    fast.check_options(device, **options)
    if args.compile and getattr(args, "offload", None) == "sequential":
        raise InputError("--compile does not combine with --offload sequential (its hooks run inside the blocks)")
    return options


def add_sampling_arguments(parser: argparse.ArgumentParser, *, seed_default: int | None, seed_help: str) -> None:
    """How a video is sampled: prompt conditioning, steps, guidance, scheduler, seed and size.

    `request_from_args` turns them into the pipeline's keyword arguments.
    """
    arg = parser.add_argument
    arg(
        "--negative-prompt",
        default="",
        help="what the video should not show: the unconditional branch of guidance (default: empty)",
    )
    arg("--steps", type=positive_int, default=50, help="number of denoising steps (default: 50)")
    arg(
        "--guidance",
        type=finite_float,
        default=None,
        help="classifier-free guidance scale; 1 or less turns guidance off (default: the model's "
        "recommendation in its sampling.json, else 6)",
    )
    arg(
        "--dynamic-cfg",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="vary the guidance scale over the steps, as the official demos do with the DPM scheduler "
        "(default: the model's recommendation, else off)",
    )
    arg(
        "--dynamic-cfg-clock",
        choices=("reference", "smooth"),
        default=None,
        help="dynamic CFG clock: 'reference' feeds the raw timestep as the reference does (the scale "
        "oscillates), 'smooth' the step index (the scale decays from 1+guidance to 1); default: the "
        "model's recommendation, else reference",
    )
    arg(
        "--scheduler",
        choices=("ddim", "dpm"),
        default=None,
        help="sampler: deterministic DDIM or stochastic DPM-Solver++(2M) SDE; default: the model's own",
    )
    arg("--seed", type=noise_seed, default=seed_default, help=seed_help)
    arg("--frames", type=positive_int, help="number of frames, 8k+1 such as 49 (default: the model's)")
    arg(
        "--riflex",
        action="store_true",
        help="for --frames beyond the model's own (such as 97 for CogVideoX-5b, whose own is 49): slow the "
        "rotary embedding's intrinsic temporal frequency (RIFLEx) so that the video goes on instead of "
        "repeating its start; models with RoPE only (not 2b)",
    )
    arg("--height", type=frame_side, help="video height in pixels, a multiple of 16 (default: the model's)")
    arg("--width", type=frame_side, help="video width in pixels, a multiple of 16 (default: the model's)")
    arg(
        "--max-sequence-length",
        type=positive_int,
        help="T5 tokens per prompt (default: the model's, 226 for the released models)",
    )


def add_resize_argument(parser: argparse.ArgumentParser) -> None:
    """--resize for a command that reads a video to --height and --width (`invert`, `encode`)."""
    parser.add_argument(
        "--resize",
        choices=("stretch", "crop"),
        default="stretch",
        help="'stretch' to the size, or 'crop' the centred region of its aspect ratio first (default: stretch)",
    )


def _video_rate(text: str) -> float:
    """--video-fps: a frame rate, or 'source' (0: every frame as stored)."""
    if text.strip().lower() == "source":
        return 0.0
    return frame_rate(text)


def add_video_rate_argument(parser: argparse.ArgumentParser, flag: str, what: str) -> None:
    """--video-fps: the rate the video of `flag` is sampled at (`sampling_rate`)."""
    parser.add_argument(
        "--video-fps",
        type=_video_rate,
        metavar="FPS|source",
        help=f"the rate {flag} is sampled at from its start (frames repeated or skipped, by their "
        f"timestamps): the model's by default (8 or 16), so that the {what} video plays at the input's "
        "speed; 'source' takes every frame as stored, as the reference's pipeline does",
    )


def sampling_rate(args: argparse.Namespace, transformer) -> float | None:
    """The rate of --video-fps for a model: its own by default, None for 'source' (every frame)."""
    from cogvideox.request import default_fps

    return default_fps(transformer) if args.video_fps is None else args.video_fps or None


def taken_rate(rate: float | None, path: str | os.PathLike) -> float | None:
    """The rate frames sampled at `rate` (`sampling_rate`; None: every frame) from the video at `path` were
    taken at: the file's own for every frame. A video made again from them (a reconstruction) plays at it."""
    from cogvideox.video import frame_rate

    return rate if rate is not None else frame_rate(path)


def request_from_args(args: argparse.Namespace, folder: Path) -> dict:
    """The pipeline's keyword arguments from the flags of `add_sampling_arguments` (seed excepted: the
    caller decides it per video), with the guidance flags not given taken from the model in `folder`."""
    from cogvideox import loading

    guidance = loading.fill_sampling(
        loading.read_sampling_defaults(folder),
        guidance_scale=args.guidance, use_dynamic_cfg=args.dynamic_cfg, dynamic_cfg=args.dynamic_cfg_clock,
    )
    return guidance | dict(
        negative_prompt=args.negative_prompt,
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        max_sequence_length=args.max_sequence_length,
        riflex=args.riflex,
    )


def warn_idle_riflex(request, transformer) -> None:
    """Warn when --riflex was asked for a video no longer than the model's own, which it leaves as is."""
    if request.riflex and request.num_frames <= transformer.sample_frames:
        warnings.warn(
            f"--riflex changes nothing at {request.num_frames} frames: it is for videos longer than the "
            f"model's own {transformer.sample_frames} (give more --frames)",
            stacklevel=2,
        )


def warn_idle_guidance(request, args: argparse.Namespace) -> None:
    """Warn of the guidance flags given that the request leaves unused: a negative prompt is the other half
    of classifier-free guidance, which is off at a scale of 1 or less, and the clock of dynamic CFG needs
    dynamic CFG (with guidance on) to tick."""
    if args.negative_prompt.strip() and not request.use_guidance:
        warnings.warn(
            f"--negative-prompt changes nothing at --guidance {request.guidance_scale:g}: guidance of 1 or "
            "less is off, and the negative prompt with it (raise --guidance)",
            stacklevel=2,
        )
    if args.dynamic_cfg_clock is not None and not (request.use_dynamic_cfg and request.use_guidance):
        why = "dynamic CFG (give --dynamic-cfg)" if request.use_guidance else "guidance (raise --guidance above 1)"
        warnings.warn(f"--dynamic-cfg-clock changes nothing without {why}", stacklevel=2)


def warn_replaced(*paths: Path | None, by: str = "") -> None:
    """Say of each output among `paths` that exists that it will be replaced (`by`: " by the new video");
    called once the request is known to be good, so that a refused one, which replaces nothing, says
    nothing of it."""
    from cogvideox.video import video_exists

    for path in paths:
        if path is not None and video_exists(path):
            warnings.warn(f"{path} exists and will be replaced{by}", stacklevel=2)


def recorded_model(folder: Path) -> str | None:
    """How a record names the model in `folder`: its resolved path, or None for the embedded demo model
    (wherever the package is installed)."""
    from cogvideox.demo import DEMO_MODEL_DIR

    demo = DEMO_MODEL_DIR is not None and folder.resolve() == Path(DEMO_MODEL_DIR).resolve()
    return None if demo else str(folder.resolve())


def locate_model(args: argparse.Namespace):
    """Check --dtype and --device and find --model's folder and configs: the mistakes these reveal fail
    before any weights load. Returns (device, folder, configs)."""
    from cogvideox import loading

    loading.parse_dtype(args.dtype)
    device = loading.choose_device(args.device)
    folder = loading.resolve_model_dir(args.model, revision=args.revision, local_files_only=args.offline,
                                       variant=args.variant)  # fmt: skip
    return device, folder, loading.read_model_configs(folder, variant=args.variant)

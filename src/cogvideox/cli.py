"""`cogvideox` command line: a thin layer that parses, calls `Pipeline`, writes the MP4 and reports.

    cogvideox generate "a panda playing a guitar" --output panda.mp4 --model THUDM/CogVideoX-2b
    cogvideox generate "the panda waves" --image panda.jpg --model THUDM/CogVideoX-5b-I2V
    cogvideox generate "a panda in the snow" --video panda.mp4 --strength 0.8 --model THUDM/CogVideoX-5b

`invert`, `regenerate` and `convert` live in `cli_tools.py`.

Mistakes in the request print one line and exit with status 2; a run that fails (NaN latents, out of
memory) prints one line and exits with 1. Under torchrun only global rank 0 prints errors, warnings and
progress bars; the other processes exit with the same status, silently.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from cogvideox import provenance, video
from cogvideox.cli_args import (
    VIDEO_OUTPUT_HELP,
    add_enhancer_arguments,
    add_memory_arguments,
    add_model_arguments,
    add_sampling_arguments,
    add_speed_arguments,
    add_video_rate_argument,
    file_name,
    finite_float,
    fraction,
    frame_rate,
    layout,
    locate_model,
    memory_settings,
    num_videos,
    positive_int,
    prompt_enhancer,
    recorded_model,
    report_offload,
    request_from_args,
    sampling_rate,
    speed_settings,
    warn_idle_guidance,
    warn_idle_riflex,
    warn_replaced,
)
from cogvideox.errors import CogVideoXError, InputError, LoadError
from cogvideox.files import write_all_or_rescue
from cogvideox.models.config import ConfigError

USER_ERROR, RUN_ERROR = 2, 1

# How long a process other than rank 0 waits before it exits with an error: torchrun stops every process
# as soon as one exits, and rank 0, which meets the same error, needs the moment to print its line.
QUIET_EXIT_DELAY_S = 1.0
# The error lines this process (not rank 0) kept back, for `_quiet_exit` to print if rank 0 did not share them.
_kept_back: list[str] = []


def global_rank() -> int:
    """This process's rank among all the processes torchrun started: the process group's once it is up,
    else torchrun's RANK variable (0 without a launcher). Reads no torch module that is not loaded yet:
    a mistake in the arguments is reported before torch is imported."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _say(line: str, error: bool = False) -> None:
    """Print an error or warning line to stderr, on global rank 0 only: under torchrun every process
    meets the same mistake, and one line is enough. Another process keeps an `error` line back, and prints
    it after all if rank 0 turns out not to have met it (see `_quiet_exit`)."""
    if global_rank() == 0:
        print(line, file=sys.stderr)
    elif error:
        _kept_back.append(line)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster scheduler's stop, `kill`, torchrun stopping its other processes), raised where
    the work is, as Ctrl-C is: the same clean-up (no half-written file, a rescued video) and the same
    report (`train` says how to resume), then the exit status of a terminated process."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _interrupted_status(error: KeyboardInterrupt) -> int:
    """128 + the signal: 143 after SIGTERM, 130 after Ctrl-C (SIGINT)."""
    return 128 + (signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)


def _quiet_exit(status: int) -> int:
    """`status`, after giving rank 0 time to report an error that this silent process shares. torchrun
    stops every process as soon as one exits with an error: one still running after the wait met an error
    that rank 0 did not (a file missing on its node, say), and prints it, naming itself."""
    kept, _kept_back[:] = list(_kept_back), []
    rank = global_rank()
    if status not in (0, 130, 143) and rank != 0:
        try:
            time.sleep(QUIET_EXIT_DELAY_S)
        except Terminated:  # torchrun stops the others once rank 0 has reported and exited: expected
            return status
        if "TORCHELASTIC_RUN_ID" in os.environ:  # only torchrun's agent stops the others; another launcher
            for line in kept:  # might not, and every process would print the shared line
                print(line.replace(": error: ", f": error: (rank {rank}) ", 1), file=sys.stderr)
    return status


_PROMPT_COMMANDS = ("generate", "invert", "regenerate")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the default prints the whole usage block first), on rank 0 only."""

    def error(self, message: str, help_of: str | None = None):
        if global_rank() != 0:
            self.exit(_quiet_exit(USER_ERROR))
        message = _LONG_QUOTED.sub(_shortened, message)
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {help_of or self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # Leftover arguments are reported with the command's help, and words most likely come from a
        # prompt of several words typed without quotes.
        known, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(known, "command", None)
            help_of = f"{self.prog} {command}" if command else None
            prompt_words = _stray_words(extra) and command in _PROMPT_COMMANDS
            hint = "; put a prompt of several words in quotes" if prompt_words else ""
            if prompt_words and command != "generate" and not known.prompt:  # its prompt is an option
                hint = '; give the prompt with --prompt, in quotes: --prompt "a red ball rolls left"'
            self.error(f"unrecognized arguments: {' '.join(map(_short, extra))}{hint}", help_of)
        return known


# A value quoted in an error (argparse's and our types' "got 'VALUE'"), or a leftover argument, is cut to
# its start when long: a prompt pasted after the wrong flag made an error line of the prompt's length.
_LONG_QUOTED = re.compile(r"""(['"])([^'"]{100,})\1""")


def _short(text: str, keep: int = 60) -> str:
    return text if len(text) < 100 else f"{text[:keep]}... ({len(text)} characters)"


def _shortened(match: re.Match) -> str:
    quote, text = match.groups()
    return f"{quote}{text[:60]}...{quote} ({len(text)} characters)"


def _stray_words(extra: list[str]) -> list[str]:
    """The leftover arguments that are not options nor, most likely, the value of an unknown option just
    before them (`--steps 4` to `regenerate`, which has no --steps): words of an unquoted prompt."""
    return [a for i, a in enumerate(extra) if not a.startswith("-") and not (i and _takes_value(extra[i - 1]))]


def _takes_value(argument: str) -> bool:
    return argument.startswith("-") and "=" not in argument


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cogvideox",
        description="CogVideoX text-, image- and video-to-video: loads the official checkpoints and "
        "reproduces the reference implementation seed for seed.",
    )
    from cogvideox import __version__

    parser.add_argument("--version", action="version", version=f"cogvideox {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "generate",
        help="generate a video from a text prompt (and a first frame, or a video to redraw) as an MP4 or GIF",
        description="Generate a video from a text prompt and write it as an H.264 MP4 (or an animated GIF, for "
        "an --output name ending in .gif, or PNG frames, for one such as frames/%04d.png). Sizes, frame count and "
        "frame rate default to the model's own (49 frames at 720x480, 8 fps for CogVideoX 1.0; 81 frames at "
        "1360x768, 16 fps for 1.5). Image-to-video models take the first frame with --image, or continue a "
        "video given with --extend; text-to-video models redraw a video given with --video.",
    )
    arg = gen.add_argument
    arg("prompt", help="what the video should show")
    arg("-o", "--output", default="output.mp4", type=file_name,
        help=VIDEO_OUTPUT_HELP + "; or, for a name ending in .safetensors, the denoised latents without decoding "
        "them (cogvideox decode makes the same video from them later, with the VAE alone) "
        "(default: output.mp4)")
    add_model_arguments(gen)
    add_sampling_arguments(gen, seed_default=None, seed_help="noise seed (default: random, printed)")
    arg("--fps", type=frame_rate, help="frame rate of the video file (default: the model's, 8 or 16)")
    arg(
        "--image",
        type=file_name,
        help="first frame for an image-to-video model (PNG, JPEG, ...), resized to the video size; such "
        "models need one",
    )
    arg(
        "--video",
        type=file_name,
        help="video to redraw (video-to-video, text-to-video models; a file, or PNG frames such as "
        "frames/%%04d.png): its first --frames frames (default: the model's count, or the longest 8k+1 prefix "
        "of a shorter video), resized to the video size",
    )
    arg(
        "--last-image",
        type=file_name,
        metavar="IMAGE",
        help="with --image: the last frame, for keyframe interpolation by a model trained for it "
        "(CogVideoX-Interpolation, a fine-tuned 5B-I2V); the released I2V models follow it loosely if at all",
    )
    arg(
        "--windows",
        type=positive_int,
        nargs="?",
        const=0,
        metavar="STRIDE",
        help="for --frames beyond the model's own (CogVideoX 1.0 text- or video-to-video, 2b included): denoise "
        "windows of the model's own length, STRIDE latent frames apart (default: half a window), and blend "
        "them, from FreeNoise's rescheduled noise; any length, one transformer pass per window per step",
    )
    add_video_rate_argument(gen, "--video", "redrawn")
    arg(
        "--extend",
        type=file_name,
        metavar="VIDEO",
        help="continue VIDEO (image-to-video models): a new clip drawn from its last frame, at its size, is "
        "appended; the output holds both (chain runs for longer videos; default fps: VIDEO's)",
    )
    arg(
        "--strength",
        type=fraction,
        help="video-to-video: fraction of the denoising schedule that runs, in (0, 1]; lower stays closer "
        "to the input (default: 0.8)",
    )
    arg(
        "--resize",
        choices=("stretch", "crop"),
        help="how --image / --video frames reach the video size: 'stretch' resizes as the reference does, "
        "'crop' keeps the aspect ratio by cutting the centred region first (default: stretch)",
    )
    arg(
        "--num-videos",
        type=num_videos,
        default=1,
        help="videos to generate, written as OUTPUT-1.mp4, OUTPUT-2.mp4, ... (frames/%%03d.png: frames/1-%%03d.png, "
        "...) (default: 1)",
    )
    add_memory_arguments(gen)
    arg("--vae-slicing", action="store_true", help="decode the videos of --num-videos one at a time (less memory)")
    arg("--quiet", action="store_true", help="no progress bars, only the final report")
    add_enhancer_arguments(gen, "the prompt into a detailed description before generating")
    arg(
        "--parallel",
        type=layout,
        metavar="LAYOUT",
        help="run on the processes torchrun starts: cfg=2 (guidance halves), ulysses=N (sequence; N divides "
        "the heads), ring=N (sequence; any N), e.g. cfg=2,ulysses=2; the product is the process count. "
        "The video is the single-process one; with --vae-tiling the decode's tiles are split too, "
        "without it every process decodes the whole video (see docs/parallel.md)",
    )
    add_speed_arguments(gen)
    arg(
        "--lora",
        type=file_name,
        action="append",
        default=[],
        metavar="PATH",
        help="LoRA weights in the diffusers layout (pytorch_lora_weights.safetensors or its folder); repeat "
        "for several",
    )
    arg(
        "--lora-scale",
        type=finite_float,
        action="append",
        default=[],
        metavar="S",
        help="scale of each --lora, in the same order (default: 1 each)",
    )
    gen.set_defaults(run=_generate)

    from cogvideox.cli_latents import add_latent_parsers
    from cogvideox.cli_tools import add_tool_parsers
    from cogvideox.serve.cli import add_serve_parsers
    from cogvideox.train.cli import add_train_parsers

    add_tool_parsers(commands)
    add_latent_parsers(commands)
    add_serve_parsers(commands)
    add_train_parsers(commands)
    from cogvideox.batch import add_batch_parser

    add_batch_parser(commands)
    return parser


def _output_paths(output: str, count: int) -> list[Path]:
    """Where each of `count` videos goes: `output`, numbered from 1 when there are several: name-1.mp4, and
    for a PNG sequence the number before the frame number (frames/%03d.png: frames/1-%03d.png), so that
    the frames of a video sort together."""
    from cogvideox.video import FRAME_NUMBER

    path = Path(output)
    if count == 1:
        return [path]
    frame_number = FRAME_NUMBER.search(path.name) if path.suffix.lower() == ".png" else None
    if frame_number is not None:
        at = frame_number.start()
        return [path.with_name(f"{path.name[:at]}{i}-{path.name[at:]}") for i in range(1, count + 1)]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count + 1)]


def _quiet_libraries() -> None:
    # transformers draws its own bars and notices while loading the T5; ours are the ones that matter.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _generate(args: argparse.Namespace) -> int:
    from cogvideox import conditioning
    from cogvideox.extend import check_extendable, continue_video
    from cogvideox.latents import LatentVideo, check_latents_path, is_latents_path
    from cogvideox.pipeline import Pipeline
    from cogvideox.request import check_last_image, check_request, frames_to_read
    from cogvideox.video import check_video_path, read_video

    if not args.prompt.strip() and not (args.image or args.video or args.extend):
        # As batch and the service: with nothing else to follow, a blank prompt is a mistake (an unset
        # variable), not a request. From an image or a video, a video without text guidance is a use.
        raise InputError("the prompt is blank (an unset variable?); say what the video should show")
    if sum(map(bool, (args.image, args.video, args.extend))) > 1:
        given = " and ".join(f for f, v in (("--image", args.image), ("--video", args.video),
                                             ("--extend", args.extend)) if v)  # fmt: skip
        raise InputError(f"give one of --image (image-to-video), --video (video-to-video) and --extend, not {given}")
    if args.windows is not None and args.riflex:
        raise InputError("give --riflex or --windows for a longer video, not both")
    if args.windows is not None and args.cache is not None:
        raise InputError("--windows runs the transformer several times a step, which --cache cannot follow")
    if args.windows is not None and args.parallel:
        raise InputError("--windows does not run under --parallel yet")
    if args.last_image and not args.image:
        raise InputError("--last-image is the last frame of an image-to-video video: give the first with --image")
    if args.strength is not None and not args.video:
        raise InputError("--strength only applies to video-to-video (--video)")
    if args.video_fps is not None and not args.video:
        raise InputError("--video-fps only applies to video-to-video (--video)")
    if args.resize is not None and not (args.image or args.video):
        raise InputError("--resize only applies to an --image or --video input")
    if len(args.lora_scale) > len(args.lora):
        raise InputError(f"{len(args.lora_scale)} --lora-scale values for {len(args.lora)} --lora files")
    for path in args.lora:
        if not Path(path).exists():
            raise InputError(f"--lora {path} does not exist")
    enhancer = prompt_enhancer(args)

    latent_output = is_latents_path(args.output)
    if latent_output and args.extend:
        raise InputError("--extend writes the video with its continuation; it cannot stop at latents (give a "
                         "video --output)")  # fmt: skip
    check_path = check_latents_path if latent_output else check_video_path
    outputs = [check_path(path, "--output") for path in _output_paths(args.output, args.num_videos)]

    # Every mistake that the inputs and the configs alone reveal fails here, before minutes of loading.
    start = time.perf_counter()
    picture = conditioning.load_image(args.image) if args.image else None
    last_picture = conditioning.load_image(args.last_image) if args.last_image else None
    device, folder, configs = locate_model(args)
    extended, extended_fps = read_video(args.extend) if args.extend else (None, None)
    if extended is not None:
        check_extendable(configs.transformer, configs.vae, extended, args.height, args.width)
    # Of a long video, only the frames the request can use are decoded.
    source = None
    if args.video:
        rate = sampling_rate(args, configs.transformer)
        source = conditioning.load_video(args.video, frames_to_read(args.frames, configs.transformer), rate)
    resize = args.resize or "stretch"
    request = request_from_args(args, folder) | dict(num_videos_per_prompt=args.num_videos, resize=resize)
    if extended is not None:  # the new clip has the video's size
        request.update(height=extended.shape[1], width=extended.shape[2])
    train_steps = configs.scheduler.num_train_timesteps
    task = "image" if args.image or args.extend else "video" if args.video else "text"
    accelerate = speed_settings(args, device)
    checked = check_request(
        configs.transformer,
        configs.vae,
        args.prompt,
        num_train_timesteps=train_steps,
        task=task,
        strength=args.strength,
        video_frames=None if source is None else len(source),
        **request,
    )
    warn_idle_riflex(checked, configs.transformer)
    warn_idle_guidance(checked, args)
    window_stride = windows_stride(args.windows, checked, configs)
    if last_picture is not None:
        check_last_image(checked, configs.vae)
    warn_replaced(*outputs, by=f" by the new {'latents' if latent_output else 'video'}")

    prompt = args.prompt
    if enhancer is not None:  # the first frame goes along: the description must not contradict it
        first = picture if picture is not None else None if extended is None else extended[-1]
        prompt = _enhanced(enhancer, prompt, first, args.quiet)

    scales = args.lora_scale + [1.0] * (len(args.lora) - len(args.lora_scale))
    lora = list(zip(args.lora, scales)) or None
    from cogvideox.parallel import launch

    mesh, device = launch.join(args.parallel, device, configs.transformer, request["guidance_scale"] > 1,
                               one_group=True)
    _quiet_libraries()  # here, as the T5 loads: it imports transformers, seconds a mistake found above saves
    pipe = Pipeline.from_pretrained(
        folder, dtype=args.dtype, device=device, scheduler=args.scheduler, lora=lora, variant=args.variant,
        vae_slicing=args.vae_slicing, **memory_settings(args, device),
    )
    if accelerate:  # folds the LoRAs into the weights first: the fast paths rewrite the linear layers
        pipe.accelerate(**accelerate)
    if global_rank() == 0:  # after quantising, which may let "auto" choose a faster mode
        report_offload(pipe, args, device)
    if mesh is not None:
        from cogvideox.parallel import parallelize

        # The VAE's tiling stays as the single-process run has it (tiles are split when it is on).
        pipe = parallelize(pipe, mesh)  # after `accelerate`: the parallel attention wraps the fast one
    load_time = time.perf_counter() - start
    inputs = dict(image=picture, video=source, strength=args.strength, last_image=last_picture,
                  window_stride=window_stride)  # fmt: skip
    progress = not args.quiet and global_rank() == 0
    if extended is not None:
        result = continue_video(pipe, extended, prompt, seed=args.seed, progress=progress, **request)
    else:
        result = pipe(prompt, seed=args.seed, progress=progress, output_type="latent" if latent_output else "np",
                      **request, **inputs)  # fmt: skip
    fps = args.fps or extended_fps or pipe.default_fps
    launch.leave(mesh)
    if mesh is not None and not mesh.is_leader:
        return 0  # rank 0 writes and reports
    start = time.perf_counter()
    made = _made_with(args, pipe, folder, checked, fps, prompt, lora) | dict(windows=window_stride)
    records = [provenance.record(prompt, result.seed, **made, video_number=[number, len(outputs)])
               for number in range(1, len(outputs) + 1)]  # fmt: skip
    if len(outputs) == 1:
        del records[0]["video_number"]
    if latent_output:
        latents = result.latents[:, result.padding_frames :]
        model = made["settings"].get("model")

        def write(i: int, path: Path) -> None:
            LatentVideo(latents[i], model, fps, "generate", records[i]).save(path)
    else:

        def write(i: int, path: Path) -> None:
            video.export_video(result.frames[i], path, fps, metadata=records[i])

    # A file the folder refuses (a full disk) goes to the temporary folder; the others are still written.
    write_all_or_rescue(outputs, write, "latents file" if latent_output else "video")
    write_time = time.perf_counter() - start

    stages = {"load": load_time, **result.timings, "write": write_time}
    where = ", ".join(str(p) for p in outputs)
    if latent_output:
        shape = "x".join(str(n) for n in latents.shape[1:])
        size = f"latents {shape} for {checked.num_frames} frames at {checked.width}x{checked.height}"
    else:
        frames = result.frames[0]
        size = f"{frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}"
    print(f"wrote {where} ({size}, {fps:g} fps, seed {result.seed}) | " + stage_times(stages) + _levers_report(pipe))
    if latent_output:
        print(f"make the video with: cogvideox decode {shlex.quote(str(outputs[0]))}")
    return 0


def windows_stride(given: int | None, checked, configs) -> int | None:
    """--windows' stride for this request (0 given: half a window), checked before loading; None when off.
    A video no longer than the model's own needs no windows: a warning says so."""
    from cogvideox.request import latent_frame_count
    from cogvideox.windows import check_windows

    if given is None:
        return None
    window = latent_frame_count(configs.transformer.sample_frames, configs.vae)
    stride = check_windows(given or max(1, window // 2), window, configs.transformer)
    if checked.latent_frames <= window:
        own = configs.transformer.sample_frames
        warnings.warn(f"--windows changes nothing at {checked.num_frames} frames: it is for videos longer than the "
                      f"model's own {own} (give more --frames)", stacklevel=2)  # fmt: skip
    return stride


def _made_with(args: argparse.Namespace, pipe, folder: Path, checked, fps: float, prompt: str, lora) -> dict:
    """What `provenance.record` keeps of this run, besides the prompt and seed."""
    from cogvideox.batch import pipeline_levers, scheduler_kind, video_settings

    resize = checked.resize if args.image or args.video else None
    video_fps = None
    if args.video:
        video_fps = sampling_rate(args, pipe.config) or "source"
    levers = pipeline_levers(pipe)
    settings = video_settings(recorded_model(folder), scheduler_kind(pipe.scheduler), checked, fps, levers, resize,
                              variant=args.variant)  # fmt: skip
    return dict(
        settings=settings,
        image=args.image,
        last_image=args.last_image,
        video=args.video,
        video_fps=video_fps,
        strength=checked.strength,
        extend=args.extend,
        lora=[[str(path), scale] for path, scale in lora or []],
        prompt_idea=args.prompt if prompt != args.prompt else None,
        **provenance.lever_settings(pipe),
    )


def _enhanced(enhancer, prompt: str, image, quiet: bool) -> str:
    """`prompt` rewritten by `enhancer` and printed; the prompt as given, with a warning, when the endpoint
    fails (the video is still made)."""
    from cogvideox.enhance import EnhancerError

    if not quiet:
        _say(f"rewriting the prompt with {enhancer.model} at {enhancer.url}")
    try:
        rewritten = enhancer.rewrite(prompt, image)
    except EnhancerError as e:
        warnings.warn(f"{e}; generating from the prompt as given", stacklevel=1)
        return prompt
    print(f"prompt: {rewritten}")
    return rewritten


def stage_times(stages: dict[str, float]) -> str:
    """The time of each stage, as the commands' last lines report them: "load 1.2s, text 0.1s, ..."."""
    return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in stages.items())


def _levers_report(pipe) -> str:
    """The speed levers that ran (what `--attention auto` chose included) and the step cache's count."""
    if pipe.acceleration is None:
        return ""
    report = f" | {pipe.acceleration.describe()}"
    cache = pipe.acceleration.cache
    if cache is not None:
        report += f" | cache {cache.threshold:g}: {cache.computed}/{cache.calls} steps computed"
    return report


# A word of a report this long is a value pasted in the wrong place, not a path: its start is enough.
_LONG_WORD = re.compile(r"[^\s'\";:,]{1000,}")


def _report(error: Exception) -> None:
    line = _LONG_WORD.sub(lambda m: _short(m.group(), keep=100), " ".join(str(error).split()))  # always one line
    _say("cogvideox: error: " + line, error=True)


_PACKAGE = Path(__file__).resolve().parent


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, DeprecationWarning | PendingDeprecationWarning | FutureWarning):
        if not Path(filename).resolve().is_relative_to(_PACKAGE):
            return  # a library's note to its developers (shown under -W default or pytest), not the user's
    _say(f"cogvideox: warning: {message}")


def _out_of_memory(error: BaseException) -> str | None:
    """"GPU" or "host" when `error` is an allocation failure (PyTorch's CUDA one, its CPU allocator's,
    Python's MemoryError), else None."""
    text = str(error).lower()
    if isinstance(error, MemoryError) or "defaultcpuallocator" in text or "can't allocate memory" in text:
        return "host"
    if "out of memory" in text:
        return "GPU"
    return None


def _lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective of torch.distributed that failed because another process went away
    (exited with its own error, or was killed): gloo's closed connection, NCCL's DistBackendError."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available():
        return False
    text = str(error)
    return isinstance(error, distributed.DistError) or "Connection closed by peer" in text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cogvideox` command; returns the exit status. Under torchrun only global rank 0
    prints the error; the others return the same status without a word."""
    handles_sigterm = threading.current_thread() is threading.main_thread()  # signals go to the main thread
    if handles_sigterm:
        previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            args = build_parser().parse_args(argv)
        except KeyboardInterrupt as e:  # Ctrl-C while the libraries load
            _say("cogvideox: interrupted")
            return _interrupted_status(e)
        previous = warnings.showwarning
        warnings.showwarning = _show_warning
        try:
            return _quiet_exit(_run(args))
        finally:
            warnings.showwarning = previous
    except BrokenPipeError:
        return _reader_gone()
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous_handler)


def _reader_gone() -> int:
    """The status of a command whose output's reader went away (`cogvideox info a.mp4 | head -3`): that of a
    program SIGPIPE ended, without a traceback. Whatever it was writing is written by then (a video before its
    report). Standard output is pointed at the null device, so the interpreter's last flush fails no more."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # a stand-in without a descriptor (a test's capture)
        pass
    finally:
        os.close(null)
    return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace) -> int:
    """Run the command; a known failure becomes its one-line report and exit status."""
    try:
        return args.run(args)
    except (InputError, LoadError, ConfigError) as e:
        _report(e)
        return USER_ERROR
    except CogVideoXError as e:  # NonFiniteError and the like: the request was fine, the run was not
        _report(e)
        return RUN_ERROR
    except KeyboardInterrupt as e:
        _say("cogvideox: interrupted")
        return _interrupted_status(e)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        _report(InputError(f"file name too long for the file system: {e.filename}; give a shorter one"))
        return USER_ERROR
    except (RuntimeError, MemoryError) as e:
        if _lost_peer(e):  # the process that failed says why; rank 0 says what became of this one
            _say("cogvideox: error: another process of this torchrun run stopped (its error is above, or in "
                 "torchrun's report), so this one stops too")  # fmt: skip
            return RUN_ERROR
        where = _out_of_memory(e)
        if where is None:
            raise
        _say(f"cogvideox: error: out of {where} memory; try {_memory_advice(args)}", error=True)
        return RUN_ERROR


def _memory_advice(args: argparse.Namespace) -> str:
    """The settings that lower memory, of those this command has: a hint must name only flags it takes."""
    has = vars(args)
    tries = [flag for flag, name in (("--dtype bf16", "dtype"), ("fewer --frames", "frames")) if name in has]
    if "height" in has:
        tries.append("a smaller --height/--width")
    if has.get("num_videos", 1) > 1:
        tries.append("--num-videos 1")
    if "vae_tiling" in has and not has["vae_tiling"]:
        tries.append("--vae-tiling")
    if "offload" in has:
        tries.append("an --offload mode")
    return ", ".join(tries[:-1]) + f" or {tries[-1]}" if len(tries) > 1 else "".join(tries) or "a smaller model"


if __name__ == "__main__":
    sys.exit(main())

"""The `cogvideox` commands around the model: DDIM inversion, SAT checkpoint conversion, prompt rewriting
and captions for fine-tuning data.

    cogvideox invert in.mp4 --prompt "a red ball rolls left" --output latents.safetensors --reconstruct out.mp4
    cogvideox regenerate latents.safetensors --output edit.mp4 --prompt "a blue ball rolls left"
    cogvideox convert sat/transformer --vae sat/vae/3d-vae.pt --base THUDM/CogVideoX-5b --output CogVideoX-5b-ft
    cogvideox enhance --file ideas.txt --prompt-enhancer http://localhost:11434/v1 > prompts.txt
    cogvideox caption clips/ --captioner http://localhost:8000/v1 --captioner-model Qwen2-VL-7B-Instruct

Thin layers over `cogvideox.inversion`, `cogvideox.sat`, `cogvideox.enhance` and `cogvideox.caption`, like
`generate` over `Pipeline`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from cogvideox import provenance
from cogvideox.cli import _interrupted_status, _quiet_libraries, stage_times
from cogvideox.cli_args import (
    MODEL_HELP,
    VIDEO_OUTPUT_HELP,
    add_enhancer_arguments,
    add_memory_arguments,
    add_model_arguments,
    add_resize_argument,
    add_video_rate_argument,
    file_name,
    finite_float,
    frame_rate,
    frame_side,
    locate_model,
    memory_settings,
    model_name,
    non_negative_int,
    positive_int,
    prompt_enhancer,
    report_offload,
    sampling_rate,
    taken_rate,
    warn_replaced,
)
from cogvideox.enhance import ENV_URL, EnhancerError
from cogvideox.errors import InputError
from cogvideox.files import write_or_rescue


def _add_model_args(parser: argparse.ArgumentParser, model_help: str) -> None:
    add_model_arguments(parser, model_help=model_help)
    add_memory_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only the final report")


_MODEL_HELP = "text-to-video " + MODEL_HELP  # inversion runs the text-to-video sampler backwards


def add_tool_parsers(commands) -> None:
    """Add `invert`, `regenerate`, `convert`, `info`, `enhance` and `caption` to the `cogvideox` command's
    sub-parsers."""
    inv = commands.add_parser(
        "invert",
        help="DDIM-invert a video into the noise that regenerates it",
        description="Run the deterministic DDIM sampler backwards from a video to noise latents that "
        "regenerate it (the official CogVideoX inversion tool, without its attention injection). Write the "
        "latents (--output), the regenerated video (--reconstruct), or both; the PSNR of the reconstruction "
        "against the input is printed.",
    )
    arg = inv.add_argument
    arg("video", type=file_name,
        help="the video to invert (any format FFmpeg reads, or PNG frames such as frames/%%04d.png)")
    arg("--prompt", default="", help="caption of the video; regenerate with the same one (default: empty)")
    arg("-o", "--output", type=file_name, help="where to write the inverted latents (.safetensors)")
    arg("--reconstruct", type=file_name,
        help="also regenerate the video from the latents and write it here (.mp4, .gif or frames/%%04d.png)")
    arg(
        "--steps",
        type=positive_int,
        default=50,
        help="DDIM steps, the same both ways; more invert more exactly: try 100 if the reconstruction drifts "
        "(default: 50, as the official tool)",
    )
    arg(
        "--guidance",
        type=finite_float,
        default=1.0,
        help="classifier-free guidance scale for both directions; 1 (off) inverts most faithfully (default: 1)",
    )
    arg(
        "--refine",
        type=non_negative_int,
        default=4,
        help="fixed-point refinements per inversion step, each one more model evaluation; 0 is plain DDIM "
        "inversion, which on zero-terminal-SNR models can bring a video back on the wrong background (default: 4)",
    )
    arg(
        "--frames",
        type=positive_int,
        help="frames of the video to use, 8k+1 (default: the model's count, or all of a shorter video's 8k+1)",
    )
    arg("--height", type=frame_side, help="height to resize the frames to (default: the model's)")
    arg("--width", type=frame_side, help="width to resize the frames to (default: the model's)")
    add_resize_argument(inv)
    arg("--fps", type=frame_rate,
        help="frame rate of the reconstruction (default: the rate the video was sampled at, --video-fps)")
    add_video_rate_argument(inv, "the video", "inverted")
    _add_model_args(inv, _MODEL_HELP)
    inv.set_defaults(run=_invert)

    regen = commands.add_parser(
        "regenerate",
        help="sample a video from inverted latents (the same video, or an edit with a new prompt)",
        description="Sample forward with DDIM from latents written by `cogvideox invert`, with the size, frame "
        "count, steps and guidance they were inverted with. The inversion's prompt gives the video back; a "
        "new --prompt edits it.",
    )
    arg = regen.add_argument
    arg("latents", type=file_name, help="latents written by cogvideox invert (.safetensors)")
    arg("-o", "--output", default="output.mp4", type=file_name,
        help=VIDEO_OUTPUT_HELP + " (default: output.mp4)")
    arg("--prompt", help="a new prompt (default: the one the video was inverted with)")
    arg("--guidance", type=finite_float, help="guidance scale (default: the one used to invert)")
    arg("--fps", type=frame_rate, help="frame rate of the video file (default: the rate the inverted video was "
        "sampled at, or the model's for latents that do not record it)")
    _add_model_args(regen, "the model the latents were inverted with (default: the embedded demo model)")
    regen.set_defaults(run=_regenerate)

    conv = commands.add_parser(
        "convert",
        help="convert an original SAT checkpoint to a model folder in the diffusers layout",
        description="Convert a checkpoint of CogVideoX's own SAT training code (a .pt file or a DeepSpeed "
        "checkpoint folder: the transformer, the VAE or both) to the diffusers layout, completed from a base "
        "model: its configs, T5, tokenizer, scheduler and any component the checkpoint lacks.",
    )
    arg = conv.add_argument
    arg("checkpoint", type=file_name,
        help="SAT .pt file, or a checkpoint folder (with 'latest' or numbered iterations)")
    arg("-o", "--output", required=True, type=file_name, help="new folder to write the model to")
    arg(
        "--base",
        required=True,
        type=model_name,
        help="diffusers-layout model the checkpoint belongs to (folder or repo id, e.g. THUDM/CogVideoX-5b)",
    )
    arg("--vae", type=file_name, help="a separate SAT VAE checkpoint (3d-vae.pt) to convert too")
    arg(
        "--dtype",
        default="bf16",
        help="precision of the written weights: bf16, fp16 or fp32 (default: bf16, the released weights')",
    )
    arg(
        "--trust-pickle",
        action="store_true",
        help="read .pt files that hold Python objects besides tensors (runs their code: trusted files only)",
    )
    arg("--revision", help="hub revision (branch, tag or commit) of --base (default: main)")
    arg("--variant", help="read --base's weights of this variant, e.g. fp16 "
        "(diffusion_pytorch_model.fp16.safetensors), "
        "where a component has them; the written folder holds plain weight files")
    arg("--offline", action="store_true", help="never download --base; use a local folder or the hub cache")
    conv.set_defaults(run=_convert)

    info = commands.add_parser(
        "info",
        help="show how a video was made (prompt, seed, model, settings) and the command that makes it again",
        description="Read the record `generate` and `batch` keep inside each MP4, GIF or PNG frame they write (and "
        "`generate` in a latents file): the model, prompt, seed, sampling settings, inputs and the levers that "
        "change the video, and print it "
        "with the `cogvideox generate` command that makes the same video again. Exit status 1 when a file "
        "holds no record (made by another program, or re-encoded since).",
    )
    info.add_argument("videos", nargs="+", metavar="VIDEO", type=file_name,
                      help="MP4 or GIF files, frames of PNG sequences, or .safetensors latents files")
    info.add_argument("--json", action="store_true",
                      help="print each record as one line of JSON (a file without one is named on stderr)")
    info.set_defaults(run=_info)

    enh = commands.add_parser(
        "enhance",
        help="rewrite prompts into the detailed descriptions CogVideoX was trained on (a chat endpoint)",
        description="Rewrite short prompts into detailed video descriptions with an OpenAI-compatible chat "
        "endpoint, as the official demos do, and print them one per line: for a look before generating, or "
        "for a prompts file to give `cogvideox batch` (`cogvideox enhance --file ideas.txt > prompts.txt`). "
        "`generate --prompt-enhancer URL` does the same for one video on the way.",
    )
    arg = enh.add_argument
    arg("prompts", nargs="*", metavar="PROMPT", help="prompts to rewrite (quote each)")
    arg("--file", type=file_name,
        help="a file of prompts, one per line (blank lines and # comments skipped), as batch reads")
    arg(
        "--image",
        type=file_name,
        help="the first frame the videos will start from (image-to-video), shown to the chat model with every "
        "prompt that has no @@IMAGE of its own",
    )
    add_enhancer_arguments(enh, "the prompts into detailed descriptions")
    enh.set_defaults(run=_enhance)
    _add_caption_parser(commands)


def _add_caption_parser(commands) -> None:
    from cogvideox import caption

    cap = commands.add_parser(
        "caption",
        help="caption a folder of videos for fine-tuning, with a chat model that sees images",
        description="Write a caption for every video of a data folder that has none, with an OpenAI-compatible "
        "chat endpoint whose model sees images (GPT-4o, GLM-4V, Qwen2-VL under vLLM, llava under Ollama...): "
        "it is shown a few frames spread over each clip and writes the dense paragraph CogVideoX was trained "
        "on. Captions go into FOLDER/metadata.jsonl, the layout `cogvideox train` reads, rewritten after each "
        "one: stop at any time and run again to go on. Captions already there are kept (those of prompts.txt + "
        "videos.txt too, carried over). A video that cannot be decoded is reported and skipped; the run stops "
        f"when the endpoint fails for {caption.STOP_AFTER} videos in a row. Exit status 1 when the endpoint "
        "failed for any video (run again for those).",
    )
    arg = cap.add_argument
    arg("folder", type=file_name,
        help="the data folder; its videos, in subfolders too (hidden ones left out), are captioned")
    arg(
        "--captioner",
        metavar="URL",
        default=os.environ.get(caption.ENV_URL) or None,
        help=f"the chat endpoint, such as http://localhost:8000/v1 (default: ${caption.ENV_URL}); its key from "
        f"${caption.ENV_KEY}",
    )
    arg(
        "--captioner-model",
        metavar="NAME",
        default=os.environ.get(caption.ENV_MODEL) or caption.DEFAULT_MODEL,
        help=f"its model, one that sees images (default: ${caption.ENV_MODEL}, else {caption.DEFAULT_MODEL})",
    )
    arg("--frames", type=positive_int, default=caption.DEFAULT_FRAMES,
        help=f"frames shown per video, spread from its start to its end (default {caption.DEFAULT_FRAMES}, at most "
        "32)")  # fmt: skip
    arg("--context", help="what the clips have in common (who or what is in them, their style), told to the "
        "model so it names things as you do")  # fmt: skip
    arg("--prefix", default="", help="text put before each new caption, such as the trigger of a LoRA: "
        "'In the xyz style, '")  # fmt: skip
    arg("--overwrite", action="store_true", help="caption again the videos that have a caption")
    arg("--jobs", type=positive_int, default=1,
        help="videos captioned at once (a remote API takes several; default: 1)")
    arg("--quiet", action="store_true", help="no progress bar, only the report")
    cap.set_defaults(run=_caption)


# Below this PSNR a reconstruction is another video (a plain inversion on the demo model: 0.3-6 dB).
POOR_RECONSTRUCTION_DB = 20.0


def _load(args: argparse.Namespace, device, folder):
    from cogvideox.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folder, dtype=args.dtype, device=device, variant=args.variant,
                                    **memory_settings(args, device))  # fmt: skip
    report_offload(pipe, args, device)
    return pipe


def _invert(args: argparse.Namespace) -> int:
    from cogvideox import conditioning
    from cogvideox.inversion import check_inversion, invert, psnr, reconstruct
    from cogvideox.latents import check_latents_path
    from cogvideox.request import frames_to_read
    from cogvideox.video import check_video_path, export_or_rescue

    latents_path = None if args.output is None else check_latents_path(args.output)
    video_path = check_video_path(args.reconstruct, "--reconstruct") if args.reconstruct else None
    if latents_path is None and video_path is None:
        raise InputError("nothing to write: give --output LATENTS.safetensors and/or --reconstruct VIDEO.mp4")
    _quiet_libraries()
    start = time.perf_counter()
    device, folder, configs = locate_model(args)
    # An undecodable file fails before the model loads; of a long one, only the frames used are decoded.
    rate = sampling_rate(args, configs.transformer)
    frames = conditioning.load_video(args.video, frames_to_read(args.frames, configs.transformer), rate)
    taken = taken_rate(rate, args.video)
    sampling = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, num_frames=args.frames,
                    height=args.height, width=args.width, resize=args.resize)  # fmt: skip
    check_inversion(  # as does every mistake the configs reveal
        configs.transformer,
        configs.vae,
        args.prompt,
        len(frames),
        num_train_timesteps=configs.scheduler.num_train_timesteps,
        **sampling,
    )
    warn_replaced(latents_path, video_path)
    pipe = _load(args, device, folder)
    load_time = time.perf_counter() - start

    start = time.perf_counter()
    inversion = invert(
        pipe,
        frames,
        args.prompt,
        **sampling,
        fixed_point_iterations=args.refine,
        progress=not args.quiet,
    )
    inversion.fps = taken
    size = f"{inversion.width}x{inversion.height}"
    report = [f"inverted {inversion.num_frames} frames at {size} in {args.steps} steps"]
    if latents_path is not None:
        write_or_rescue(latents_path, inversion.save, "latents file")
        report.append(f"wrote {latents_path}")
    if video_path is not None:
        video = reconstruct(pipe, inversion, progress=not args.quiet).frames[0]
        made = provenance.remade_record("invert", args.video)
        export_or_rescue(video, video_path, fps=args.fps or taken or pipe.default_fps, metadata=made)
        used = conditioning.resize_frames(
            frames[: inversion.num_frames], inversion.height, inversion.width, args.resize
        )
        quality = psnr(video, used)
        report.append(f"wrote {video_path} (PSNR {quality:.2f} dB against the input)")
        if quality < POOR_RECONSTRUCTION_DB:
            warnings.warn(
                f"the reconstruction is {quality:.1f} dB from the input: the inversion went astray; raise "
                f"--refine (now {args.refine}) or --steps (now {args.steps})",
                stacklevel=1,
            )
    print(" | ".join(report) + f" | load {load_time:.1f}s, run {time.perf_counter() - start:.1f}s")
    return 0


def _regenerate(args: argparse.Namespace) -> int:
    from cogvideox.inversion import Inversion, check_regeneration, reconstruct
    from cogvideox.video import check_video_path, export_or_rescue

    output = check_video_path(args.output, "--output")
    inversion = Inversion.load(args.latents)
    _quiet_libraries()
    start = time.perf_counter()
    device, folder, configs = locate_model(args)
    check_regeneration(  # latents of another model fail before this one loads
        configs.transformer,
        configs.vae,
        inversion,
        args.prompt,
        guidance_scale=args.guidance,
        num_train_timesteps=configs.scheduler.num_train_timesteps,
    )
    warn_replaced(output, by=" by the regenerated video")
    pipe = _load(args, device, folder)
    load_time = time.perf_counter() - start
    result = reconstruct(pipe, inversion, prompt=args.prompt, guidance_scale=args.guidance, progress=not args.quiet)
    video = result.frames[0]
    fps = args.fps or inversion.fps or pipe.default_fps
    start = time.perf_counter()
    made = provenance.remade_record("regenerate", args.latents, prompt_edit=args.prompt)
    export_or_rescue(video, output, fps=fps, metadata=made)
    stages = {"load": load_time, **result.timings, "write": time.perf_counter() - start}
    print(
        f"wrote {output} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}, {fps:g} fps) | "
        + stage_times(stages)
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from cogvideox.latents import describe_unrecorded, is_latents_path, read_record
    from cogvideox.video import read_metadata

    # Every file is read before any output.
    found = [(path, read_record(path) if is_latents_path(path) else read_metadata(path)) for path in args.videos]
    status = 0
    for path, metadata in found:
        if not provenance.is_record(metadata):
            note = (describe_unrecorded(path) if is_latents_path(path)
                    else provenance.describe_remade(path, metadata)
                    or f"{path}: no cogvideox record (made by another program, or re-encoded since)")  # fmt: skip
            print(note, file=sys.stderr if args.json else sys.stdout)  # --json: stdout holds JSON alone
            status = 1
        elif (damage := provenance.damage(metadata)) is not None:
            print(f"{path}: its cogvideox record is damaged ({damage})", file=sys.stderr if args.json else sys.stdout)
            status = 1
        elif args.json:
            print(json.dumps({"file": str(path), **metadata}, ensure_ascii=False))
        else:
            print("\n".join([f"{path}:", *provenance.describe(metadata, Path(path).suffix.lower())]))
    return status


def _enhance(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from cogvideox import conditioning
    from cogvideox.batch import IMAGE_SEPARATOR, as_prompt_line, read_prompts, split_lines

    if any(not p.strip() for p in args.prompts):
        raise InputError("an empty prompt: give each prompt some words")
    given = Path(args.image) if args.image else None
    # (prompt, the image the chat model sees, what follows the rewrite on its line)
    work = [(p, given, "") for p in args.prompts]
    if args.file:  # a batch file's PROMPT@@IMAGE lines keep their image, which the chat model sees too
        root = Path(args.file).parent
        for line in split_lines(read_prompts(args.file)):
            if line.image is None:
                work.append((line.prompt, given, ""))
            else:
                work.append((line.prompt, root / line.image, IMAGE_SEPARATOR + line.image))
    if not work:
        raise InputError("no prompts: give them as arguments or with --file")
    enhancer = prompt_enhancer(args)
    if enhancer is None:
        raise InputError("no endpoint: give --prompt-enhancer URL (such as http://localhost:11434/v1) or set "
                         f"${ENV_URL}")  # fmt: skip
    # Every image decodes before the first request.
    images = {path: conditioning.load_image(path) for _, path, _ in work if path is not None}
    # One line per prompt, flushed as it comes: a redirect into a prompts file keeps what was rewritten.
    bar = tqdm(work, desc="rewriting", unit="prompt", disable=len(work) < 2)
    for number, (prompt, path, kept) in enumerate(bar):
        try:
            rewrite = enhancer.rewrite(prompt, images.get(path))
        except EnhancerError as e:  # say where it stopped: the prompts from there on are for another run
            raise EnhancerError(f"no rewrite of prompt {number + 1} of {len(work)} ({prompt[:40]!r}; the {number} "
                                f"before it are printed): {e}") from None  # fmt: skip
        line = as_prompt_line(rewrite)
        if not line:  # an answer of Markdown marks alone: the prompt keeps its line, as given
            warnings.warn(f"the rewrite of prompt {number + 1} ({prompt[:40]!r}) holds no words; it is printed as "
                          "given", stacklevel=1)  # fmt: skip
            line = as_prompt_line(prompt)
        print(line + kept, flush=True)
    return 0


def _caption(args: argparse.Namespace) -> int:
    from cogvideox import caption
    from cogvideox.train.data import METADATA_FILE

    url = (args.captioner or "").strip()
    if not url:
        raise InputError(
            f"no endpoint: give --captioner URL (such as http://localhost:8000/v1) or set ${caption.ENV_URL}"
        )
    if not url.lower().startswith(("http://", "https://")):
        raise InputError(f"--captioner {url}: give the endpoint's address, such as http://localhost:8000/v1")
    captioner = caption.VideoCaptioner(
        url, args.captioner_model, os.environ.get(caption.ENV_KEY) or None, frames=args.frames, context=args.context
    )
    metadata = Path(args.folder) / METADATA_FILE
    try:
        report = caption.caption_folder(args.folder, captioner, args.prefix, args.overwrite, args.jobs, not args.quiet)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM: the captions written are kept; say how many
        stopped = getattr(e, "report", None)
        if stopped is None:  # before captioning began
            raise
        written = len(stopped.written)
        print(f"cogvideox caption: interrupted; {written} caption{'s' * (written != 1)} written and kept in "
              f"{metadata}, {stopped.left} video{'s' * (stopped.left != 1)} left to caption; run again to go on",
              file=sys.stderr)  # fmt: skip
        return _interrupted_status(e)
    for video, why in report.skipped:
        print(f"cogvideox caption: skipped {video}: {why}", file=sys.stderr)
    for video, why in report.failed:
        print(f"cogvideox caption: no caption for {video}: {why}", file=sys.stderr)
    summary = f"{len(report.written)} captions written to {metadata}" if report.written else "no caption written"
    print(f"{summary}; {report.kept} kept, {len(report.skipped)} skipped, {len(report.failed)} failed")
    if report.stopped:
        print(f"cogvideox caption: stopped: {report.stopped}; run again to go on", file=sys.stderr)
    return 1 if report.failed else 0


def _convert(args: argparse.Namespace) -> int:
    from cogvideox import loading, sat

    dtype = loading.parse_dtype(args.dtype)
    base = loading.resolve_model_dir(args.base, revision=args.revision, local_files_only=args.offline,
                                     variant=args.variant)  # fmt: skip
    start = time.perf_counter()
    converted = sat.convert(args.checkpoint, base, args.output, dtype, vae=args.vae, trust_pickle=args.trust_pickle,
                            variant=args.variant)  # fmt: skip
    names = {"transformer": "transformer", "vae": "VAE"}
    taken = [names[n] for n in names if n not in converted]
    parts = " and ".join(names[n] for n in converted) + " converted"
    if taken:
        parts += f"; {' and '.join(taken)} copied from {args.base}"
    print(f"wrote {args.output} (diffusers layout, {args.dtype}; {parts}) in {time.perf_counter() - start:.1f}s")
    return 0

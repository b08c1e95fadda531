"""`cogvideox encode` and `cogvideox decode`: the VAE on its own, over latent files (`cogvideox.latents`).

    cogvideox generate "a red ball rolls left" --model THUDM/CogVideoX-5b -o ball.safetensors
    cogvideox decode ball.safetensors --vae-tiling          # ball.mp4, the video generate would have written
    cogvideox encode clip.mp4 -o clip.safetensors --reconstruct round-trip.mp4

Thin layers over `VideoAutoencoder` and `LatentVideo`: decoding loads the VAE alone (none of T5 or the
transformer), so latents denoised on a large GPU decode on a small one, or after the GPU is free.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cogvideox import provenance
from cogvideox.cli_args import (
    MODEL_HELP,
    VIDEO_OUTPUT_HELP,
    add_model_arguments,
    add_resize_argument,
    add_video_rate_argument,
    file_name,
    frame_rate,
    frame_side,
    positive_int,
    recorded_model,
    sampling_rate,
    taken_rate,
    warn_replaced,
)
from cogvideox.errors import InputError

_TILING_HELP = ("encode or decode in overlapping tiles: much less GPU memory; pixels near tile seams differ "
                "slightly, as in the reference's tiled decode (default: off)")  # fmt: skip


def add_latent_parsers(commands) -> None:
    """Add `encode` and `decode` to the `cogvideox` command's sub-parsers."""
    dec = commands.add_parser(
        "decode",
        help="decode latents (generate --output NAME.safetensors, or encode) into a video, with the VAE alone",
        description="Decode a latents file into a video with the model's VAE alone: latents written by "
        "`cogvideox generate --output NAME.safetensors` give the video generate would have written, pixel for "
        "pixel, with its record for `cogvideox info`; latents written by `cogvideox encode` give the VAE's "
        "reconstruction of the encoded video.",
    )
    arg = dec.add_argument
    arg("latents", type=file_name, help="the latents file (.safetensors)")
    arg("-o", "--output", type=file_name,
        help=VIDEO_OUTPUT_HELP + " (default: the latents' name with .mp4)")
    arg("--fps", type=frame_rate, help="frame rate of the video file (default: the one the latents record)")
    add_model_arguments(dec, model_help="model whose VAE decodes, a folder or a Hugging Face repo id (default: "
                        "the model the latents record; the embedded demo model for its latents)")  # fmt: skip
    arg("--vae-tiling", action="store_true", help=_TILING_HELP)
    arg("--quiet", action="store_true", help="no progress bar, only the final report")
    dec.set_defaults(run=_decode)

    enc = commands.add_parser(
        "encode",
        help="encode a video into the latents the transformer denoises, with the VAE alone",
        description="Encode a video into latents with the model's VAE alone, as the pipeline prepares a video "
        "(pixels in [-1, 1], the posterior's mean times the VAE's scaling factor), and write them as a "
        "safetensors file; --reconstruct also decodes them and prints the PSNR of the round trip.",
    )
    arg = enc.add_argument
    arg("video", type=file_name,
        help="the video to encode (any format FFmpeg reads, or PNG frames such as frames/%%04d.png)")
    arg("-o", "--output", type=file_name, help="where to write the latents (.safetensors)")
    arg("--reconstruct", type=file_name,
        help="also decode the latents and write the video here (.mp4, .gif or frames/%%04d.png)")
    arg("--frames", type=positive_int,
        help="frames of the video to encode, 8k+1 (default: the model's count, or the longest 8k+1 prefix of a "
        "shorter video)")  # fmt: skip
    arg("--height", type=frame_side, help="height to resize the frames to, a multiple of 8 (default: the model's)")
    arg("--width", type=frame_side, help="width to resize the frames to, a multiple of 8 (default: the model's)")
    add_resize_argument(enc)
    add_video_rate_argument(enc, "the video", "encoded")
    arg("--fps", type=frame_rate,
        help="frame rate the latents record, and of the reconstruction (default: --video-fps, else the model's)")
    add_model_arguments(enc, model_help="model whose VAE encodes: " + MODEL_HELP)
    arg("--vae-tiling", action="store_true", help=_TILING_HELP)
    arg("--quiet", action="store_true", help="no progress bar, only the final report")
    enc.set_defaults(run=_encode)


def _decode(args: argparse.Namespace) -> int:
    from cogvideox.autoencoder import VideoAutoencoder
    from cogvideox.latents import LatentVideo
    from cogvideox.video import check_video_path, export_or_rescue

    start = time.perf_counter()
    latent = LatentVideo.load(args.latents)
    output = check_video_path(args.output or Path(args.latents).with_suffix(".mp4"), "--output")
    model = args.model if args.model is not None else latent.model
    if args.model is None and model is not None and Path(model).is_absolute() and not Path(model).exists():
        raise InputError(f"the latents were made with the model in {model}, which is not there any more; "
                         "name its folder or hub id with --model")  # fmt: skip
    vae = VideoAutoencoder.from_pretrained(model, args.dtype, args.device, revision=args.revision, variant=args.variant,
                                           local_files_only=args.offline, tiling=args.vae_tiling)  # fmt: skip
    vae.check_latents(latent.latents)
    warn_replaced(output, by=" by the decoded video")  # once the request is known to be good
    load_time = time.perf_counter() - start
    start = time.perf_counter()
    frames = vae.decode(latent.latents, progress=not args.quiet)
    decode_time = time.perf_counter() - start
    fps = args.fps or latent.fps
    start = time.perf_counter()
    remade = provenance.remade_record("encode", latent.source) if latent.made_by == "encode" and latent.source else None
    export_or_rescue(frames, output, fps, metadata=_at_rate(latent.record, fps) or remade)
    print(f"wrote {output} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, {fps:g} fps) | load "
          f"{load_time:.1f}s, decode {decode_time:.1f}s, write {time.perf_counter() - start:.1f}s")  # fmt: skip
    return 0


def _at_rate(record: dict | None, fps: float) -> dict | None:
    """A generation's record for its video written at `fps`: the rate is a setting of the video, and
    `cogvideox info`'s command must make the file that holds it."""
    return None if record is None else record | {"fps": fps}


def _encode(args: argparse.Namespace) -> int:
    from cogvideox import conditioning, loading
    from cogvideox.autoencoder import VideoAutoencoder
    from cogvideox.inversion import psnr
    from cogvideox.latents import LatentVideo, check_latents_path
    from cogvideox.request import check_video_frames, default_fps, default_size, frames_to_read
    from cogvideox.video import check_video_path, export_video

    latents_path = None if args.output is None else check_latents_path(args.output)
    video_path = None if args.reconstruct is None else check_video_path(args.reconstruct, "--reconstruct")
    if latents_path is None and video_path is None:
        raise InputError("nothing to write: give --output LATENTS.safetensors and/or --reconstruct VIDEO.mp4")
    start = time.perf_counter()
    loading.parse_dtype(args.dtype)
    only = ("vae",)  # of the weights, the VAE's alone are needed (and fetched from the hub)
    folder = loading.resolve_model_dir(args.model, revision=args.revision, local_files_only=args.offline,
                                       components=only, variant=args.variant)  # fmt: skip
    configs = loading.read_model_configs(folder, only, args.variant)
    transformer, vae_config = configs.transformer, configs.vae
    rate = sampling_rate(args, transformer)
    frames = conditioning.load_video(args.video, frames_to_read(args.frames, transformer), rate)
    count = check_video_frames(args.frames, len(frames), transformer, vae_config)
    native = default_size(transformer, vae_config)
    height, width = args.height or native[0], args.width or native[1]
    multiple = vae_config.spatial_compression
    for flag, value in (("--height", height), ("--width", width)):
        if value % multiple:
            raise InputError(f"{flag} must be a multiple of {multiple}, got {value}")
    warn_replaced(latents_path, video_path)  # once the request is known to be good
    vae = VideoAutoencoder.from_pretrained(folder, args.dtype, args.device, variant=args.variant,
                                           tiling=args.vae_tiling)  # fmt: skip
    load_time = time.perf_counter() - start

    start = time.perf_counter()
    latents = vae.encode(frames[:count], height, width, args.resize)
    fps = args.fps or taken_rate(rate, args.video) or default_fps(transformer)
    report = [f"encoded {count} frames at {width}x{height} into latents {'x'.join(map(str, latents.shape))}"]
    if latents_path is not None:
        LatentVideo(latents, recorded_model(folder), fps, "encode", source=str(args.video)).save(latents_path)
        report.append(f"wrote {latents_path}")
    if video_path is not None:
        video = vae.decode(latents, progress=not args.quiet)
        export_video(video, video_path, fps=fps, metadata=provenance.remade_record("encode", args.video))
        used = conditioning.resize_frames(frames[:count], height, width, args.resize)
        report.append(f"wrote {video_path} (PSNR {psnr(video, used):.2f} dB against the input)")
    print(" | ".join(report) + f" | load {load_time:.1f}s, run {time.perf_counter() - start:.1f}s")
    return 0

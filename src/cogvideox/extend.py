"""Longer videos: a clip continued from its last frame by an image-to-video model.

A CogVideoX model makes one clip at a time (6 s for 1.0, 10 s for 1.5); the official project's answer to
"longer videos" is to chain clips, each image-to-video clip starting from the last frame of the one
before. `continue_video` does one link of that chain: the new clip is generated at the video's own size
with its last frame as the first frame, and appended without its first frame (the model's redrawing of
the frame the video already ends on), so the video's frames stay as they were and none repeats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cogvideox.errors import InputError
from cogvideox.request import size_step
from cogvideox.video import as_frames


def check_extendable(transformer, vae, frames: np.ndarray, height: int | None, width: int | None) -> None:
    """The mistakes `continue_video` would make, found before loading (from the transformer's and the VAE's
    configs): a text-to-video model, a size other than the video's, or a video whose size the model cannot
    draw (whole patches: multiples of 16 for the released models)."""
    if not transformer.is_image_to_video:
        raise InputError(
            "extending a video needs an image-to-video model (such as THUDM/CogVideoX-5b-I2V): it starts the "
            "new clip from the video's last frame; this model is text-to-video"
        )
    _, video_height, video_width, _ = frames.shape
    for name, asked, own in (("height", height, video_height), ("width", width, video_width)):
        if asked is not None and asked != own:
            raise InputError(
                f"the new clip is appended to the video, so it has the video's {name}, {own}; got {name} {asked}"
            )
    multiple = size_step(transformer, vae)
    if video_height % multiple or video_width % multiple:
        raise InputError(
            f"the new clip is drawn at the video's size, {video_width}x{video_height}, and this model draws "
            f"widths and heights in multiples of {multiple}: resize or crop the video to such a size first"
        )


def continue_video(pipe, frames: np.ndarray | Sequence, prompt: str | Sequence[str], **call):
    """`frames` (uint8 [F, H, W, 3], e.g. `read_video(path)[0]`) followed by a new clip that `pipe`, an
    image-to-video `Pipeline`, draws from their last frame for `prompt`, at their size. `call` takes the
    pipeline's keyword arguments (seed, num_frames, num_inference_steps, ...), not `image` or `video`.

    Returns the pipeline's `VideoOutput` with each video's frames the whole, extended video:
    F + num_frames - 1 frames.
    """
    frames = as_frames(frames)
    for taken in ("image", "video", "strength"):
        if call.get(taken) is not None:
            raise InputError(f"{taken} cannot be given when extending a video: its last frame is the image")
    call = {k: v for k, v in call.items() if k not in ("image", "video", "strength")}
    check_extendable(pipe.config, pipe.vae.config, frames, call.get("height"), call.get("width"))
    _, height, width, _ = frames.shape
    call.update(height=height, width=width)
    result = pipe(prompt, image=frames[-1], **call)
    if result.frames is not None:
        result.frames = [np.concatenate([frames, clip[1:]]) for clip in result.frames]
    return result

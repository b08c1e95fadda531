"""Videos longer than the model's own from overlapping windows of its own length (Gen-L-Video, FreeNoise).

A CogVideoX 1.0 model was trained on 13 latent frames (49 video frames). For more, each denoising step runs
the transformer on windows of 13 latent frames, `stride` apart, each with the positions it was trained
on, and blends the windows' predictions where they overlap, the weights tapering towards each window's
edges so that no seam shows. Every frame is then denoised as a frame of a clip the model knows. With
`reschedule`, the starting noise is FreeNoise's: the frames past the first window repeat the first
window's noise in a shuffled order, so that the windows start from correlated noise and agree sooner.

Unlike RIFLEx (`riflex=True`), which works through the rotary positions of 5B and 1.5 up to about twice
the trained length, windows need nothing of the positions: 2B (sin-cos positions) goes longer too, and
to any length; the cost is one transformer pass per window (each window's attention is cheaper than the
whole video's). On the demo model see BENCHMARKS.md.
"""

from __future__ import annotations

import torch

from cogvideox.errors import InputError
from cogvideox.schedulers import randn


def window_starts(frames: int, window: int, stride: int) -> list[int]:
    """The first latent frame of each window: every `stride`, the last one ending on the last frame."""
    starts = list(range(0, max(frames - window, 0) + 1, stride))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return starts


def taper(length: int, device=None) -> torch.Tensor:
    """A window's blending weights per frame: 1 in the middle, falling linearly to 1/(m+1) at its edges
    (m: half the window), never zero, so a frame that only one window covers keeps that window's value."""
    middle = (length - 1) / 2
    return 1.0 - torch.abs(torch.arange(length, device=device, dtype=torch.float32) - middle) / (middle + 1)


class WindowedDenoiser:
    """The transformer as a denoiser of more latent frames than it was trained on, window by window.

    `model(hidden_states, encoder_hidden_states, timestep, image_rotary_emb=...)` (the transformer, or a
    wrapper of it) is called once per window of `window` frames with `rotary`, the rotary table of that
    many frames (None for models without RoPE: their sin-cos table follows the input's length); the blend
    is computed in fp32.
    """

    def __init__(self, model, window: int, stride: int, rotary=None) -> None:
        self.model, self.window, self.stride, self.rotary = model, window, stride, rotary

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states, timestep, image_rotary_emb=None):
        """The blended prediction for `hidden_states` [B, F, C, h, w]; `image_rotary_emb`, the table of all F
        frames that the sampler passes, is not used: each window gets the table of its own length."""
        frames = hidden_states.shape[1]
        weights = taper(self.window, hidden_states.device)
        total = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        cover = torch.zeros(frames, dtype=torch.float32, device=hidden_states.device)
        for start in window_starts(frames, self.window, self.stride):
            part = hidden_states[:, start : start + self.window]
            out = self.model(part, encoder_hidden_states, timestep, image_rotary_emb=self.rotary)
            total[:, start : start + self.window] += out.float() * weights[None, :, None, None, None]
            cover[start : start + self.window] += weights
        return (total / cover[None, :, None, None, None]).to(hidden_states.dtype)


def rescheduled_noise(shape, window: int, generator, device, dtype) -> torch.Tensor:
    """FreeNoise's starting noise [B, F, C, h, w]: the first `window` frames drawn as the pipeline draws
    noise, every later frame a copy of one of them, in a shuffled order per window-long stretch (the
    order drawn from the same generator, so a seed gives the same video)."""
    first = randn((shape[0], window, *shape[2:]), generator, device=device, dtype=dtype)
    order_generator = generator[0] if isinstance(generator, list) else generator
    stretches, done = [first], window
    while done < shape[1]:
        order = torch.randperm(window, generator=order_generator, device=order_generator.device)
        order = order[: min(window, shape[1] - done)].to(first.device)
        stretches.append(first[:, order])
        done += len(order)
    return torch.cat(stretches, dim=1)


def check_windows(stride, window: int, transformer_config) -> int | None:
    """`window_stride` as an int in 1..window (None: off), or `InputError`: windows run text- and
    video-to-video models of CogVideoX 1.0 (an image-to-video model's first frame belongs to one window;
    1.5 pairs latent frames in its patches)."""
    if stride is None:
        return None
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise InputError(f"window_stride must be a whole number of latent frames from 1 to {window}, got {stride!r}")
    if transformer_config.is_image_to_video:
        raise InputError("windows are for text-to-video models: an image-to-video model's first frame belongs to "
                         "the first window only")  # fmt: skip
    if transformer_config.patch_size_t is not None:
        raise InputError("windows are for CogVideoX 1.0 (2B, 5B); CogVideoX 1.5 pairs latent frames in its patches")
    return stride

"""DDIM inversion: the noise from which the deterministic DDIM sampler regenerates a given video.

DDIM (arXiv 2010.02502, eta = 0) is the Euler discretisation of an ODE, so it can run backwards: from the
clean latents x_0 up to pure noise x_T, each step evaluating the model at the current, less noisy point
with the next timestep's label (the approximation DDIM inversion makes, as the reference's
`DDIMInverseScheduler` and CogVideoX's official inversion tool do). Sampling forward from x_T with the
same prompt and guidance then retraces the path, up to the error of that approximation, which shrinks
as the steps get more numerous; a new prompt edits the video while keeping its layout and motion.

The official tool also injects the inverted trajectory's attention keys and values while regenerating;
that needs a hook inside the attention and is not done here: we regenerate by plain sampling.

    inversion = invert(pipe, "in.mp4", prompt="a red ball rolls left")
    inversion.save("latents.safetensors")
    video = reconstruct(pipe, inversion).frames[0]
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cogvideox import conditioning
from cogvideox.errors import InputError, NonFiniteError
from cogvideox.files import write_into_place
from cogvideox.models.config import ConfigError, TransformerConfig, VAEConfig
from cogvideox.request import (
    GenerationRequest,
    check_request,
    check_video_frames,
    frames_to_read,
)
from cogvideox.sampling import DenoiseInputs, denoise, guidance_schedule, predict_velocity
from cogvideox.schedulers import DDIMScheduler, predict_x0
from cogvideox.values import is_finite_number

FORMAT = "cogvideox-ddim-inversion"


# ---------------------------------------------------------------------------------------------------
# The step


def predict_noise(model_output: torch.Tensor, sample: torch.Tensor, ab_t: torch.Tensor, prediction_type: str):
    """The noise implied by the model's prediction at noise level ab_t (defined at ab_t = 1 too)."""
    if prediction_type == "v_prediction":
        # x_t = sqrt(ab) x0 + sqrt(1-ab) eps and v = sqrt(ab) eps - sqrt(1-ab) x0
        return ab_t**0.5 * model_output + (1 - ab_t) ** 0.5 * sample
    if prediction_type == "epsilon":
        return model_output
    raise ConfigError(f"DDIM inversion needs a v_prediction or epsilon model, not {prediction_type!r}")


def ddim_inverse_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    ab_from: torch.Tensor,
    ab_to: torch.Tensor,
    prediction_type: str = "v_prediction",
) -> torch.Tensor:
    """One DDIM step backwards: from noise level ab_from up to the noisier ab_to, keeping the predicted
    x0 and noise: sqrt(ab_to) x0 + sqrt(1 - ab_to) eps."""
    x0 = predict_x0(model_output, sample, ab_from, prediction_type)
    eps = predict_noise(model_output, sample, ab_from, prediction_type)
    return ab_to**0.5 * x0 + (1 - ab_to) ** 0.5 * eps


def fixed_point_inverse_step(
    velocity_at,
    sample: torch.Tensor,
    ab_from: torch.Tensor,
    ab_to: torch.Tensor,
    iterations: int,
    prediction_type: str = "v_prediction",
) -> torch.Tensor:
    """The DDIM inverse step, refined: the point x at level ab_to whose forward DDIM step lands on
    `sample`, found by fixed-point iteration.

    Plain DDIM inversion takes the noise predicted at the start of the step, `sample`, as if the model's
    prediction did not change over the step. The forward step from x uses the prediction at x, so each
    iteration predicts the noise at the current x and moves x to where the forward step with that noise
    would start (x = sqrt(ab_to) x0 + sqrt(1 - ab_to) eps, with x0 such that the step lands on
    `sample`). `velocity_at(x)` is the model's output at x for this step's timestep.
    """

    def start_for(eps: torch.Tensor) -> torch.Tensor:
        """Where a forward step with noise `eps` must start to land on `sample`."""
        x0 = (sample - (1 - ab_from) ** 0.5 * eps) / ab_from**0.5
        return ab_to**0.5 * x0 + (1 - ab_to) ** 0.5 * eps

    eps = predict_noise(velocity_at(sample), sample, ab_from, prediction_type)
    for _ in range(iterations):
        x = start_for(eps)
        eps = predict_noise(velocity_at(x), x, ab_to, prediction_type)
    return start_for(eps)


class InverseDDIM:
    """A DDIM scheduler run backwards, usable by `sampling.denoise` in place of a scheduler.

    Its timesteps are the forward ones reversed (19, 39, ..., 999 for 50 trailing steps); the step at
    timestep t moves from the level the forward step at t lands on (t - 1000 // n, clean data past the
    end) up to t.
    """

    def __init__(self, scheduler: DDIMScheduler, num_inference_steps: int) -> None:
        self.forward = DDIMScheduler(scheduler.config, exact_stride=scheduler.exact_stride)
        self.forward.set_timesteps(num_inference_steps)
        self.timesteps = self.forward.timesteps.flip(0)

    def _level(self, t: int) -> torch.Tensor:
        return self.forward.alphas_cumprod[t] if t >= 0 else self.forward.final_alpha_cumprod

    def levels(self, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """(ab_from, ab_to): the noise levels the step at `timestep` moves between."""
        t = int(timestep)
        return self._level(self.forward.previous_timestep(t)), self._level(t)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor):
        """Returns `(next_sample, None)`, the shape of a scheduler's step."""
        ab_from, ab_to = self.levels(timestep)
        return ddim_inverse_step(model_output, sample, ab_from, ab_to, self.forward.config.prediction_type), None


# ---------------------------------------------------------------------------------------------------
# Inverting a video and regenerating it


# The kind of each field of an inversion file's request, as `Inversion` holds it.
_REQUEST_KINDS = {"prompt": "text", "negative_prompt": "text", "guidance_scale": "number", "fps": "rate",
                  "num_inference_steps": "count", "num_frames": "count", "height": "count", "width": "count",
                  "max_sequence_length": "count"}  # fmt: skip


def _checked_request(path: Path, request) -> dict:
    """An inversion file's request, each field of its kind; `InputError` naming the first that is not
    (an edited or damaged file: a traceback later, in the middle of a regeneration)."""
    damaged = f"cannot read {path} as a DDIM inversion: its request is damaged"
    if not isinstance(request, dict):
        raise InputError(f"{damaged} (a JSON {type(request).__name__}, not an object)")
    for key, kind in _REQUEST_KINDS.items():
        value = request.get(key)
        if value is None and key == "fps":
            continue
        fits, wanted = {
            "text": (isinstance(value, str), "a string"),
            "number": (is_finite_number(value) and value >= 0, "a number >= 0"),
            "rate": (is_finite_number(value) and value > 0, "a positive number"),
            "count": (type(value) is int and value > 0, "a positive integer"),
        }[kind]
        if not fits:
            raise InputError(f"{damaged} ({key} is {value!r}, not {wanted})")
    return request


@dataclass
class Inversion:
    """Inverted latents and what they were inverted with: regenerating needs the same request."""

    latents: torch.Tensor  # [1, F, C, h, w] at the first sampling timestep, 1.5 padding frame included
    prompt: str
    negative_prompt: str
    guidance_scale: float
    num_inference_steps: int
    num_frames: int
    height: int
    width: int
    max_sequence_length: int
    fps: float | None = None  # the rate the inverted frames were taken at, when known: regenerations play at it

    def save(self, path: str | os.PathLike) -> Path:
        """Write the latents and the request as a safetensors file, whole or not at all (an earlier file
        stays until the new one is complete)."""
        meta = {k: v for k, v in asdict(self).items() if k != "latents"}
        metadata = {"format": FORMAT, "request": json.dumps(meta)}
        tensors = {"latents": self.latents.detach().cpu().contiguous()}
        return write_into_place(Path(path), lambda temporary: save_file(tensors, temporary, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Inversion:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no inversion file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT or "latents" not in f.keys():
                    raise InputError(f"{path} is not a DDIM inversion written by cogvideox invert")
                latents = f.get_tensor("latents")
            return cls(latents=latents, **_checked_request(path, json.loads(metadata["request"])))
        except InputError:
            raise
        except Exception as e:  # a damaged file or foreign metadata
            raise InputError(f"cannot read {path} as a DDIM inversion: {e}") from None


def _text_to_video_only(transformer: TransformerConfig) -> None:
    """Inversion runs a text-to-video model both ways. An image-to-video model denoises only beside the
    latents of a first frame, which neither `invert` nor `regenerate` takes."""
    if transformer.is_image_to_video:
        raise InputError(
            "DDIM inversion needs a text-to-video model, and this one is image-to-video; use the "
            "text-to-video model of the same family (e.g. THUDM/CogVideoX-5b for CogVideoX-5b-I2V)"
        )


def check_inversion(
    transformer: TransformerConfig,
    vae: VAEConfig,
    prompt: str,
    video_frames: int,
    *,
    num_frames: int | None = None,
    num_train_timesteps: int = 1000,
    **kwargs,
) -> GenerationRequest:
    """The request `invert` runs on a video of `video_frames` frames, from the model's configs alone: the
    command refuses a mistake before minutes of loading. `kwargs` are `check_request`'s."""
    _text_to_video_only(transformer)
    if not isinstance(prompt, str):
        raise InputError("DDIM inversion takes one prompt (a string)")
    if num_frames is None:
        num_frames = check_video_frames(None, video_frames, transformer, vae)
    elif isinstance(num_frames, int) and num_frames > video_frames:
        raise InputError(f"num_frames={num_frames} but the video has only {video_frames} frames")
    return check_request(
        transformer, vae, prompt, num_frames=num_frames, num_train_timesteps=num_train_timesteps, **kwargs
    )


def _regeneration_args(inversion: Inversion, prompt, negative_prompt, guidance_scale) -> dict:
    """The sampling arguments of a regeneration: the inversion's, with the prompts and guidance given."""
    return dict(
        prompt=inversion.prompt if prompt is None else prompt,
        negative_prompt=inversion.negative_prompt if negative_prompt is None else negative_prompt,
        num_frames=inversion.num_frames,
        height=inversion.height,
        width=inversion.width,
        num_inference_steps=inversion.num_inference_steps,
        guidance_scale=inversion.guidance_scale if guidance_scale is None else guidance_scale,
        max_sequence_length=inversion.max_sequence_length,
    )


def check_regeneration(
    transformer: TransformerConfig,
    vae: VAEConfig,
    inversion: Inversion,
    prompt: str | None = None,
    *,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    num_train_timesteps: int = 1000,
) -> GenerationRequest:
    """The request `reconstruct` runs, from the model's configs alone; latents inverted with another
    model (other channels, frames or size) are named as such rather than as a wrong `latents=` shape."""
    _text_to_video_only(transformer)
    request = check_request(
        transformer,
        vae,
        num_train_timesteps=num_train_timesteps,
        **_regeneration_args(inversion, prompt, negative_prompt, guidance_scale),
    )
    compress = vae.spatial_compression
    expected = [1, request.latent_frames, transformer.latent_channels, request.height // compress,
                request.width // compress]  # fmt: skip
    got = list(inversion.latents.shape)
    if got != expected:
        raise InputError(
            f"the latents {got} were inverted with another model: this one needs {expected} for "
            f"{request.num_frames} frames at {request.width}x{request.height}; regenerate with the model "
            "they were inverted with"
        )
    return request


def invert(
    pipe,
    video,
    prompt: str = "",
    *,
    negative_prompt: str | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    resize: str = "stretch",
    max_sequence_length: int | None = None,
    fixed_point_iterations: int = 4,
    progress: bool = True,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> Inversion:
    """Invert a video (a file, uint8 frames [T, H, W, 3] or a list of frames) with a text-to-video `pipe`.

    The first `num_frames` frames (default: the model's frame count, or the longest 8k+1 prefix of a
    shorter video) are resized to height x width (the model's size by default) and encoded to the
    posterior's mean, deterministically. Guidance 1 (none)
    inverts most faithfully; invert and regenerate with the same prompt and guidance. The error grows
    where the path is steep: when the reconstruction drifts, more steps help.

    fixed_point_iterations: extra model evaluations per step that refine it (`fixed_point_inverse_step`);
    0 is plain DDIM inversion. On the zero-terminal-SNR schedule plain inversion ends on latents far
    from unit noise (std 0.2-0.3 on the demo model) and some videos come back on the opposite
    background; with 4 (five times the model evaluations) the demo model's test scenes come back at
    the VAE's own round-trip quality.
    """
    iterations = fixed_point_iterations
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise InputError(f"fixed_point_iterations must be a whole number >= 0, got {fixed_point_iterations!r}")
    frames = conditioning.load_video(video, frames_to_read(num_frames, pipe.config))
    request = check_inversion(
        pipe.config,
        pipe.vae.config,
        prompt,
        len(frames),
        num_train_timesteps=pipe.scheduler.config.num_train_timesteps,
        negative_prompt=negative_prompt,
        num_frames=num_frames,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        max_sequence_length=max_sequence_length,
        resize=resize,
    )
    device, dtype = pipe.device, pipe.dtype
    with torch.inference_mode(), _weights_sent_home(pipe):
        length = request.max_sequence_length
        text = pipe.encode_prompts(request.prompts, length)
        if request.use_guidance:
            text = torch.cat([pipe.encode_prompts(request.negative_prompts, length), text])

        pixels = conditioning.prepare_video(frames[: request.num_frames], request.height, request.width, resize)
        posterior = pipe.vae.encode(pixels.to(device, dtype))
        clean = pipe.vae.config.scaling_factor * posterior.mode().permute(0, 2, 1, 3, 4)  # [1, F, C, h, w]
        if request.padding_frames:
            # 1.5: the frame the sampler adds in front (and decoding drops), as a copy of the first.
            clean = torch.cat([clean[:, :1]] * request.padding_frames + [clean], dim=1)

        inverse = InverseDDIM(pipe.scheduler, request.num_inference_steps)
        timesteps = inverse.timesteps.to(device)
        guidance = None
        if request.use_guidance:
            guidance = guidance_schedule(request.guidance_scale, timesteps.tolist())
        _, frames_, _, h, w = clean.shape
        rotary = pipe.transformer.rotary_embedding(frames_, h, w, device)
        inputs = DenoiseInputs(clean.to(dtype), text, guidance, rotary)
        with tqdm(total=len(timesteps), desc="inverting", disable=not progress, leave=False) as bar:

            def on_step(i: int, t: int, current: torch.Tensor) -> None:
                bar.update()
                if callback is not None:
                    callback(i, t, current)

            if iterations == 0:
                latents = denoise(pipe.transformer, inverse, timesteps, inputs, on_step=on_step)
            else:
                latents = _refined_inversion(pipe.transformer, inverse, timesteps, inputs, iterations, on_step)
    return Inversion(
        latents=latents,
        prompt=prompt,
        negative_prompt=request.negative_prompts[0],
        guidance_scale=request.guidance_scale,
        num_inference_steps=request.num_inference_steps,
        num_frames=request.num_frames,
        height=request.height,
        width=request.width,
        max_sequence_length=request.max_sequence_length,
    )


@contextlib.contextmanager
def _weights_sent_home(pipe):
    """With offloading, every weight back in host memory afterwards (success or error), as after a call."""
    try:
        yield
    finally:
        pipe.release_weights()


def _refined_inversion(transformer, inverse: InverseDDIM, timesteps, inputs: DenoiseInputs, iterations: int, on_step):
    """`denoise` over the inverse schedule, each step refined by `fixed_point_inverse_step`."""
    latents, dtype = inputs.latents, inputs.latents.dtype
    prediction_type = inverse.forward.config.prediction_type
    for i, t in enumerate(timesteps):

        def velocity_at(x: torch.Tensor) -> torch.Tensor:
            return predict_velocity(transformer, x.to(dtype), t, inputs, i)

        ab_from, ab_to = inverse.levels(t)
        latents = fixed_point_inverse_step(velocity_at, latents.float(), ab_from, ab_to, iterations, prediction_type)
        latents = latents.to(dtype)
        if not torch.isfinite(latents).all():
            raise NonFiniteError(f"the inverted latents became NaN/inf at step {i + 1} of {len(timesteps)}")
        on_step(i, int(t), latents)
    return latents


def reconstruct(
    pipe,
    inversion: Inversion,
    prompt: str | None = None,
    *,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    output_type: str = "np",
    progress: bool = True,
):
    """Sample forward with DDIM from inverted latents: the video again, or an edit of it with a new
    `prompt`. Returns the pipeline's `VideoOutput`."""
    train_steps = pipe.scheduler.config.num_train_timesteps
    sampling = _regeneration_args(inversion, prompt, negative_prompt, guidance_scale)
    check_regeneration(pipe.config, pipe.vae.config, inversion, prompt, negative_prompt=negative_prompt,
                       guidance_scale=guidance_scale, num_train_timesteps=train_steps)  # fmt: skip
    ddim = pipe if type(pipe.scheduler) is DDIMScheduler else pipe.with_scheduler("ddim")
    return ddim(
        **sampling,
        latents=inversion.latents,
        use_dynamic_cfg=False,  # inverted with a constant scale: a model's recommended schedule would not retrace it
        seed=0,  # DDIM draws nothing; a fixed seed keeps the report quiet
        output_type=output_type,
        progress=progress,
    )


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 videos of the same shape (inf when equal)."""
    if video.shape != reference.shape:
        raise ValueError(f"cannot compare videos shaped {video.shape} and {reference.shape}")
    mse = np.mean((video.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))

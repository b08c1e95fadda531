"""The denoising loop and its pure pieces: the guidance schedule, classifier-free guidance, post-processing.

Every detail that changes the numbers follows the reference pipeline (diffusers' CogVideoXPipeline), so a
seed gives the same video: the transformer output is taken to fp32 for guidance and the scheduler step,
the latents go back to the pipeline dtype after every step, and frames are rounded as its PIL path does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cogvideox.errors import NonFiniteError
from cogvideox.schedulers import DPMScheduler

Generator = torch.Generator | list[torch.Generator] | None


def dynamic_guidance_scale(guidance_scale: float, position: float, num_steps: int) -> float:
    """CogVideoX's dynamic CFG: g_t = 1 + g * (1 - cos(pi * ((n - t) / n) ** 5)) / 2.

    The reference feeds the raw timestep t (999 ... 19) as `position`, which makes the scale oscillate
    (diffusers #9641; the CogVideoX authors keep it, SAT behaves the same). Feeding the step index
    0 ... n-1 instead gives the smooth decay from 1 + g to about 1 the formula was meant to have.
    """
    return 1 + guidance_scale * (1 - math.cos(math.pi * ((num_steps - position) / num_steps) ** 5.0)) / 2


def guidance_schedule(
    guidance_scale: float, timesteps: Sequence[int], dynamic: bool = False, variant: str = "reference"
) -> list[float]:
    """The guidance scale at each step: constant, or dynamic with the reference ("t") or smooth ("i") clock."""
    n = len(timesteps)
    if not dynamic:
        return [float(guidance_scale)] * n
    if variant == "reference":
        return [dynamic_guidance_scale(guidance_scale, float(t), n) for t in timesteps]
    if variant == "smooth":
        return [dynamic_guidance_scale(guidance_scale, float(i), n) for i in range(n)]
    raise ValueError(f"unknown dynamic CFG variant {variant!r}; use 'reference' or 'smooth'")


def classifier_free_guidance(prediction: torch.Tensor, scale: float) -> torch.Tensor:
    """Combine a [uncond ; cond] batch: uncond + scale * (cond - uncond)."""
    uncond, cond = prediction.chunk(2)
    return uncond + scale * (cond - uncond)


StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class DenoiseInputs:
    """What one denoising run needs besides the models."""

    latents: torch.Tensor  # [B, F, C, h, w], pure noise, pipeline dtype
    text: torch.Tensor  # [2B, L, D] = cat([uncond, cond]) with guidance, else [B, L, D]
    guidance: list[float] | None  # per step; None = no classifier-free guidance
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    generator: Generator = None  # for the stochastic DPM steps


def predict_velocity(
    transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, inputs: DenoiseInputs, i: int
) -> torch.Tensor:
    """The model's output for `latents` at timestep `t` (step `i` of the run), in fp32, guided when the
    run uses classifier-free guidance."""
    model_input = torch.cat([latents, latents]) if inputs.guidance is not None else latents
    velocity = transformer(
        model_input,
        inputs.text,
        t.expand(model_input.shape[0]),
        image_rotary_emb=inputs.rotary,
    ).float()
    if inputs.guidance is not None:
        velocity = classifier_free_guidance(velocity, inputs.guidance[i])
    return velocity


def denoise(
    transformer: torch.nn.Module,
    scheduler,
    timesteps: torch.Tensor,
    inputs: DenoiseInputs,
    *,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Run the sampler over `timesteps`; returns the final latents [B, F, C, h, w] in the pipeline dtype.

    Raises `NonFiniteError` as soon as a step leaves NaN or inf in the latents.
    """
    latents, dtype = inputs.latents, inputs.latents.dtype
    uses_history = isinstance(scheduler, DPMScheduler)
    old_pred_x0 = None
    # The scheduler and the callback read the timesteps as ints: read on the host once, not per step
    # (each int() of a device tensor waits for the device).
    host_timesteps = [int(t) for t in timesteps.tolist()]
    for i, t in enumerate(timesteps):
        velocity = predict_velocity(transformer, latents, t, inputs, i)  # queued on the device, not waited for
        step_t = host_timesteps[i]
        if uses_history:
            # DPM-Solver++(2M) needs the previous x0 estimate and the previous (noisier) timestep. Its
            # noise (CPU work with a seed) is drawn while the device still runs the model.
            previous_t = host_timesteps[i - 1] if i > 0 else None
            noise = scheduler.draw_noise(latents, step_t, old_pred_x0 is not None, inputs.generator)
            latents, old_pred_x0 = scheduler.step(velocity, old_pred_x0, step_t, previous_t, latents, noise=noise)
        else:
            latents, _ = scheduler.step(velocity, step_t, latents)
        latents = latents.to(dtype)
        if not torch.isfinite(latents).all():  # the one host sync of a step
            raise NonFiniteError(
                f"the latents became NaN/inf at step {i + 1} of {len(timesteps)} (timestep {step_t}) "
                f"running in {str(dtype).removeprefix('torch.')}"
                + ("; the CogVideoX 5B weights are bf16: run in bf16" if dtype == torch.float16 else "")
            )
        if on_step is not None:
            on_step(i, step_t, latents)
    return latents


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """A decoded video [3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3].

    Same arithmetic as the reference's PIL output: denormalise in the VAE dtype, then fp32 and round(x*255).
    """
    frames = (video * 0.5 + 0.5).clamp(0, 1)  # [3, T, H, W]
    frames = frames.permute(1, 2, 3, 0).float()  # [T, H, W, 3]
    return (frames * 255).round().to(torch.uint8).cpu().numpy()

"""The CogVideoX training objective: v-prediction on the zero-terminal-SNR schedule.

The official trainers sample t uniformly in [0, T), noise the clean latent with the scheduler's
`add_noise`, turn the model's v-prediction into an x0 estimate and weight the x0 error by
1 / (1 - alpha_bar_t). Since x0 - x0_hat = sqrt(1 - alpha_bar_t) * (v_hat - v), that weighted x0 loss is
exactly the plain v-prediction MSE, which is what we compute (it is also better conditioned near t = 0).
"""

from __future__ import annotations

import torch


def velocity(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0, with alpha_bar broadcast per sample."""
    a = alpha_bar.sqrt()
    s = (1.0 - alpha_bar).sqrt()
    return a * noise - s * x0


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise."""
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def per_sample(alpha_bar_table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar[t] shaped [B, 1, 1, ...] to broadcast against `like` ([B, F, C, H, W])."""
    ab = alpha_bar_table.to(like.device)[t].to(torch.float32)
    return ab.view(-1, *([1] * (like.ndim - 1)))


def stratified_timesteps(
    num_train: int, draws: int, mine: range, order: torch.Generator, generator: torch.Generator
) -> torch.Tensor:
    """Timesteps for the draws `mine` of the `draws` an optimizer step makes over all processes, one per
    stratum: draw j takes t uniformly in [floor(k T / S), floor((k + 1) T / S)), where S = `draws`, T =
    `num_train`, and k is the j-th entry of a permutation of the strata drawn from `order` (a generator
    every process seeds alike, so the draws of a step cover the strata once between them).

    Each t is still uniform on [0, T) (the stratum is a uniform choice), so the gradient estimate stays
    unbiased; a step's timesteps are spread over the whole range instead of clumping, which lowers the
    variance of its loss and gradient, as the SAT trainer's uniform sampling across ranks does (it fixes
    rank groups to intervals; here the strata move from step to step). With S = 1 it is `torch.randint(0,
    T)` from `generator`, the plain uniform draw. With S > T, strata share timesteps (width 1).
    """
    count = len(mine)
    if draws == 1:
        return torch.randint(0, num_train, (count,), generator=generator, device=generator.device)
    strata = torch.randperm(draws, generator=order, device=order.device)[mine.start : mine.stop].cpu()
    low = strata * num_train // draws
    width = ((strata + 1) * num_train // draws - low).clamp(min=1)
    offset = (torch.rand(count, generator=generator, device=generator.device, dtype=torch.float64).cpu() * width)
    return (low + offset.long().clamp(max=width - 1)).to(generator.device)


def v_loss(
    transformer: torch.nn.Module,
    x0: torch.Tensor,
    text: torch.Tensor,
    alpha_bar_table: torch.Tensor,
    generator: torch.Generator,
    rotary=None,
    image_latents: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """One batch of the CogVideoX objective.

    x0: clean latents [B, F, C, H, W] (already multiplied by the VAE scaling factor);
    text: T5 states [B, L, D]. Timesteps (unless given: `timesteps` [B]) and noise come from `generator`,
    so a run is reproducible step for step. Returns the scalar mean v-MSE in fp32.
    weight: optional per-element weights broadcastable to x0 (e.g. [B, F, 1, H, W] to stress some
    regions); the loss is then the weighted mean, sum(w * err^2) / sum(w) over the broadcast shape.
    """
    b = x0.shape[0]
    num_train = alpha_bar_table.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, num_train, (b,), generator=generator, device=generator.device)
    t = timesteps.to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(x0.device)
    ab = per_sample(alpha_bar_table, t, x0)
    x0f = x0.float()
    xt = noisy_latents(x0f, noise, ab).to(x0.dtype)
    model_in = xt if image_latents is None else torch.cat([xt, image_latents], dim=2)
    pred = transformer(model_in, text, t, image_rotary_emb=rotary).float()
    err = (pred - velocity(x0f, noise, ab)) ** 2
    if weight is None:
        return err.mean()
    weight = weight.to(err.device, torch.float32).expand_as(err)
    return (weight * err).sum() / weight.sum()

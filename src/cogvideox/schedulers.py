"""Noise schedule and the two CogVideoX samplers: DDIM and DPM-Solver++(2M) SDE.

The schedule is the latent-diffusion "scaled linear" one, made noisier by an SNR shift (`snr_shift_scale`:
3 for the 2b model, 1 for the others, SAT's discretizer `shift_scale`) and rescaled to zero terminal SNR
(arXiv 2305.08891, algorithm 1), so the first sampling step starts from pure noise. The shipped models
predict velocity (v-prediction, arXiv 2202.00512).

Parity with the reference is bit for bit: the schedule is kept in float64 on the CPU and every step's
coefficients are 0-dim float64 tensors combined in the reference's order, so the type promotion onto the
latent dtype happens at the same places. Two reference quirks are kept on purpose:
- the previous timestep is `t - num_train_timesteps // n`, a fixed stride that is only right when `n`
  divides `num_train_timesteps` (build the scheduler with `exact_stride=True` to step to the real next
  scheduled timestep instead);
- `clip_sample` and the thresholding options of the config are ignored, as the reference ignores them.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from cogvideox.models.config import ConfigError, SchedulerConfig

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")


# ----------------------------------------------------------------------------------------------------
# The schedule: pure functions of the config
# ----------------------------------------------------------------------------------------------------


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Betas of the cosine schedule (arXiv 2102.09672, eq. 17), float32 as in the reference."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def betas(config: SchedulerConfig) -> Tensor:
    """Per-step noise variances beta_t, `[num_train_timesteps]`.

    `scaled_linear` (the shipped schedule) is linear in sqrt(beta) and computed in float64; the other
    schedules are float32, as in the reference.
    """
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return torch.tensor(config.trained_betas, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    if config.beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(n)
    raise ConfigError(f"unknown beta_schedule {config.beta_schedule!r}; choose one of {BETA_SCHEDULES}")


def shift_snr(alphas_cumprod: Tensor, scale: float) -> Tensor:
    """Divide the signal-to-noise ratio ab / (1 - ab) by `scale`, written in terms of ab."""
    return alphas_cumprod / (scale + (1 - scale) * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(ab) so the last step has no signal and the first is unchanged."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


def alphas_cumprod(config: SchedulerConfig) -> Tensor:
    """Cumulative signal fraction ab_t = prod(1 - beta), after the SNR shift and the zero-SNR rescale.

    float64 for the shipped schedule; `ab[-1]` is exactly 0 when `rescale_betas_zero_snr` is set.
    """
    ab = torch.cumprod(1.0 - betas(config), dim=0)
    ab = shift_snr(ab, config.snr_shift_scale)
    if config.rescale_betas_zero_snr:
        ab = rescale_zero_terminal_snr(ab)
    return ab


def _check_num_steps(num_inference_steps: int, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool):
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    try:
        n = operator.index(num_inference_steps)
    except TypeError:
        raise ValueError(
            f"num_inference_steps must be a positive integer, got {num_inference_steps!r}"
        ) from None
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps} "
            f"(the model was trained on that many noise levels), got {n}"
        )
    return n


def timesteps(config: SchedulerConfig, num_inference_steps: int) -> Tensor:
    """The `num_inference_steps` timesteps to sample at, noisiest first, int64 `[n]`.

    - "trailing" (shipped): evenly spaced from the end, N/n apart, rounded: 999, 979, ..., 19 for n=50.
    - "leading": multiples of N // n from 0, plus `steps_offset`: 980, 960, ..., 0 for n=50.
    - "linspace": n rounded points of linspace(0, N-1), both ends included.
    Table 2 of arXiv 2305.08891 compares them. numpy is used because the rounding of its float `arange`
    is part of the reference's definition.
    """
    N = config.num_train_timesteps
    n = _check_num_steps(num_inference_steps, N)
    spacing = config.timestep_spacing
    if spacing == "trailing":
        # The float arange yields n + 1 points for some n (61, 103, ...); the extra one rounds to -1,
        # which the reference would run as a step at the pure-noise level. Keep the first n.
        ts = (np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1)[:n]
    elif spacing == "leading":
        ts = (np.arange(n) * (N // n))[::-1].astype(np.int64) + config.steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, N - 1, n).round()[::-1].astype(np.int64)
    else:
        raise ConfigError(f"unknown timestep_spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    return torch.from_numpy(ts.copy())


# ----------------------------------------------------------------------------------------------------
# Step math: pure functions of 0-dim float64 schedule values and latents
# ----------------------------------------------------------------------------------------------------


def predict_x0(model_output: Tensor, sample: Tensor, ab_t: Tensor, prediction_type: str) -> Tensor:
    """The clean sample implied by the model's prediction at noise level ab_t."""
    if prediction_type == "v_prediction":
        # x_t = sqrt(ab) x0 + sqrt(1-ab) eps and v = sqrt(ab) eps - sqrt(1-ab) x0
        return ab_t**0.5 * sample - (1 - ab_t) ** 0.5 * model_output
    if prediction_type == "epsilon":
        return (sample - (1 - ab_t) ** 0.5 * model_output) / ab_t**0.5
    if prediction_type == "sample":
        return model_output
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def ddim_update(sample: Tensor, x0: Tensor, ab_t: Tensor, ab_prev: Tensor) -> Tensor:
    """Deterministic DDIM (eta = 0) move from ab_t to ab_prev: sqrt(ab_prev) x0 + sqrt(1-ab_prev) eps,
    with eps eliminated in favour of the current sample so that ab_t = 0 (pure noise) needs no division."""
    a = ((1 - ab_prev) / (1 - ab_t)) ** 0.5
    b = ab_prev**0.5 - ab_t**0.5 * a
    return a * sample + b * x0


def half_log_snr(ab: Tensor) -> Tensor:
    """lambda = log(alpha / sigma), the time variable of DPM-Solver (arXiv 2211.01095)."""
    return ((ab / (1 - ab)) ** 0.5).log()


def _bound(v: Tensor, ndim: int) -> Tensor:
    return v.flatten().reshape(-1, *([1] * (ndim - 1)))


def randn(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise drawn the way the reference draws it, so a seed gives the same numbers.

    A CPU generator draws on the CPU (in `dtype`) and the result is moved to `device`; a list of
    generators draws one batch element from each.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    draw_device = device
    gens = generator if isinstance(generator, list) else [generator]
    gen_type = gens[0].device.type if gens[0] is not None else device.type
    if gen_type != device.type:
        if gen_type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a {gen_type} generator; use a CPU one")
        draw_device = torch.device("cpu")
    shape = tuple(shape)
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=draw_device, dtype=dtype).to(device)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    parts = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in gens]
    return torch.cat(parts).to(device)


# ----------------------------------------------------------------------------------------------------
# Scheduler objects
# ----------------------------------------------------------------------------------------------------


class _Scheduler:
    """The state both samplers share: schedule, timesteps, forward process."""

    def __init__(self, config: SchedulerConfig | None = None, *, exact_stride: bool = False) -> None:
        config = config if config is not None else SchedulerConfig()
        if config.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"unknown prediction_type {config.prediction_type!r}; choose one of {PREDICTION_TYPES}"
            )
        if config.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(
                f"unknown timestep_spacing {config.timestep_spacing!r}; choose one of {TIMESTEP_SPACINGS}"
            )
        self.config = config
        self.exact_stride = exact_stride
        self.alphas_cumprod = alphas_cumprod(config)  # [N], float64 on the CPU
        # Beyond the last step: clean data (ab = 1) when set_alpha_to_one, else the first level.
        self.final_alpha_cumprod = (
            torch.tensor(1.0, dtype=self.alphas_cumprod.dtype)
            if config.set_alpha_to_one
            else self.alphas_cumprod[0]
        )
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    @classmethod
    def from_config(cls, config: SchedulerConfig | dict, *, exact_stride: bool = False):
        """Build from a `SchedulerConfig` or a `scheduler_config.json` dict."""
        if isinstance(config, dict):
            config = SchedulerConfig.from_dict(config)
        return cls(config, exact_stride=exact_stride)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose the sampling timesteps (see `timesteps`); `.timesteps` is int64 on `device`."""
        n = _check_num_steps(num_inference_steps, self.config.num_train_timesteps)
        self.timesteps = timesteps(self.config, n).to(device)
        self.num_inference_steps = n

    def previous_timestep(self, timestep: int | Tensor) -> int:
        """The timestep a step from `timestep` lands on; negative means "past the end" (clean data)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        t = int(timestep)
        if not self.exact_stride:
            return t - self.config.num_train_timesteps // self.num_inference_steps
        schedule = self.timesteps.tolist()
        if t not in schedule:
            raise ValueError(f"timestep {t} is not one of the scheduled timesteps {schedule}")
        i = schedule.index(t)
        return schedule[i + 1] if i + 1 < len(schedule) else -1

    def _alpha_prod(self, t: int) -> Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _scales(self, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
        # The schedule is cast to the sample's dtype before indexing, as the reference does.
        ab = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        ab_t = ab[torch.as_tensor(t, device=like.device)]
        return _bound(ab_t**0.5, like.ndim), _bound((1 - ab_t) ** 0.5, like.ndim)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Forward process x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; `t` is `[B]` or a scalar."""
        signal, sigma = self._scales(t, x0)
        return signal * x0 + sigma * noise

    def get_velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The v-prediction target v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0."""
        signal, sigma = self._scales(t, x0)
        return signal * noise - sigma * x0

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class DDIMScheduler(_Scheduler):
    """Deterministic DDIM sampler (arXiv 2010.02502, eta = 0), the shipped CogVideoX scheduler."""

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
        """One denoising step from `timestep`. Returns `(prev_sample, pred_x0)`; the last step returns x0."""
        ab_t = self._alpha_prod(int(timestep))
        ab_prev = self._alpha_prod(self.previous_timestep(timestep))
        x0 = predict_x0(model_output, sample, ab_t, self.config.prediction_type)
        return ddim_update(sample, x0, ab_t, ab_prev), x0


class DPMScheduler(_Scheduler):
    """Stochastic DPM-Solver++(2M) SDE sampler (arXiv 2211.01095), SAT's default CogVideoX sampler.

    Each step draws one normal tensor, and second-order steps (a previous x0 exists and this is not the
    last step) draw a second one and discard the first; the draws follow the reference so a seed
    reproduces its video.
    """

    def noise_draws(self, timestep: int | Tensor, has_history: bool) -> int:
        """How many normal tensors `step` draws from `timestep`: 2 on a second-order step (a previous x0
        exists and this is not the last step), else 1."""
        return 2 if has_history and self.previous_timestep(timestep) >= 0 else 1

    def draw_noise(
        self,
        sample: Tensor,
        timestep: int | Tensor,
        has_history: bool,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> list[Tensor]:
        """The draws `step` would make from `timestep`, made now (pass them to `step` as `noise`).

        With a CPU generator the draws are CPU work; made while the device still runs the model, instead
        of inside `step` after it, they cost the device no idle time. Same generator, same order.
        """
        count = self.noise_draws(timestep, has_history)
        return [randn(sample.shape, generator, device=sample.device, dtype=sample.dtype) for _ in range(count)]

    def step(
        self,
        model_output: Tensor,
        old_pred_x0: Tensor | None,
        timestep: int | Tensor,
        timestep_back: int | Tensor | None,
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One step from `timestep`. `timestep_back` is the previous (noisier) timestep and `old_pred_x0`
        the x0 this method returned there; both are None on the first step. `noise`: the draws made
        beforehand by `draw_noise` (else they are drawn here from `generator`). Returns
        `(prev_sample, pred_x0)`."""
        if old_pred_x0 is not None and timestep_back is None:
            raise ValueError("old_pred_x0 was given without timestep_back, the timestep it was predicted at")
        if noise is not None and len(noise) != self.noise_draws(timestep, old_pred_x0 is not None):
            raise ValueError(f"this step draws {self.noise_draws(timestep, old_pred_x0 is not None)} noise "
                             f"tensors, got {len(noise)}")
        draws = iter(noise) if noise is not None else None

        def draw() -> Tensor:
            if draws is not None:
                return next(draws)
            return randn(sample.shape, generator, device=sample.device, dtype=sample.dtype)

        prev_t = self.previous_timestep(timestep)
        ab_t = self._alpha_prod(int(timestep))
        ab_prev = self._alpha_prod(prev_t)
        x0 = predict_x0(model_output, sample, ab_t, self.config.prediction_type)

        lam = half_log_snr(ab_t)
        h = half_log_snr(ab_prev) - lam  # > 0: lambda grows as noise is removed
        keep = ((1 - ab_prev) / (1 - ab_t)) ** 0.5 * (-h).exp()
        x0_weight = (-2 * h).expm1() * ab_prev**0.5  # negative: -(1 - e^-2h) sqrt(ab_prev)
        noise_scale = (1 - ab_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5

        noise = draw()
        first_order = keep * sample - x0_weight * x0 + noise_scale * noise
        if old_pred_x0 is None or prev_t < 0:
            return first_order, x0

        # Second order: extrapolate x0 linearly in lambda from the previous step's estimate.
        h_last = lam - half_log_snr(self.alphas_cumprod[int(timestep_back)])
        r = h_last / h
        d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * old_pred_x0
        noise = draw()
        return keep * sample - x0_weight * d + noise_scale * noise, x0


SCHEDULERS: dict[str, type[_Scheduler]] = {"ddim": DDIMScheduler, "dpm": DPMScheduler}
_BY_CLASS_NAME = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}


def make_scheduler(
    config: SchedulerConfig | None = None, kind: str | None = None, *, exact_stride: bool = False
) -> DDIMScheduler | DPMScheduler:
    """Build the scheduler named by `kind` ("ddim" or "dpm", or a reference class name), or by the
    config's `_class_name` when `kind` is None (DDIM when the config names none)."""
    config = config if config is not None else SchedulerConfig()
    choices = sorted(SCHEDULERS) + sorted(_BY_CLASS_NAME)
    if kind is None:
        name = config.extra.get("_class_name", SchedulerConfig.class_name)
        if name not in _BY_CLASS_NAME:
            raise ValueError(
                f"scheduler config names class {name!r}, which is not a CogVideoX scheduler; "
                f"name the scheduler to use instead, one of {choices}"
            )
        kind = _BY_CLASS_NAME[name]
    key = _BY_CLASS_NAME.get(kind, kind.lower() if isinstance(kind, str) else kind)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler kind {kind!r}; choose one of {choices}")
    return SCHEDULERS[key](config, exact_stride=exact_stride)

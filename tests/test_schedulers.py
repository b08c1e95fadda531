"""Schedulers against diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler built from the same config."""

import pytest
import torch

from cogvideox.models.config import ConfigError, SchedulerConfig
from cogvideox.schedulers import (
    DDIMScheduler,
    DPMScheduler,
    alphas_cumprod,
    make_scheduler,
    randn,
    timesteps,
)

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 5, 6)  # [B, F, C, H, W]


def reference(kind: str, config: SchedulerConfig):
    cls = diffusers.CogVideoXDDIMScheduler if kind == "ddim" else diffusers.CogVideoXDPMScheduler
    return cls.from_config(config.to_dict())


def fake_model(sample: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for the transformer: depends on both the sample and the timestep."""
    t = float(t)
    return 0.6 * sample * torch.cos(torch.tensor(t / 300)) + 0.4 * torch.tanh(sample) * (t / 1000) + 0.05


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# --- schedule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_alphas_cumprod_matches_reference(shift):
    config = SchedulerConfig(snr_shift_scale=shift)
    ab = alphas_cumprod(config)
    assert ab.dtype == torch.float64
    assert torch.equal(ab, reference("ddim", config).alphas_cumprod)
    assert torch.equal(ab, reference("dpm", config).alphas_cumprod)
    assert ab[999].item() == 0.0
    expected = {1.0: (0.99915, 0.24236, 8.58e-5), 3.0: (0.997454, 0.095970, 2.72e-5)}[shift]
    for i, v in zip((0, 499, 979), expected):
        assert ab[i].item() == pytest.approx(v, rel=1e-3)


@pytest.mark.parametrize(
    "changes",
    [
        dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, rescale_betas_zero_snr=False),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(trained_betas=tuple(torch.linspace(1e-4, 0.02, 1000).tolist())),
        dict(rescale_betas_zero_snr=False, snr_shift_scale=2.0),
    ],
)
def test_other_schedules_match_reference(changes):
    config = SchedulerConfig().replace(**changes)
    assert torch.equal(alphas_cumprod(config), reference("ddim", config).alphas_cumprod)


def test_unknown_beta_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="scaled_linear"):
        alphas_cumprod(SchedulerConfig(beta_schedule="cosine"))


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("n", [50, 30, 1])
def test_timesteps_match_reference(spacing, n):
    config = SchedulerConfig(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref = reference("ddim", config)
    ref.set_timesteps(n)
    ours = DDIMScheduler(config)
    ours.set_timesteps(n)
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(timesteps(config, n), ref.timesteps)


def test_trailing_timesteps_for_every_step_count():
    config = SchedulerConfig()
    assert timesteps(config, 50).tolist() == list(range(999, 0, -20))
    ref = reference("ddim", config)
    extra = []
    for n in range(1, 1001):
        ref.set_timesteps(n)
        ours = timesteps(config, n)
        assert len(ours) == n and ours.min() >= 0
        # Where the reference's float arange overshoots it appends a bogus timestep -1: we drop it.
        assert torch.equal(ours, ref.timesteps[:n])
        if len(ref.timesteps) > n:
            assert ref.timesteps[n:].tolist() == [-1]
            extra.append(n)
    assert 61 in extra


@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5, True, "50"])
def test_bad_step_counts_are_rejected(bad):
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMScheduler().set_timesteps(bad)


def test_step_before_set_timesteps_is_rejected():
    x = torch.zeros(SHAPE)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        DDIMScheduler().step(x, 999, x)


def test_unknown_prediction_type_is_a_config_error():
    with pytest.raises(ConfigError, match="v_prediction"):
        DDIMScheduler(SchedulerConfig(prediction_type="flow"))


# --- sampling trajectories --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, config",
    [
        (50, SchedulerConfig()),
        (30, SchedulerConfig(snr_shift_scale=3.0)),
        (20, SchedulerConfig()),
        (20, SchedulerConfig(prediction_type="epsilon", rescale_betas_zero_snr=False)),
        (20, SchedulerConfig(prediction_type="sample", timestep_spacing="leading", steps_offset=1)),
    ],
)
def test_ddim_trajectory_matches_reference(n, config):
    ref, ours = reference("ddim", config), DDIMScheduler.from_config(config)
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    x_ref = x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for t in ours.timesteps:
        out_ref = ref.step(fake_model(x_ref, t), t, x_ref)
        x, x0 = ours.step(fake_model(x, t), t, x)
        worst = max(worst, rel_err(x, out_ref.prev_sample), rel_err(x0, out_ref.pred_original_sample))
        x_ref = out_ref.prev_sample
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert worst <= 1e-6


@pytest.mark.parametrize(
    "n, config",
    [(50, SchedulerConfig()), (30, SchedulerConfig(snr_shift_scale=3.0)), (20, SchedulerConfig())],
)
def test_dpm_trajectory_matches_reference_seed_for_seed(n, config):
    ref, ours = reference("dpm", config), make_scheduler(config, "dpm")
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    g_ref, g = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    x_ref = x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    old_ref = old = None
    worst = 0.0
    steps = ours.timesteps
    for i, t in enumerate(steps):
        back = steps[i - 1] if i > 0 else None
        x_ref, old_ref = ref.step(fake_model(x_ref, t), old_ref, t, back, x_ref, generator=g_ref)
        x, old = ours.step(fake_model(x, t), old, t, back, x, generator=g)
        worst = max(worst, rel_err(x, x_ref), rel_err(old, old_ref))
    assert torch.isfinite(x).all()
    assert worst <= 1e-6
    # Same number of draws on both sides: the generators are in the same state.
    assert torch.equal(g.get_state(), g_ref.get_state())


def test_dpm_draws_two_normals_on_middle_steps_only():
    sched = DPMScheduler()
    sched.set_timesteps(3)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    old = None
    draws = []
    steps = sched.timesteps
    for i, t in enumerate(steps):
        before = g.get_state()
        x, old = sched.step(fake_model(x, t), old, t, steps[i - 1] if i else None, x, generator=g)
        probe = torch.Generator()
        probe.set_state(before)
        count = 0
        while not torch.equal(probe.get_state(), g.get_state()):
            torch.randn(SHAPE, generator=probe)
            count += 1
        draws.append(count)
    assert draws == [1, 2, 1]


@pytest.mark.parametrize("n", [1, 3, 4])
def test_dpm_noise_drawn_ahead_gives_the_same_steps(n):
    """`draw_noise` makes the draws `step` would make (as many, same order), so a sampler may draw them
    while the model still runs: the trajectory is bitwise the one drawn inside `step`."""
    sched = DPMScheduler()
    sched.set_timesteps(n)
    steps = sched.timesteps.tolist()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    runs = []
    for ahead in (False, True):
        g, x, old = torch.Generator().manual_seed(7), x0, None
        for i, t in enumerate(steps):
            velocity = fake_model(x.float(), t)
            back = steps[i - 1] if i else None
            if ahead:
                noise = sched.draw_noise(x, t, old is not None, g)
                assert len(noise) == (2 if 0 < i < n - 1 else 1)
                x, old = sched.step(velocity, old, t, back, x, noise=noise)
            else:
                x, old = sched.step(velocity, old, t, back, x, generator=g)
            x = x.to(torch.bfloat16)
        runs.append((x, g.get_state()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    with pytest.raises(ValueError, match="draws 1 noise tensors, got 2"):
        sched.step(velocity, None, steps[0], None, x, noise=[x, x])


def test_ddim_with_the_true_velocity_follows_the_forward_process():
    # Computed truth: if the model predicts the exact v of (x0, eps), DDIM (eta 0) lands on
    # add_noise(x0, eps, prev_t) and predicts x0.
    sched = DDIMScheduler()
    sched.set_timesteps(50)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    for t in (979, 499, 19):
        x_t = sched.add_noise(x0, eps, torch.tensor([t]))
        v = sched.get_velocity(x0, eps, torch.tensor([t]))
        prev, pred_x0 = sched.step(v, t, x_t)
        torch.testing.assert_close(pred_x0, x0, rtol=0, atol=1e-9)
        expected = x0 if t == 19 else sched.add_noise(x0, eps, torch.tensor([t - 20]))
        torch.testing.assert_close(prev, expected, rtol=0, atol=1e-9)


def test_exact_stride_steps_to_the_next_scheduled_timestep():
    default, exact = DDIMScheduler(), DDIMScheduler(exact_stride=True)
    for s in (default, exact):
        s.set_timesteps(30)
    steps = exact.timesteps.tolist()
    assert steps[:2] == [999, 966]
    assert default.previous_timestep(999) == 999 - 1000 // 30  # the reference's stride: 966
    assert [exact.previous_timestep(t) for t in steps] == steps[1:] + [-1]
    assert default.previous_timestep(steps[1]) == 933 and exact.previous_timestep(steps[1]) == 932
    # Same result for step counts that divide 1000.
    default.set_timesteps(50)
    exact.set_timesteps(50)
    assert [exact.previous_timestep(t) for t in exact.timesteps] == [
        default.previous_timestep(t) if t > 19 else -1 for t in default.timesteps
    ]
    with pytest.raises(ValueError, match="not one of the scheduled"):
        exact.previous_timestep(500)


def test_exact_stride_dpm_ends_on_the_clean_sample():
    sched = DPMScheduler(exact_stride=True)
    sched.set_timesteps(30)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    old = None
    steps = sched.timesteps
    for i, t in enumerate(steps):
        x, old = sched.step(fake_model(x, t), old, t, steps[i - 1] if i else None, x, generator=g)
    assert torch.equal(x, old)  # the last step moves to ab = 1 with no noise: returns x0


# --- forward process --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_add_noise_and_velocity_match_reference(kind, dtype):
    config = SchedulerConfig(snr_shift_scale=3.0)
    ref, ours = reference(kind, config), make_scheduler(config, kind)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(SHAPE, generator=gen).to(dtype)
    noise = torch.randn(SHAPE, generator=gen).to(dtype)
    t = torch.tensor([999, 17])
    for ours_fn, ref_fn in ((ours.add_noise, ref.add_noise), (ours.get_velocity, ref.get_velocity)):
        got, want = ours_fn(x0, noise, t), ref_fn(x0, noise, t)
        assert got.dtype == dtype
        assert torch.equal(got, want)
    # A scalar timestep broadcasts over the batch.
    assert torch.equal(ours.add_noise(x0, noise, 500), ref.add_noise(x0, noise, torch.tensor(500)))


def test_init_noise_sigma_and_randn_match_reference():
    from diffusers.utils.torch_utils import randn_tensor

    assert DDIMScheduler().init_noise_sigma == 1.0
    one = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    per_sample = lambda: [torch.Generator().manual_seed(i) for i in (1, 2)]  # noqa: E731
    for gen_fn in (one, per_sample):
        for dtype in (torch.float32, torch.bfloat16):
            got = randn(SHAPE, gen_fn(), device="cpu", dtype=dtype)
            assert torch.equal(got, randn_tensor(SHAPE, gen_fn(), device=torch.device("cpu"), dtype=dtype))


# --- choosing a scheduler ---------------------------------------------------------------------------


def test_make_scheduler_by_kind_and_by_class_name():
    assert type(make_scheduler(SchedulerConfig())) is DDIMScheduler
    dpm_config = SchedulerConfig.from_dict({"_class_name": "CogVideoXDPMScheduler", "snr_shift_scale": 3.0})
    chosen = make_scheduler(dpm_config)
    assert type(chosen) is DPMScheduler and chosen.config.snr_shift_scale == 3.0
    assert type(make_scheduler(dpm_config, "ddim")) is DDIMScheduler
    assert type(make_scheduler(SchedulerConfig(), "DPM")) is DPMScheduler
    assert make_scheduler(SchedulerConfig(), "dpm", exact_stride=True).exact_stride
    with pytest.raises(ValueError, match="'ddim', 'dpm'"):
        make_scheduler(SchedulerConfig(), "euler")
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        make_scheduler(SchedulerConfig.from_dict({"_class_name": "EulerDiscreteScheduler"}))

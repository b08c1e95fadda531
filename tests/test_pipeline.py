"""The whole text-to-video pipeline against diffusers' CogVideoXPipeline on tiny models, seed for seed."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import load_reference_pipeline

from cogvideox import InputError, LoadError, NonFiniteError, Pipeline, fast, loading
from cogvideox.sampling import dynamic_guidance_scale, guidance_schedule

diffusers = pytest.importorskip("diffusers")

SMALL = dict(num_frames=9, height=32, width=48, num_inference_steps=3, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipes(tiny_rope_dir, tiny_sincos_dir, tiny_v15_dir):
    """Our pipeline per (variant, scheduler), loaded once."""
    dirs = {"rope": tiny_rope_dir, "sincos": tiny_sincos_dir, "1.5": tiny_v15_dir}
    cache = {}

    def get(variant, scheduler=None):
        key = (variant, scheduler)
        if key not in cache:
            cache[key] = Pipeline.from_pretrained(dirs[variant], scheduler=scheduler)
        return cache[key]

    get.dirs = dirs
    return get


def run_reference(folder, scheduler, prompt, seed=None, generator=None, **kwargs):
    """Final latents (as the loop leaves them) and uint8 frames of the reference pipeline."""
    pipe = load_reference_pipeline(folder, scheduler)
    captured = {}

    def keep_latents(pipe, step, timestep, tensors):
        captured["latents"] = tensors["latents"]
        return {}

    generator = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt, generator=generator, output_type="np", callback_on_step_end=keep_latents, **kwargs)
    frames = (out.frames * 255).round().astype(np.uint8)  # the reference's own PIL conversion
    return captured["latents"], frames


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def assert_matches(ours, ref_latents, ref_frames):
    assert ours.latents.shape == ref_latents.shape
    assert rel_err(ours.latents, ref_latents) <= 1e-4
    assert len(ours.frames) == len(ref_frames)
    for got, want in zip(ours.frames, ref_frames):
        assert got.dtype == np.uint8 and got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


# name: (variant, scheduler override, call arguments)
CASES = {
    "rope-ddim-2prompts-negative": (
        "rope",
        None,
        dict(prompt=["a cat sits on the mat", "a dog runs"], negative_prompt=["the sun", ""]),
    ),
    "rope-dpm-dynamic-cfg": ("rope", "dpm", dict(prompt="a panda plays a guitar", use_dynamic_cfg=True)),
    "sincos-ddim-dynamic-negative": (
        "sincos",
        None,
        dict(prompt="a bird flies", negative_prompt="the hill", guidance_scale=5.0, use_dynamic_cfg=True),
    ),
    "sincos-no-guidance-default-size": (
        "sincos",
        None,
        dict(prompt="a red sun", guidance_scale=1.0, height=None, width=None),  # the model's 64x64
    ),
    "v15-dpm-padding-2prompts": ("1.5", None, dict(prompt=["waves crash on the rocks", "a cat"])),
    "v15-ddim-17-frames": ("1.5", "ddim", dict(prompt="the green park", guidance_scale=4.0, num_frames=17)),
    # One step: DPM's first step is also its last (one noise draw, no history).
    "rope-dpm-1-step-wide": ("rope", "dpm", dict(prompt="a cat", num_inference_steps=1, height=16, width=64)),
    # One frame: the sin-cos table rebuilt for a single latent frame; 1.5 pads it to two.
    "sincos-1-frame-2-steps": ("sincos", "dpm", dict(prompt="a dog", num_frames=1, num_inference_steps=2)),
    "v15-1-frame-tall": ("1.5", None, dict(prompt="a bird flies", num_frames=1, height=48, width=32)),
    # RoPE models take any text length: prompts cut at 4 tokens, or padded to 32.
    "rope-4-text-tokens": ("rope", None, dict(prompt="a panda plays a small guitar", max_sequence_length=4)),
    "v15-32-text-tokens": ("1.5", None, dict(prompt=["a cat", "the sun"], guidance_scale=1.5, max_sequence_length=32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(pipes, case):
    variant, scheduler, call = CASES[case]
    kwargs = SMALL | dict(guidance_scale=6.0) | call
    prompt = kwargs.pop("prompt")
    ref_latents, ref_frames = run_reference(pipes.dirs[variant], scheduler, prompt, seed=7, **kwargs)
    ours = pipes(variant, scheduler)(prompt, seed=7, progress=False, **kwargs)
    assert_matches(ours, ref_latents, ref_frames)
    assert ours.seed == 7
    if variant == "1.5":
        # The odd latent frame count gets one noise frame in front, dropped before decoding.
        latent_frames = (kwargs["num_frames"] - 1) // 4 + 1
        assert ours.padding_frames == 1 and ours.latents.shape[1] == latent_frames + 1
    assert ours.frames[0].shape[0] == kwargs["num_frames"]


def test_generator_list_matches_reference(pipes):
    def generators():
        return [torch.Generator().manual_seed(s) for s in (3, 11)]

    kwargs = SMALL | dict(guidance_scale=6.0)
    ref = run_reference(pipes.dirs["rope"], "dpm", ["a cat", "a dog"], generator=generators(), **kwargs)
    ours = pipes("rope", "dpm")(["a cat", "a dog"], generator=generators(), progress=False, **kwargs)
    assert_matches(ours, *ref)
    assert ours.seed is None


def test_videos_per_prompt(pipes):
    """The reference ignores num_videos_per_prompt; ours gives N videos per prompt, noise drawn for the
    whole batch, so it equals the reference run on the prompt repeated N times."""
    kwargs = SMALL | dict(guidance_scale=6.0, seed=5)
    ours = pipes("rope")("a cat sits on the mat", num_videos_per_prompt=2, progress=False, **kwargs)
    assert len(ours.frames) == 2 and ours.latents.shape[0] == 2
    assert np.abs(ours.frames[0].astype(int) - ours.frames[1].astype(int)).max() > 10
    assert_matches(ours, *run_reference(pipes.dirs["rope"], None, ["a cat sits on the mat"] * 2, **kwargs))

    pairs = pipes("rope")(["a", "b"], num_videos_per_prompt=2, output_type="latent", progress=False, **kwargs)
    assert pairs.frames is None and pairs.latents.shape[0] == 4
    # Prompt-major: a, a, b, b, each with its own negative prompt.
    ref_latents, _ = run_reference(
        pipes.dirs["rope"], None, ["a", "a", "b", "b"], negative_prompt=["x", "x", "y", "y"], **kwargs
    )
    negative = pipes("rope")(
        ["a", "b"], negative_prompt=["x", "y"], num_videos_per_prompt=2, output_type="latent", progress=False, **kwargs
    )
    assert rel_err(negative.latents, ref_latents) <= 1e-4


def test_given_latents_match_reference(pipes):
    """`latents=` replaces the noise draw as the reference's argument of that name does; for 1.5 they
    include the padding frame. DPM still draws its step noise from the seed."""
    noise = torch.randn(2, 4, 4, 4, 6, generator=torch.Generator().manual_seed(99))  # 9 frames: 3 + 1 padding
    kwargs = SMALL | dict(guidance_scale=6.0, seed=1)
    prompts = ["a cat", "the green park"]
    ref = run_reference(pipes.dirs["1.5"], None, prompts, latents=noise.clone(), **kwargs)
    ours = pipes("1.5")(prompts, latents=noise, progress=False, **kwargs)
    assert_matches(ours, *ref)
    assert not torch.equal(ours.latents, pipes("1.5")(prompts, output_type="latent", progress=False, **kwargs).latents)


def test_decoding_a_15_calls_latents_drops_the_padding_frame_or_asks_for_it(pipes):
    """A 1.5 call's latents carry a padding frame at the front: `decode(out.latents)` gave 16 frames, the
    first of them made from it, without a word. Now the padded form is refused, naming `padding_frames`,
    and with it the frames are the direct call's. A 1.0 model's latents need no say."""
    pipe = pipes("1.5")
    kwargs = SMALL | dict(num_inference_steps=2, seed=1, progress=False)
    direct = pipe("a cat", **kwargs)
    out = pipe("a cat", output_type="latent", **kwargs)
    assert out.latents.shape[1] == 4 and out.padding_frames == 1
    with pytest.raises(InputError, match=r"have 4 frames.*padding_frames=N\): the call's VideoOutput.padding_frames"):
        pipe.decode(out.latents)
    frames = pipe.decode(out.latents, padding_frames=out.padding_frames)
    assert frames[0].shape == (9, 32, 48, 3) and np.array_equal(frames[0], direct.frames[0])
    assert pipe.decode(out.latents, padding_frames=0)[0].shape[0] == 16  # an 8k+5-frame video's latents
    with pytest.raises(InputError, match="padding_frames must be a whole number from 0 to 3"):
        pipe.decode(out.latents, padding_frames=4)
    latents = torch.randn(1, 3, pipes("rope").vae.config.latent_channels, 4, 6)
    assert pipes("rope").decode(latents)[0].shape == (9, 32, 48, 3)


def test_seed_reproduces_and_random_seed_is_reported(pipes):
    pipe = pipes("rope")
    kwargs = SMALL | dict(output_type="latent", progress=False)
    first = pipe("a cat", **kwargs)
    assert isinstance(first.seed, int)
    again = pipe("a cat", seed=first.seed, **kwargs)
    assert torch.equal(first.latents, again.latents)
    assert not torch.equal(pipe("a cat", seed=first.seed + 1, **kwargs).latents, first.latents)


def test_callback_and_timings(pipes):
    seen = []
    out = pipes("rope")("a cat", seed=1, progress=False, callback=lambda *step: seen.append(step), **SMALL)
    assert [(i, t) for i, t, _ in seen] == [(0, 999), (1, 666), (2, 332)]
    assert torch.equal(seen[-1][2], out.latents)
    assert set(out.timings) == {"text", "denoise", "decode"}


def test_defaults_follow_the_model(pipes):
    v10, v15 = pipes("rope"), pipes("1.5")
    assert (v10.version, v10.default_size, v10.default_num_frames, v10.default_fps) == ("1.0", (64, 64), 9, 8)
    assert (v15.version, v15.default_fps) == ("1.5", 16)


def test_dynamic_cfg_schedules():
    steps = list(range(999, 0, -20))  # the 50 trailing timesteps 999 ... 19
    reference = guidance_schedule(6.0, steps, dynamic=True, variant="reference")
    # The reference oscillates (timestep clock): values from diffusers #9641.
    assert [round(g, 2) for g in reference[:7]] == [2.29, 2.54, 6.97, 6.42, 2.79, 4.27, 1.04]
    smooth = guidance_schedule(6.0, steps, dynamic=True, variant="smooth")
    assert smooth[0] == pytest.approx(7.0) and smooth[-1] < 1.01
    assert all(a >= b for a, b in zip(smooth, smooth[1:]))
    assert guidance_schedule(6.0, steps) == [6.0] * 50
    assert dynamic_guidance_scale(6.0, 999, 50) == 1 + 6 * (1 - math.cos(math.pi * ((50 - 999) / 50) ** 5)) / 2


class GpuGenerator(torch.Generator):
    """A generator that says it is on a GPU: what a pipeline on the CPU may be handed by mistake."""

    @property
    def device(self):
        return torch.device("cuda", 0)


BAD_REQUESTS = {
    "frames not 8k+1": (dict(num_frames=10), r"8k\+1 .*nearest valid: 9 or 17"),
    "frames 4k+1 but even latents": (dict(num_frames=13), "8k"),
    "frames zero": (dict(num_frames=0), "8k"),
    "height not /16": (dict(height=40), "height must be a positive multiple of 16"),
    "width zero": (dict(width=0), "width must be a positive multiple of 16"),
    "empty prompt list": (dict(prompt=[]), "empty"),
    "prompt not text": (dict(prompt=3), "prompt must be"),
    "negative count": (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative prompts"),
    "steps zero": (dict(num_inference_steps=0), "num_inference_steps"),
    "steps float": (dict(num_inference_steps=2.5), "num_inference_steps"),
    "guidance nan": (dict(guidance_scale=float("nan")), "guidance_scale"),
    "videos per prompt": (dict(num_videos_per_prompt=0), "num_videos_per_prompt"),
    "dynamic variant": (dict(dynamic_cfg="wave"), "dynamic_cfg"),
    "output type": (dict(output_type="pil"), "output_type"),
    "seed and generator": (dict(seed=1, generator=torch.Generator()), "either seed or generator"),
    "negative seed": (dict(seed=-1), "seed"),
    "generator count": (dict(generator=[torch.Generator()] * 3), "generators"),
    "generator on another device": (
        dict(generator=GpuGenerator()), r'on cuda:0 cannot draw noise for a pipeline on cpu: use torch.Generator\("cpu'
    ),
    "generators on two devices": (dict(prompt=["a", "b"], generator=[torch.Generator(), GpuGenerator()]),
                                  r"the generators are on different devices \(cpu, cuda:0\)"),
    "dynamic CFG as a string": (dict(use_dynamic_cfg="false"), "use_dynamic_cfg must be True or False, got 'false'"),
    "frames as a string": (dict(num_frames="9"), "num_frames must be a whole number of the form 8k\\+1"),
    "callback not callable": (dict(callback=3), "callback must be a function"),
    "latents on meta": (dict(latents=torch.zeros(1, 3, 4, 4, 6, device="meta")), "latents must be a float tensor"),
    "reschedule noise as a string": (dict(reschedule_noise="no"), "reschedule_noise must be True or False, got 'no'"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_fail_before_any_work(pipes, monkeypatch, case):
    pipe = pipes("rope")

    def no_work(*args, **kwargs):
        raise AssertionError("heavy work started before the request was checked")

    monkeypatch.setattr(pipe.text_encoder, "encode", no_work)
    monkeypatch.setattr(pipe.transformer, "forward", no_work)
    kwargs = SMALL | dict(prompt="a cat") | BAD_REQUESTS[case][0]
    with pytest.raises(InputError, match=BAD_REQUESTS[case][1]):
        pipe(progress=False, **kwargs)


def test_pipeline_level_mistakes_are_library_errors(pipes, tmp_path, monkeypatch):
    """Mistakes in the arguments around a call: each an InputError or LoadError saying what to change."""
    pipe = pipes("rope")
    folder = pipes.dirs["rope"]
    for device in ("mps", "meta"):
        with pytest.raises(InputError, match=f"device '{device}' is not supported; use cpu, cuda or cuda:N"):
            Pipeline.from_pretrained(folder, device=device)
    for scheduler in (3, object()):
        with pytest.raises(InputError, match="scheduler must be \"ddim\", \"dpm\" or a cogvideox.schedulers object"):
            Pipeline.from_pretrained(folder, scheduler=scheduler)
        with pytest.raises(InputError, match="scheduler must be"):
            pipe.with_scheduler(scheduler)
    with pytest.raises(InputError, match="with_scheduler needs a scheduler"):
        pipe.with_scheduler(None)
    with pytest.raises(InputError, match="lora must be a path, a \\(path, scale\\) pair or a list of them, got 5"):
        Pipeline.from_pretrained(folder, lora=5)
    with pytest.raises(InputError, match="offload look-ahead must be a whole number"):
        pipe.enable_offload("stream", "cpu", lookahead="2")
    for flag in ("vae_tiling", "vae_slicing"):  # "no" would be read as yes
        with pytest.raises(InputError, match=f"{flag} must be True or False, got 'no'"):
            Pipeline.from_pretrained(folder, **{flag: "no"})
    with pytest.raises(InputError, match="progress must be True or False, got 'no'"):
        pipe("a cat", progress="no", **SMALL)
    pipe.enable_offload("none")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match=f"cannot save to {afile}: it is a file"):
        pipe.save_pretrained(afile)
    with pytest.raises(InputError, match="cannot save to .*: Not a directory"):
        pipe.save_pretrained(afile / "sub")
    assert afile.read_text() == "x"


def test_with_scheduler_keeps_the_models_recommended_guidance(tiny_rope_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_rope_dir, folder)
    (folder / "sampling.json").write_text('{"guidance_scale": 2.5}')
    pipe = Pipeline.from_pretrained(folder)
    for kind in ("ddim", "dpm"):
        assert pipe.with_scheduler(kind).sampling_defaults == pipe.sampling_defaults
    assert pipe.sampling_defaults["guidance_scale"] == 2.5
    saved = pipe.with_scheduler("dpm").save_pretrained(tmp_path / "saved")
    assert Pipeline.from_pretrained(saved).sampling_defaults["guidance_scale"] == 2.5


def test_a_broken_scheduler_config_is_a_load_error(tiny_rope_dir, tmp_path):
    import shutil

    from cogvideox import LoadError

    folder = tmp_path / "model"
    shutil.copytree(tiny_rope_dir, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "Foo"')
    with pytest.raises(LoadError, match="scheduler_config.json is not valid JSON"):
        Pipeline.from_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "Foo"}')
    with pytest.raises(LoadError, match="'Foo', which is not a CogVideoX scheduler; name the scheduler to use instead"):
        Pipeline.from_pretrained(folder)


# What makes the host wait for the device when the tensor lives there.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_one_host_read_per_step(pipes, monkeypatch, scheduler):
    """A host read of a device tensor waits for the device: the loop makes one per step (the NaN check)
    and one per call (the timesteps), none in the model. A DPM step draws its noise (CPU work with a
    seed) after the model is queued and before that read, so the device runs the model meanwhile."""
    import cogvideox.pipeline as pipeline_module
    from cogvideox import sampling, schedulers

    pipe = pipes("rope", scheduler)
    log, inside = [], [False]
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def read(self, *args, _real=real, _name=name, **kwargs):
            if inside[0]:
                log.append(("read", _name))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    real_randn = schedulers.randn
    monkeypatch.setattr(schedulers, "randn", lambda *a, **k: (log.append(("draw",)), real_randn(*a, **k))[1])
    real_forward = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: (log.append(("model",)), real_forward(*a, **k))[1])

    def denoise(*args, **kwargs):
        inside[0] = True
        try:
            return sampling.denoise(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(pipeline_module, "denoise", denoise)
    pipe("a cat", seed=0, progress=False, output_type="latent", **SMALL)
    assert log[0] == ("read", "tolist")
    steps = log[1:]
    if scheduler == "dpm":  # 1 draw on the first step, 2 on the middle one, 1 on the last
        want = ["model", "draw", "read", "model", "draw", "draw", "read", "model", "draw", "read"]
    else:
        want = ["model", "read"] * 3
    assert [entry[0] for entry in steps] == want
    assert all(entry == ("read", "__bool__") for entry in steps if entry[0] == "read")


def test_nan_latents_stop_the_run(pipes, monkeypatch):
    pipe = pipes("rope")
    real_forward = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: real_forward(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match=r"step 1 of 3 \(timestep 999\) running in float32"):
        pipe("a cat", seed=0, progress=False, **SMALL)


def test_the_models_sampling_json_sets_the_guidance_defaults(tiny_rope_dir, tmp_path):
    """A folder's `sampling.json` changes what the call does when no guidance is given; the reference's
    defaults hold without it; `save_pretrained` keeps it; diffusers still loads the folder."""
    kwargs = SMALL | dict(seed=3, output_type="latent", progress=False)
    plain = Pipeline.from_pretrained(tiny_rope_dir)
    assert plain.sampling_defaults == {"guidance_scale": 6.0, "use_dynamic_cfg": False, "dynamic_cfg": "reference"}
    six = plain("a cat", **kwargs).latents
    assert torch.equal(six, plain("a cat", guidance_scale=6.0, **kwargs).latents)

    folder = tmp_path / "model"
    shutil.copytree(tiny_rope_dir, folder)
    (folder / "sampling.json").write_text(json.dumps({"guidance_scale": 2.5, "use_dynamic_cfg": True}))
    pipe = Pipeline.from_pretrained(folder)
    recommended = pipe("a cat", **kwargs).latents
    assert torch.equal(recommended, plain("a cat", guidance_scale=2.5, use_dynamic_cfg=True, **kwargs).latents)
    assert not torch.equal(recommended, six)
    assert torch.equal(pipe("a cat", guidance_scale=6.0, use_dynamic_cfg=False, **kwargs).latents, six)

    saved = pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((saved / "sampling.json").read_text()) == {"guidance_scale": 2.5, "use_dynamic_cfg": True}
    assert not (plain.save_pretrained(tmp_path / "plain") / "sampling.json").exists()
    load_reference_pipeline(folder, None)  # the extra file does not trouble the reference


@pytest.mark.parametrize(
    "content, message",
    [
        ({"guidance": 3}, "unknown settings \\['guidance'\\]"),
        ({"guidance_scale": "high"}, "guidance_scale must be a number"),
        ({"guidance_scale": -1}, "guidance_scale must be a number >= 0"),
        ({"use_dynamic_cfg": "yes"}, "use_dynamic_cfg must be true or false"),
        ({"dynamic_cfg": "fast"}, "dynamic_cfg must be"),
        ([3], "must hold a JSON object"),
    ],
)
def test_a_bad_sampling_json_is_a_load_error(tmp_path, content, message):
    (tmp_path / "sampling.json").write_text(json.dumps(content))
    with pytest.raises(LoadError, match=message):
        loading.read_sampling_defaults(tmp_path)


def test_channels_last_vae_is_opt_in_and_changes_rounding_only(tiny_rope_dir, tmp_path):
    # Measured on an H200 (BENCHMARKS.md): channels-last made the 5B decode 2.3x slower, so no pipeline
    # converts the VAE by itself; cogvideox.fast.vae_channels_last stays for those who measure a gain.
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    weight = pipe.vae.decoder.conv_in.conv.weight
    assert not weight.is_contiguous(memory_format=torch.channels_last_3d)
    latents = torch.randn(1, 3, pipe.vae.config.latent_channels, 4, 6, generator=torch.Generator().manual_seed(0))
    before = pipe.decode(latents)
    fast.vae_channels_last(pipe.vae)
    assert pipe.vae.decoder.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    after = pipe.decode(latents)
    assert after[0].shape == before[0].shape == (9, 32, 48, 3)
    assert np.abs(after[0].astype(int) - before[0].astype(int)).max() <= 1  # rounding only
    pipe.save_pretrained(tmp_path / "saved")  # channels-last weights are written in the usual layout
    again = Pipeline.from_pretrained(tmp_path / "saved").decode(latents)
    np.testing.assert_array_equal(again[0], before[0])


@pytest.mark.parametrize(
    "latents, kwargs, message",
    [
        (torch.full((1, 2, 4, 4, 6), float("nan")), {}, "the latents hold NaN or infinite values"),
        (torch.zeros(1, 2, 4, 4, 6).index_fill(1, torch.tensor([1]), float("inf")), {}, "NaN or infinite"),
        (torch.zeros(1, 2, 4, 4, 6, device="meta"), {}, "decode takes latents on the CPU or a GPU, got them on meta"),
        (torch.zeros(1, 2, 4, 4, 6), dict(progress="no"), "progress must be True or False, got 'no'"),
    ],
)
def test_decode_refuses_latents_it_would_turn_into_garbage(pipes, latents, kwargs, message):
    """Non-finite latents decode to a video of noise without a word; a flag given as a string is read as
    True. Each is an InputError before the VAE runs."""
    pipe = pipes("rope")
    with pytest.raises(InputError, match=message):
        pipe.decode(latents, **kwargs)

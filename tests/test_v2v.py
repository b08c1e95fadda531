"""Video-to-video against diffusers' CogVideoXVideoToVideoPipeline on tiny models, seed for seed."""

import re

import numpy as np
import pytest
import torch
from helpers import assert_same_video, cli_status, load_reference_pipeline, run_reference, sample_frames

from cogvideox import InputError, Pipeline, export_video
from cogvideox.conditioning import strength_timesteps
from cogvideox.request import check_strength
from cogvideox.schedulers import DDIMScheduler

pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL")

SMALL = dict(height=32, width=48, num_inference_steps=5, max_sequence_length=16)


def pil_frames(frames):
    return [PIL.Image.fromarray(frame) for frame in frames]


@pytest.fixture(scope="module")
def pipes(tiny_rope_dir, tiny_sincos_dir, tiny_v15_dir):
    dirs = {"rope": tiny_rope_dir, "sincos": tiny_sincos_dir, "1.5": tiny_v15_dir}
    cache = {}

    def get(variant, scheduler=None):
        if (variant, scheduler) not in cache:
            cache[variant, scheduler] = Pipeline.from_pretrained(dirs[variant], scheduler=scheduler)
        return cache[variant, scheduler]

    get.dirs = dirs
    return get


# name: (variant, scheduler override, frames in the input video, call arguments)
CASES = {
    "rope-ddim-strength-0.8": ("rope", None, 9, dict(prompt="a cat sits on the mat", guidance_scale=6.0)),
    "sincos-dynamic-cfg-strength-0.5": (
        "sincos",
        None,
        9,
        dict(prompt="a bird flies", strength=0.5, use_dynamic_cfg=True, negative_prompt="the hill"),
    ),
    "rope-dpm-strength-1": ("rope", "dpm", 9, dict(prompt="a dog runs", strength=1.0, guidance_scale=1.0)),
    # 1.5 with an even latent count (13 frames -> 4): the reference's own 1.5 case, no padding. Asked for
    # by name: by default 1.5 takes the longest 8k+1 prefix (9 frames), padded, to keep the length.
    "v15-dpm-13-frames": ("1.5", None, 13, dict(prompt="waves crash on the rocks", strength=0.6, num_frames=13)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(pipes, case):
    variant, scheduler, count, call = CASES[case]
    kwargs = SMALL | call
    prompt = kwargs.pop("prompt")
    frames = sample_frames(count)

    reference = load_reference_pipeline(pipes.dirs[variant], scheduler, task="video")
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "num_frames"}  # the reference takes them all
    ref = run_reference(reference, seed=7, prompt=prompt, video=pil_frames(frames), **ref_kwargs)
    steps = []
    ours = pipes(variant, scheduler)(
        prompt, video=frames, seed=7, progress=False, callback=lambda i, t, x: steps.append(t), **kwargs
    )
    latent_err, frame_err = assert_same_video(ours, *ref)
    print(f"{case}: latents rel. error {latent_err:.2e}, frames max diff {frame_err}/255")
    strength = kwargs.get("strength", 0.8)
    assert len(steps) == int(SMALL["num_inference_steps"] * strength)
    assert set(ours.timings) == {"text", "encode", "denoise", "decode"}


def test_two_prompts_and_generators_match_reference(pipes):
    """One posterior sample per video (generator i for video i), as the reference draws when it is given
    the video once per prompt."""

    def generators():
        return [torch.Generator().manual_seed(s) for s in (3, 11)]

    frames = sample_frames(9)
    prompts = ["a cat", "the bright red sun"]
    reference = load_reference_pipeline(pipes.dirs["rope"], "dpm", task="video")
    video = [pil_frames(frames)] * 2
    ref = run_reference(reference, generator=generators(), prompt=prompts, video=video, **SMALL)
    ours = pipes("rope", "dpm")(prompts, video=frames, generator=generators(), progress=False, **SMALL)
    assert_same_video(ours, *ref)


def test_strength_cuts_the_schedule():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)
    tail = strength_timesteps(scheduler.timesteps, 0.8)
    assert len(tail) == 40 and int(tail[0]) == 799 and int(tail[-1]) == 19
    assert torch.equal(strength_timesteps(scheduler.timesteps, 1.0), scheduler.timesteps)
    assert len(strength_timesteps(scheduler.timesteps, 0.01)) == 0


def test_the_least_strength_named_runs_a_step():
    """The strength an error suggests runs a step for every step count: 1/3 shown as 0.333 ran none."""
    with pytest.raises(InputError, match=r"strength 0.3 of 3 steps runs no step; use strength >= 0.334 "):
        check_strength(0.3, 3)
    for steps in range(1, 1001):
        with pytest.raises(InputError, match="runs no step") as error:
            check_strength(1e-6, steps)
        least = float(re.search(r">= (\S+) ", str(error.value)).group(1))
        assert int(steps * least) == 1 and check_strength(least, steps) == least, steps


def test_low_strength_stays_close_to_the_input(pipes):
    frames = sample_frames(9, height=32, width=48)
    pipe = pipes("rope")
    gentle = pipe("a cat", video=frames, strength=0.2, seed=0, progress=False, **SMALL).frames[0]
    strong = pipe("a cat", video=frames, strength=1.0, seed=0, progress=False, **SMALL).frames[0]
    error = [np.abs(out.astype(int) - frames.astype(int)).mean() for out in (gentle, strong)]
    assert error[0] < error[1]


def test_reads_a_file_and_takes_the_longest_valid_prefix(pipes, tmp_path):
    path = export_video(sample_frames(12, height=32, width=48), tmp_path / "in.mp4", fps=8)
    out = pipes("rope")("a cat", video=path, seed=0, progress=False, **SMALL)
    assert out.frames[0].shape == (9, 32, 48, 3)  # 12 frames in: the first 9 (8k+1) are used


class _Enough(Exception):
    """Raised where a test has seen what it needed and the run need not go on."""


def test_a_long_video_is_decoded_only_as_far_as_it_is_used(pipes, tiny_rope_dir, tmp_path, monkeypatch):
    """The pipeline, `generate --video` and `invert` decode the frames the request can use, not a whole
    file that may be minutes long (gigabytes of frames)."""
    import cogvideox.video
    from cogvideox.cli import main

    path = export_video(sample_frames(25, height=32, width=48), tmp_path / "long.mp4", fps=8)
    assert cogvideox.video.read_video(path, max_frames=9)[0].shape == (9, 32, 48, 3)
    read = cogvideox.video.read_frames
    limits = []

    def spy(path, fps, max_frames):
        limits.append((max_frames, fps))
        return read(path, fps, max_frames)

    def enough(*args, **kwargs):
        raise _Enough

    monkeypatch.setattr(cogvideox.video, "read_frames", spy)
    pipe = pipes("rope")  # a 9-frame model
    with pytest.raises(InputError, match="num_frames=33 but the video has only 25 frames"):
        pipe("a cat", video=path, num_frames=33, **SMALL)
    monkeypatch.setattr(pipe.vae, "encode", enough)
    with pytest.raises(_Enough):
        pipe("a cat", video=path, progress=False, **SMALL)
    assert limits == [(33, None), (9, None)]  # the library takes the frames as stored
    monkeypatch.setattr(Pipeline, "from_pretrained", enough)
    model = ["--model", str(tiny_rope_dir), "--quiet"]
    for argv in (["generate", "a cat", "--video", str(path), "--frames", "17", *model],
                 ["invert", str(path), "-o", str(tmp_path / "l.safetensors"), *model]):
        with pytest.raises(_Enough):
            main(argv)
    assert limits == [(33, None), (9, None), (17, 8), (9, 8)]  # generate and invert sample at the model's rate


def test_v15_pads_an_odd_latent_count_like_text_to_video(pipes):
    """9 frames -> 3 latent frames: the reference refuses; we put a copy of the first latent frame in
    front (dropped before decoding), so the output has the input's length."""
    out = pipes("1.5")("a cat", video=sample_frames(9), seed=0, progress=False, **SMALL)
    assert out.padding_frames == 1 and out.latents.shape[1] == 4
    assert out.frames[0].shape[0] == 9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=0.0), r"strength must be a number in \(0, 1\]"),
        (dict(strength=1.5), r"strength must be a number in \(0, 1\]"),
        (dict(strength=0.1), "runs no step; use strength >= 0.2"),
        (dict(num_frames=17), "num_frames=17 but the video has only 9 frames"),
        (dict(num_frames=5), r"num_frames must be 8k\+1"),
        (dict(height=40), "height must be a positive multiple of 16"),
        (dict(video=np.zeros((0, 32, 32, 3), np.uint8)), "F >= 1"),
        (dict(latents=torch.zeros(1, 3, 4, 4, 6)), "video-to-video starts from the video"),
    ],
)
def test_bad_requests_fail_before_any_work(pipes, monkeypatch, kwargs, message):
    pipe = pipes("rope")

    def no_work(*args, **kwargs):
        raise AssertionError("heavy work started before the request was checked")

    monkeypatch.setattr(pipe.text_encoder, "encode", no_work)
    monkeypatch.setattr(pipe.transformer, "forward", no_work)
    monkeypatch.setattr(pipe.vae, "encode", no_work)
    kwargs = SMALL | dict(video=sample_frames(9)) | kwargs
    with pytest.raises(InputError, match=message):
        pipe("a cat", progress=False, **kwargs)


def test_undecodable_video_file(pipes, tmp_path):
    broken = tmp_path / "in.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    with pytest.raises(InputError, match="cannot decode .*in.mp4 as a video") as failure:
        pipes("rope")("a cat", video=broken, **SMALL)
    assert str(failure.value).count(str(broken)) == 1 and "Errno" not in str(failure.value)
    with pytest.raises(InputError, match="no video file at"):
        pipes("rope")("a cat", video=tmp_path / "missing.mp4", **SMALL)


def test_cli_generate_from_a_video(tiny_rope_dir, tmp_path, capsys):
    from cogvideox import read_video
    from cogvideox.cli import main

    source = export_video(sample_frames(9, height=32, width=48), tmp_path / "in.mp4", fps=8)
    out = tmp_path / "out.mp4"
    argv = ["generate", "a cat", "--model", str(tiny_rope_dir), "--video", str(source), "--strength", "0.5",
            "--height", "32", "--width", "48", "--steps", "4", "--max-sequence-length", "16", "--quiet",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "encode" in capsys.readouterr().out
    assert read_video(out)[0].shape == (9, 32, 48, 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--video", "BROKEN"], "cannot decode"),
        (["--video", "SOURCE", "--strength", "0"], "argument --strength: expected a number in (0, 1]"),
        (["--video", "SOURCE", "--frames", "17"], "the video has only 9 frames"),
    ],
)
def test_cli_mistakes_fail_before_loading(tiny_rope_dir, tmp_path, capsys, monkeypatch, extra, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    source = export_video(sample_frames(9, height=32, width=48), tmp_path / "in.mp4", fps=8)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"nothing to see")
    names = {"SOURCE": str(source), "BROKEN": str(broken)}
    argv = ["generate", "a cat", "--model", str(tiny_rope_dir), "--quiet", *[names.get(e, e) for e in extra]]
    assert cli_status(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_frame_rules_of_the_released_models():
    """By default the model's frame count, or the longest 8k+1 prefix of a shorter video (1.5 padded);
    1.5 also takes, when asked, an even latent count as the reference requires (8k+5 frames, unpadded)."""
    from cogvideox.models.config import VAEConfig
    from cogvideox.models.transformer import TRANSFORMER_PRESETS
    from cogvideox.request import check_request

    vae, v10, v15 = VAEConfig(), TRANSFORMER_PRESETS["CogVideoX-5b"], TRANSFORMER_PRESETS["CogVideoX1.5-5B"]
    request = check_request(v10, vae, "a cat", task="video", video_frames=60)
    assert (request.num_frames, request.latent_frames, request.strength) == (49, 13, 0.8)
    assert request.denoising_steps == 40
    assert check_request(v10, vae, "a cat", task="video", video_frames=48).num_frames == 41
    assert check_request(v10, vae, "a cat", task="video", video_frames=60, num_frames=57).num_frames == 57
    request = check_request(v15, vae, "a cat", task="video", video_frames=100)
    assert (request.num_frames, request.height, request.width) == (81, 768, 1360)
    assert (request.latent_frames, request.padding_frames) == (22, 1)
    request = check_request(v15, vae, "a cat", task="video", video_frames=100, num_frames=85)
    assert (request.latent_frames, request.padding_frames) == (22, 0)
    with pytest.raises(InputError, match=r"8k\+1"):
        check_request(v15, vae, "a cat", task="video", video_frames=100, num_frames=83)
    with pytest.raises(InputError, match="image-to-video model"):
        check_request(TRANSFORMER_PRESETS["CogVideoX-5b-I2V"], vae, "a cat", task="video", video_frames=49)


def test_generate_samples_the_video_at_the_models_rate(tiny_rope_dir, tmp_path, monkeypatch, capsys):
    """A 24 fps clip redrawn by a model trained at 8 fps: every third frame by default, so that the
    redrawn video plays at the clip's speed; --video-fps picks another rate, 'source' every frame."""
    from cogvideox.cli import main

    ramp = np.zeros((30, 32, 48, 3), np.uint8)
    for i in range(30):
        ramp[i] = i * 8
    path = export_video(ramp, tmp_path / "ramp.mp4", fps=24)
    taken = []

    def record_the_frames(self, prompt, **kwargs):
        taken.append([int(round(f.mean() / 8)) for f in kwargs["video"]])
        raise _Enough

    monkeypatch.setattr(Pipeline, "__call__", record_the_frames)
    common = ["--model", str(tiny_rope_dir), "--quiet", "--frames", "9"]
    for rate in ([], ["--video-fps", "12"], ["--video-fps", "source"]):
        with pytest.raises(_Enough):
            main(["generate", "a cat", "--video", str(path), *rate, *common])
    assert taken == [list(range(0, 27, 3)), list(range(0, 18, 2)), list(range(9))]
    assert main(["generate", "a cat", "--video-fps", "8", *common]) == 2
    assert "--video-fps only applies to video-to-video (--video)" in capsys.readouterr().err

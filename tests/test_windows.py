"""Longer videos from overlapping windows of the model's own length (`window_stride=`, `--windows`)."""

import numpy as np
import pytest
import torch

from cogvideox import InputError, Pipeline, read_video
from cogvideox.cli import main
from cogvideox.video import read_metadata
from cogvideox.windows import WindowedDenoiser, rescheduled_noise, taper, window_starts

SMALL = dict(height=32, width=48, num_inference_steps=2, max_sequence_length=16, progress=False)


def test_windows_cover_every_frame_and_end_on_the_last():
    assert window_starts(9, 5, 2) == [0, 2, 4]
    assert window_starts(13, 5, 2) == [0, 2, 4, 6, 8]
    assert window_starts(10, 5, 3) == [0, 3, 5]
    assert window_starts(4, 5, 2) == [0]
    weights = taper(5)
    assert torch.allclose(weights, torch.tensor([1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3]))
    assert torch.allclose(taper(4), taper(4).flip(0)) and (taper(4) > 0).all()


def test_the_blend_is_the_windows_weighted_mean():
    """A frame's output is the taper-weighted mean of what the windows covering it said of it; a model that
    treats frames alike gives its own output back; each window sees the window's rotary table."""
    rotary = object()
    calls = []

    def position_in_window(x, text, t, image_rotary_emb=None):
        assert image_rotary_emb is rotary and x.shape[1] == 3
        calls.append(x.shape)
        return torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1, 1).expand_as(x).clone()

    x = torch.zeros(1, 5, 2, 2, 2)
    out = WindowedDenoiser(position_in_window, window=3, stride=1, rotary=rotary)(x, None, None)
    assert len(calls) == 3  # windows at 0, 1, 2
    w = taper(3)  # [0.5, 1, 0.5]
    expected = [0.0, (w[1] * 1 + w[0] * 0) / (w[1] + w[0]), (w[2] * 2 + w[1] * 1 + w[0] * 0) / w.sum(),
                (w[2] * 2 + w[1] * 1) / (w[2] + w[1]), 2.0]  # fmt: skip
    assert torch.allclose(out[0, :, 0, 0, 0], torch.tensor(expected, dtype=torch.float32))

    x = torch.randn(2, 7, 2, 2, 2)
    same = WindowedDenoiser(lambda h, *a, **k: 3 * h, window=3, stride=2)(x, None, None)
    assert torch.allclose(same, 3 * x, atol=1e-6)


def test_rescheduled_noise_repeats_the_first_window_shuffled():
    generator = torch.Generator().manual_seed(7)
    noise = rescheduled_noise((1, 8, 2, 3, 3), 3, generator, "cpu", torch.float32)
    first = noise[0, :3]
    for stretch in (noise[0, 3:6], noise[0, 6:8]):
        matches = [[torch.equal(frame, f) for f in first] for frame in stretch]
        assert all(sum(row) == 1 for row in matches)  # each later frame is one of the first window's
        assert len({row.index(True) for row in matches}) == len(stretch)  # none twice within a stretch
    from cogvideox.schedulers import randn

    plain = randn((1, 3, 2, 3, 3), torch.Generator().manual_seed(7), device="cpu", dtype=torch.float32)
    assert torch.equal(first, plain[0])  # drawn as the pipeline draws its noise


def test_a_video_no_longer_than_the_models_own_is_unchanged(tiny_rope_dir):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    plain = pipe("a cat", seed=3, num_frames=9, **SMALL)
    windowed = pipe("a cat", seed=3, num_frames=9, window_stride=1, **SMALL)
    assert torch.equal(plain.latents, windowed.latents)


@pytest.mark.parametrize("variant", ["rope", "sincos"])
def test_longer_videos_through_windows(variant, tiny_rope_dir, tiny_sincos_dir):
    """Twice the tiny model's own length (5 latent frames through windows of 3): a seed gives one video,
    another than without windows; the sin-cos model (2B's positions) goes longer too."""
    pipe = Pipeline.from_pretrained({"rope": tiny_rope_dir, "sincos": tiny_sincos_dir}[variant])
    out = pipe("a cat", seed=3, num_frames=17, window_stride=1, **SMALL)
    assert out.frames[0].shape == (17, 32, 48, 3) and np.isfinite(out.latents).all()
    assert torch.equal(pipe("a cat", seed=3, num_frames=17, window_stride=1, **SMALL).latents, out.latents)
    plain = pipe("a cat", seed=3, num_frames=17, **SMALL)
    assert not torch.allclose(plain.latents, out.latents)
    fresh = pipe("a cat", seed=3, num_frames=17, window_stride=1, reschedule_noise=False, **SMALL)
    assert not torch.equal(fresh.latents, out.latents)


def test_windows_mistakes(tiny_rope_dir, tiny_i2v_dir, tiny_v15_dir):
    from helpers import sample_picture

    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    for kwargs, message in [
        (dict(window_stride=0), "window_stride must be a whole number of latent frames from 1 to 3, got 0"),
        (dict(window_stride=1.5), "got 1.5"),
        (dict(window_stride=1, riflex=True), "give riflex or window_stride for a longer video, not both"),
    ]:
        with pytest.raises(InputError, match=message):
            pipe("a cat", num_frames=17, **kwargs, **SMALL)
    with pytest.raises(InputError, match="windows are for text-to-video models"):
        Pipeline.from_pretrained(tiny_i2v_dir)("a cat", image=sample_picture(), window_stride=1,
                                               **(SMALL | dict(height=64, width=64)))  # fmt: skip
    with pytest.raises(InputError, match="CogVideoX 1.5 pairs latent frames"):
        Pipeline.from_pretrained(tiny_v15_dir)("a cat", num_frames=17, window_stride=1, **SMALL)
    cached = Pipeline.from_pretrained(tiny_rope_dir).accelerate(cache=0.1)
    with pytest.raises(InputError, match="the step cache cannot follow"):
        cached("a cat", num_frames=17, window_stride=1, **SMALL)


def test_generate_windows_is_recorded_and_made_again(capsys, tiny_rope_dir, tmp_path):
    made = tmp_path / "long.mp4"
    flags = ["--model", str(tiny_rope_dir), "--steps", "2", "--height", "32", "--width", "48",
             "--max-sequence-length", "16", "--seed", "5", "--quiet"]  # fmt: skip
    assert main(["generate", "a cat", "--frames", "17", "--windows", "-o", str(made), *flags]) == 0
    assert read_metadata(made)["windows"] == 1  # half of a 3-frame window
    capsys.readouterr()
    assert main(["info", str(made)]) == 0
    again = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("again: "))
    assert "--windows 1" in again
    remade = tmp_path / "again.mp4"
    assert main(["generate", "a cat", "--frames", "17", "--windows", "1", "-o", str(remade), *flags]) == 0
    assert np.array_equal(read_video(remade)[0], read_video(made)[0])

    assert main(["generate", "a cat", "--windows", "-o", str(tmp_path / "short.mp4"), *flags]) == 0
    assert "--windows changes nothing at 9 frames" in capsys.readouterr().err
    for extra, message in [(["--riflex"], "give --riflex or --windows"), (["--cache", "0.1"], "--cache cannot follow"),
                           (["--windows", "4"], "from 1 to 3, got 4")]:  # fmt: skip
        argv = ["generate", "a cat", "--frames", "17", "--windows", *extra, "-o", str(tmp_path / "x.mp4"), *flags]
        assert main(argv) == 2
        assert message in capsys.readouterr().err

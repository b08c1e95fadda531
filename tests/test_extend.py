"""Extending a video with an image-to-video model: the new clip starts from the video's last frame."""

import numpy as np
import pytest

from cogvideox import InputError, Pipeline, export_video, read_video
from cogvideox.cli import main
from cogvideox.extend import continue_video

SMALL = dict(num_inference_steps=2, max_sequence_length=16)


@pytest.fixture(scope="module")
def clip():
    """9 frames at 64x64: a gradient with a square moving right."""
    frames = np.zeros((9, 64, 64, 3), np.uint8)
    frames[..., 0] = np.linspace(20, 220, 64, dtype=np.uint8)[None, None, :]
    frames[..., 2] = 90
    for i in range(9):
        frames[i, 20:36, 2 + 4 * i : 18 + 4 * i] = 250
    return frames


def test_the_video_is_kept_and_the_new_clip_follows_from_its_last_frame(tiny_i2v_dir, clip):
    pipe = Pipeline.from_pretrained(tiny_i2v_dir)
    result = continue_video(pipe, clip, "a box", seed=3, progress=False, **SMALL)
    [extended] = result.frames
    assert extended.shape == (9 + 9 - 1, 64, 64, 3) and result.seed == 3
    assert np.array_equal(extended[:9], clip)  # untouched
    # The rest is the image-to-video clip from the last frame, without that frame's redrawing.
    direct = pipe("a box", image=clip[-1], seed=3, progress=False, **SMALL).frames[0]
    assert np.array_equal(extended[9:], direct[1:])

    two = continue_video(pipe, list(clip), "a square", seed=4, num_videos_per_prompt=2, progress=False, **SMALL)
    assert len(two.frames) == 2 and all(np.array_equal(v[:9], clip) for v in two.frames)
    assert not np.array_equal(two.frames[0], two.frames[1])


def test_mistakes_are_said_before_generating(tiny_i2v_dir, tiny_rope_dir, clip):
    with pytest.raises(InputError, match="needs an image-to-video model .* this model is text-to-video"):
        continue_video(Pipeline.from_pretrained(tiny_rope_dir), clip, "a cat", progress=False, **SMALL)
    pipe = Pipeline.from_pretrained(tiny_i2v_dir)
    with pytest.raises(InputError, match="has the video's height, 64; got height 32"):
        continue_video(pipe, clip, "a cat", height=32, progress=False, **SMALL)
    with pytest.raises(InputError, match="image cannot be given when extending"):
        continue_video(pipe, clip, "a cat", image=clip[0], progress=False, **SMALL)
    with pytest.raises(InputError, match=r"\[F, H, W, 3\]"):
        continue_video(pipe, clip[0], "a cat", progress=False, **SMALL)
    with pytest.raises(InputError, match="the video's size, 56x64, and this model draws widths and heights in "
                       "multiples of 16: resize or crop"):
        continue_video(pipe, clip[:, :, :56], "a cat", progress=False, **SMALL)


def test_generate_extend_writes_the_longer_video_at_the_videos_frame_rate(capsys, tiny_i2v_dir, clip, tmp_path):
    source = export_video(clip, tmp_path / "first.mp4", fps=10)
    output = tmp_path / "longer.mp4"
    argv = ["generate", "the square goes on", "--model", str(tiny_i2v_dir), "--extend", str(source),
            "-o", str(output), "--steps", "2", "--max-sequence-length", "16", "--seed", "5", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"wrote {output} (17 frames, 64x64, 10 fps, seed 5)")
    frames, fps = read_video(output)
    first, _ = read_video(source)
    assert frames.shape == (17, 64, 64, 3) and fps == 10
    # The first 9 frames are the source's, through one more H.264 encode.
    assert np.abs(frames[:9].astype(int) - first.astype(int)).mean() < 2

    # Chained: the longer video extended again.
    again = tmp_path / "longest.mp4"
    assert main([*argv[:5], str(output), "-o", str(again), *argv[8:]]) == 0
    assert read_video(again)[0].shape[0] == 25


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "x.png"], "give one of --image (image-to-video), --video (video-to-video) and --extend, not "
                               "--image and --extend"),
        (["--height", "32"], "so it has the video's height, 64; got height 32"),
        ([], "the new clip is drawn at the video's size, 40x64, and this model draws widths and heights in "
             "multiples of 16"),  # a video 40 wide
    ],
)
def test_generate_extend_mistakes_exit_2_before_loading(capsys, monkeypatch, tiny_i2v_dir, clip, tmp_path, extra,
                                                        message):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    source = export_video(clip if extra else clip[:, :, :40], tmp_path / "first.mp4", fps=8)
    argv = ["generate", "a cat", "--model", str(tiny_i2v_dir), "--extend", str(source), "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_generate_extend_needs_an_image_to_video_model_and_a_video(capsys, tiny_rope_dir, clip, tmp_path):
    source = export_video(clip, tmp_path / "first.mp4", fps=8)
    assert main(["generate", "a cat", "--model", str(tiny_rope_dir), "--extend", str(source), "--quiet"]) == 2
    assert "needs an image-to-video model" in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", str(tiny_rope_dir), "--extend", str(tmp_path / "no.mp4")]) == 2
    assert f"no video file at {tmp_path / 'no.mp4'}" in capsys.readouterr().err
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(b"not a video")
    assert main(["generate", "a cat", "--model", str(tiny_rope_dir), "--extend", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot decode {damaged} as a video" in err
    assert err.count(str(damaged)) == 1 and "Errno" not in err  # the path once, FFmpeg's words without its number

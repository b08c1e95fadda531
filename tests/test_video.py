"""MP4 (PyAV) and GIF (Pillow) writing, and reading back through PyAV."""

import os
import stat

import av
import numpy as np
import pytest

from cogvideox import InputError, export_video, read_video
from cogvideox.video import check_video_path


def moving_square(frames=9, height=48, width=64):
    """A smooth background with a bright square moving right: easy to compress, easy to check."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[..., 0] = np.linspace(0, 200, width, dtype=np.uint8)[None, None, :]
    video[..., 2] = np.linspace(50, 150, height, dtype=np.uint8)[None, :, None]
    for i in range(frames):
        video[i, 16:32, 4 + 4 * i : 20 + 4 * i] = 255
    return video


def test_roundtrip(tmp_path):
    video = moving_square()
    path = export_video(video, tmp_path / "clip.mp4", fps=8)
    frames, fps = read_video(path)
    assert frames.shape == video.shape and frames.dtype == np.uint8
    assert fps == 8
    # Lossy, but close: mean error of a few levels, and the square is where it was drawn.
    assert np.abs(frames.astype(int) - video.astype(int)).mean() < 3
    assert frames[-1, 24, 4 + 4 * 8 + 8].min() > 200 and frames[0, 24, 40].max() < 230
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary file left

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"


def test_gif_roundtrip_keeps_the_frames_and_the_frame_rate(tmp_path):
    """A name ending in .gif gives an animated GIF: every frame, in a 256-colour palette each (this
    video has few colours, so they come back exactly), looping, lasting frames / fps in all."""
    from PIL import Image

    video = np.zeros((9, 33, 63, 3), np.uint8)  # odd sizes: only H.264's yuv420p needs even ones
    video[:] = (40, 90, 160)
    video[:, 20:] = (200, 200, 200)
    for i in range(9):
        video[i, 8:16, 4 + 5 * i : 12 + 5 * i] = (255, 40, 0)
    path = export_video(video, tmp_path / "clip.gif", fps=8)
    frames, _ = read_video(path)
    assert np.array_equal(frames, video)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 9 and gif.info["loop"] == 0
        delays = []
        for index in range(gif.n_frames):
            gif.seek(index)
            delays.append(gif.info["duration"])
    assert delays == [120, 130, 130, 120, 120, 130, 130, 120, 120] and sum(delays) == 1120  # 9 / 8 s
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"]  # no temporary file left


@pytest.mark.parametrize(
    "count, fps, total_ms",
    [(49, 8, 6120), (81, 16, 5060), (10, 30, 330), (3, 1000, 60), (4, 0.5, 8000), (12, 23.976, 500)],
)
def test_gif_delays_add_up_to_the_video_length(count, fps, total_ms):
    from fractions import Fraction

    from cogvideox.video import check_fps, gif_delays

    delays = gif_delays(count, check_fps(fps))
    assert len(delays) == count and sum(delays) == total_ms
    assert all(d % 10 == 0 and d >= 20 for d in delays)  # hundredths, none played as 100 ms by browsers
    if fps <= 50:  # each frame starts at its time, to the hundredth (faster rates play at 50 fps)
        assert all(abs(sum(delays[:i]) - 1000 * i / Fraction(fps)) <= 5 for i in range(count))


def test_a_gif_faster_than_it_can_play_is_said_so(tmp_path, recwarn):
    export_video(moving_square(frames=3), tmp_path / "ok.gif", fps=50)
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"fast.gif plays at 50 fps, not 120: a GIF shows each frame for at least "
                                         r"20 ms; write an MP4 for a faster rate"):  # fmt: skip
        export_video(moving_square(frames=3), tmp_path / "fast.gif", fps=120)
    assert read_video(tmp_path / "fast.gif")[0].shape[0] == 3


def test_png_frames_are_the_frames_exactly_with_the_record(tmp_path):
    from PIL import Image

    from cogvideox.video import frame_paths, read_metadata

    video = moving_square(frames=12)
    (tmp_path / "frames").mkdir()
    pattern = tmp_path / "frames" / "shot-%03d.png"
    assert export_video(video, pattern, metadata={"prompt": "a square, déjà vu"}) == pattern
    files = frame_paths(pattern, 12)
    assert [f.name for f in files] == [f"shot-{i:03d}.png" for i in range(12)]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f.name for f in files]  # nothing else
    assert np.array_equal(np.stack([np.asarray(Image.open(f)) for f in files]), video)  # lossless
    assert read_metadata(files[5]) == read_metadata(pattern) == {"prompt": "a square, déjà vu"}


def test_png_frames_over_a_longer_sequence_leave_none_of_its_frames(tmp_path):
    from cogvideox.video import read_metadata, video_exists

    pattern = tmp_path / "%02d.png"
    assert not video_exists(pattern)
    export_video(moving_square(frames=9), pattern, metadata={"prompt": "first"})
    assert video_exists(pattern)
    (tmp_path / "notes-%02d.png").write_bytes(b"a file of another name")
    export_video(moving_square(frames=5), pattern, metadata={"prompt": "second"})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00.png", "01.png", "02.png", "03.png", "04.png", "notes-%02d.png"]
    assert read_metadata(tmp_path / "04.png") == {"prompt": "second"}


@pytest.mark.parametrize("name", ["100%-%04d.png", "%s-%04d.png", "%%04d.png"])
def test_a_percent_sign_that_is_no_frame_number_is_refused_before_writing(tmp_path, name):
    with pytest.raises(InputError, match="write any other % as %%"):
        export_video(moving_square(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    export_video(moving_square(frames=2), tmp_path / "100%%-%04d.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["100%-0000.png", "100%-0001.png"]


def test_list_of_frames_floats_and_other_fps(tmp_path):
    video = moving_square(frames=5)
    export_video(list(video), tmp_path / "list.mp4", fps=16)
    export_video(video.astype(np.float32) / 255, tmp_path / "float.mp4", fps=23.976)
    frames, fps = read_video(tmp_path / "list.mp4")
    assert frames.shape == video.shape and fps == 16
    frames, fps = read_video(tmp_path / "float.mp4")
    assert frames.shape == video.shape and fps == pytest.approx(23.976, abs=1e-3)


def test_a_gif_too_slow_to_store_is_an_input_error(tmp_path):
    """A GIF delay is a 16-bit count of hundredths: a frame, or a still stretch Pillow merges into one,
    of more than 655.35 s is refused in words, with nothing left behind."""
    moving, still = moving_square(frames=3), np.zeros((3, 32, 64, 3), np.uint8)
    for frames, fps, message in [(moving, 0.001, "at 0.001 fps a frame lasts 1000 s"),
                                 (still, 0.004, "stays on one picture for more than 655.35 s at 0.004 fps")]:
        with pytest.raises(InputError, match=message):
            export_video(frames, tmp_path / "slow.gif", fps=fps)
    assert not any(tmp_path.iterdir())
    export_video(moving, tmp_path / "slow.gif", fps=0.002)  # 500 s a frame: a GIF holds that
    assert read_video(tmp_path / "slow.gif")[0].shape == moving.shape


def test_tensors_and_pictures_are_frames_too(tmp_path):
    """A uint8 or float tensor (bf16 included), a list of tensors or of RGB pictures: the frames the same
    numpy array gives."""
    import torch
    from PIL import Image

    video = moving_square(frames=5)
    exact = torch.from_numpy(video)
    floats = exact.to(torch.bfloat16) / 255  # bf16 rounds: the frames come back within a step or two
    for name, frames, tolerance in [
        ("tensor", exact, 0),
        ("tensors", list(exact), 0),
        ("pictures", [Image.fromarray(frame) for frame in video], 0),
        ("bf16", floats, 2),
    ]:
        export_video(frames, tmp_path / f"{name}-%02d.png")
        read = np.stack([np.asarray(Image.open(tmp_path / f"{name}-{i:02d}.png")) for i in range(5)])
        assert np.abs(read.astype(int) - video).max() <= tolerance, name


def test_a_png_sequence_reads_back_as_a_video(tmp_path):
    """The frames export_video writes as frames/%04d.png come back whole from read_video and load_video
    (every frame: a sequence has no frame rate); a damaged or odd-sized frame is named."""
    from PIL import Image

    from cogvideox.conditioning import load_video

    video = moving_square(frames=6)
    pattern = tmp_path / "frames" / "%04d.png"
    pattern.parent.mkdir()
    export_video(video, pattern)
    frames, rate = read_video(pattern)
    assert np.array_equal(frames, video) and rate == 0.0
    assert np.array_equal(read_video(pattern, max_frames=2)[0], video[:2])
    assert np.array_equal(load_video(str(pattern), max_frames=4, fps=8), video[:4])
    with pytest.raises(InputError, match="no video file at"):
        read_video(tmp_path / "none" / "%04d.png")
    Image.fromarray(video[0, :16]).save(pattern.parent / "0003.png")
    with pytest.raises(InputError, match=r"frame .*0003.png of .*%04d.png is 64x16, the first 64x48"):
        load_video(str(pattern))
    (pattern.parent / "0003.png").write_bytes(b"no picture")
    with pytest.raises(InputError, match=r"cannot read frame .*0003.png of .*%04d.png as a picture"):
        read_video(pattern)


def _pillow_save():
    from PIL import Image

    return Image.Image, "save"


@pytest.mark.parametrize(
    "name, old, failing, call",
    [
        ("clip.mp4", "clip.mp4", lambda: (av.VideoFrame, "from_ndarray"), 3),  # the third frame
        ("clip.gif", "clip.gif", _pillow_save, 1),
        ("%04d.png", "0000.png", _pillow_save, 4),  # the fourth frame: the first three are written
    ],
)
def test_a_failed_write_leaves_the_old_file_and_no_other(tmp_path, monkeypatch, name, old, failing, call):
    owner, attribute = failing()
    real, calls = getattr(owner, attribute), []

    def fail_on_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    (tmp_path / old).write_bytes(b"old video")
    monkeypatch.setattr(owner, attribute, fail_on_call)
    with pytest.raises(OSError, match="No space left"):
        export_video(moving_square(), tmp_path / name)
    # The previous file is untouched and no partial file is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [old]
    assert (tmp_path / old).read_bytes() == b"old video"


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((3, 33, 64, 3), np.uint8), "even width and height"),
        (np.zeros((3, 32, 64), np.uint8), r"\[F, H, W, 3\]"),
        (np.zeros((0, 32, 64, 3), np.uint8), r"\[F, H, W, 3\]"),
        (np.zeros((3, 32, 64, 3), np.int32), "uint8 or floats"),
        ([np.zeros((32, 64, 3), np.uint8), np.zeros((16, 64, 3), np.uint8)], "same size"),
        ([], "no frames"),
        (5, "frames must be an array"),
        (np.full((3, 32, 64, 3), 200.0, np.float32), "look like 0..255: pass them as uint8"),
        (np.full((3, 32, 64, 3), -0.5, np.float32), r"look like \[-1, 1\]"),
        (np.full((3, 32, 64, 3), np.nan, np.float32), "NaN or infinite"),
    ],
)
def test_bad_frames(tmp_path, frames, message):
    with pytest.raises(InputError, match=message):
        export_video(frames, tmp_path / "x.mp4")
    assert not any(tmp_path.iterdir())


def test_float_frames_may_stray_by_rounding(tmp_path):
    frames = np.full((3, 32, 64, 3), 1.0004, np.float32)  # a float computation's overshoot is clipped
    read, _ = read_video(export_video(frames, tmp_path / "x.mp4"))
    assert read.min() >= 250


@pytest.mark.parametrize("fps", [0, -8, float("inf"), float("nan"), 1e-6, "8", True, 5000])
def test_bad_fps(tmp_path, fps):
    with pytest.raises(InputError, match="fps must be"):
        export_video(moving_square(), tmp_path / "x.mp4", fps=fps)
    assert not any(tmp_path.iterdir())


def test_numpy_frame_rates(tmp_path):
    """A rate computed in numpy (np.float32, np.int64) is a number like any other."""
    for fps, want in ((np.float32(12.5), 12.5), (np.int64(8), 8)):
        _, rate = read_video(export_video(moving_square(), tmp_path / "x.mp4", fps=fps))
        assert rate == want


def test_wrong_types_are_input_errors(tmp_path):
    """A path that is not one, metadata JSON cannot hold, a frame limit that is not a count: one-line
    errors, before anything is written, not a TypeError from deep inside."""
    path = export_video(moving_square(), tmp_path / "x.mp4")
    for call, message in [
        (lambda: export_video(moving_square(), 5), "a video path must be a str or a pathlib.Path, got int"),
        (lambda: read_video(5), "a video path must be a str or a pathlib.Path, got int"),
        (lambda: export_video(moving_square(), tmp_path / "y.mp4", metadata={"a": object()}),
         "metadata must hold JSON values only: Object of type object is not JSON serializable"),
        (lambda: export_video(moving_square(), tmp_path / "y.mp4", metadata=[1]), "metadata must be a dict"),
    ] + [
        (lambda limit=limit: read_video(path, max_frames=limit), f"max_frames must be a positive integer .*{limit!r}")
        for limit in (0, -1, 2.5, "3", True)
    ]:
        with pytest.raises(InputError, match=message):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mp4"]
    assert read_video(path, max_frames=np.int64(3))[0].shape[0] == 3


def test_bad_paths(tmp_path):
    with pytest.raises(InputError, match="--output -: a video is written to a file, not to standard output"):
        check_video_path("-", "--output")
    with pytest.raises(InputError, match="does not exist"):
        export_video(moving_square(), tmp_path / "no" / "such" / "x.mp4")
    with pytest.raises(InputError, match="is a folder"):
        export_video(moving_square(), tmp_path)
    with pytest.raises(InputError, match=r"written as MP4 \(H.264\), GIF or numbered PNG frames; give a name ending "
                                         r"in .mp4 or .gif, such as x.mp4, or one such as frames/%04d.png"):
        export_video(moving_square(), tmp_path / "x.webm")
    for name in ("x.png", "x-%d-%d.png"):
        with pytest.raises(InputError, match="a frame sequence needs one frame number in its name, written %04d"):
            export_video(moving_square(), tmp_path / name)
    with pytest.raises(InputError, match="no video file"):
        read_video(tmp_path / "missing.mp4")


def test_same_frames_give_the_same_file(tmp_path):
    """x264's macroblock tree made some encodes of equal frames differ (a few B/P frames, by up to
    ~25/255); it is off, so a seed's video is the same file every time. Noisy, moving frames at two
    sizes, encoded repeatedly in one process (the case that showed it, about 1 encode in 15)."""
    rng = np.random.default_rng(0)
    for height, width in [(64, 96), (32, 48)]:
        frames = rng.integers(0, 256, (9, height, width, 3), dtype=np.uint8)
        files = {export_video(frames, tmp_path / f"{i}.mp4").read_bytes() for i in range(40)}
        assert len(files) == 1


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_files_get_the_usual_mode_not_a_private_one(tmp_path):
    """mkstemp (our atomic video export) and safetensors both create files as 0600; what we hand the
    user is readable as a plain open() would make it (0644 under the usual umask 022)."""
    from torch import nn

    from cogvideox.files import umask
    from cogvideox.weights import save_weights

    want = 0o666 & ~umask()
    video = export_video(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "v.mp4")
    weights = save_weights(nn.Linear(4, 4), tmp_path / "m")
    shards = save_weights(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), tmp_path / "s", max_shard_size="20KB")
    for path in [video, *weights, *shards]:
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    assert len(shards) == 2

"""Fine-tuning data: both folder layouts, skip-and-report, frame-rate sampling, buckets and cover crops."""

import json

import numpy as np
import pytest
import torch
from helpers import TRAIN_CAPTIONS, make_video_folder, sample_frames

from cogvideox import InputError
from cogvideox.models.config import TransformerConfig, VAEConfig
from cogvideox.train.data import (
    Bucket,
    ClipError,
    check_buckets,
    choose_bucket,
    cover_crop,
    load_clip,
    read_frames,
    scan_folder,
)
from cogvideox.video import export_video


@pytest.mark.parametrize("layout", ["jsonl", "lines"])
def test_scan_both_layouts(tmp_path, layout):
    root = make_video_folder(tmp_path, layout)
    clips, skipped = scan_folder(root)
    names = [c.name for c in clips]
    # The caption-less video is skipped at scan time; corrupt and short ones need decoding to tell.
    assert names == ["videos/clip0.mp4", "videos/clip1.mp4", "videos/clip2.mp4", "videos/corrupt.mp4", "videos/short.mp4"]
    assert [c.caption for c in clips[:3]] == TRAIN_CAPTIONS
    assert [str(s) for s in skipped] == ["videos/nocaption.mp4: no caption"]


def test_scan_reports_missing_files_and_bad_lines(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"video": "missing.mp4", "caption": "a cat"}) + "\nnot json\n" + json.dumps({"caption": "x"}) + "\n"
    )
    clips, skipped = scan_folder(tmp_path)
    assert clips == []
    assert [str(s) for s in skipped] == [
        "metadata.jsonl line 2: not a JSON object",
        'metadata.jsonl line 3: no "video" path',
        "missing.mp4: file not found",
    ]


def test_scan_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    with pytest.raises(InputError, match="neither metadata.jsonl nor prompts.txt"):
        scan_folder(tmp_path)


def test_load_clip_skips_corrupt_and_short_by_reason(tmp_path):
    root = make_video_folder(tmp_path)
    clips = {c.name: c for c in scan_folder(root)[0]}
    buckets = [Bucket(9, 32, 48)]
    with pytest.raises(ClipError, match="cannot decode"):
        load_clip(clips["videos/corrupt.mp4"], buckets, fps=8)
    with pytest.raises(ClipError, match="too short: 4 frames at 8 fps, the shortest bucket needs 9"):
        load_clip(clips["videos/short.mp4"], buckets, fps=8)
    video, bucket = load_clip(clips["videos/clip0.mp4"], buckets, fps=8)
    assert bucket == buckets[0]
    assert video.shape == (3, 9, 32, 48) and video.dtype == torch.float32
    assert -1.0 <= video.min() and video.max() <= 1.0


def test_frames_are_sampled_at_the_target_rate(tmp_path):
    # 24 frames at 8 fps, each frame's index written into its pixels.
    frames = np.zeros((24, 16, 16, 3), np.uint8)
    for i in range(24):
        frames[i] = i * 10
    path = export_video(frames, tmp_path / "ramp.mp4", fps=8)
    def index_of(frame):
        return int(round(frame.mean() / 10))

    assert [index_of(f) for f in read_frames(path, 8, 100)] == list(range(24))
    assert [index_of(f) for f in read_frames(path, 4, 100)] == list(range(0, 24, 2))
    assert [index_of(f) for f in read_frames(path, 4, 5)] == [0, 2, 4, 6, 8]  # stops early
    assert [index_of(f) for f in read_frames(path, 16, 6)] == [0, 0, 1, 1, 2, 2]  # repeats to go faster
    assert len(read_frames(path, None, 100)) == 24


def test_cover_crop_keeps_the_aspect_ratio():
    # A 40x80 frame with a vertical stripe in the middle: into 32x32 it must be scaled by 0.8 (to 32x64)
    # and the centre cut out, so the stripe stays centred and keeps its width (not squeezed by 2).
    x = torch.zeros(1, 1, 40, 80)
    x[..., 35:45] = 1.0
    out = cover_crop(x, 32, 32)
    assert out.shape == (1, 1, 32, 32)
    profile = out[0, 0].mean(0)
    assert abs(float(profile.sum()) - 8.0) < 0.5  # 10 px * 0.8
    assert abs(float((profile * torch.arange(32)).sum() / profile.sum()) - 15.5) < 0.3


def test_bucket_choice():
    buckets = [Bucket(17, 480, 720), Bucket(9, 480, 720), Bucket(17, 720, 480)]
    assert choose_bucket(buckets, 20, 1080, 1920) == Bucket(17, 480, 720)  # landscape, longest
    assert choose_bucket(buckets, 12, 1080, 1920) == Bucket(9, 480, 720)  # too short for 17
    assert choose_bucket(buckets, 30, 1920, 1080) == Bucket(17, 720, 480)  # portrait
    assert choose_bucket(buckets, 12, 1920, 1080) == Bucket(9, 480, 720)  # only one fits
    assert choose_bucket(buckets, 8, 1920, 1080) is None


def test_bucket_parse_and_check():
    assert Bucket.parse("49x480x720") == Bucket(49, 480, 720)
    with pytest.raises(InputError, match="FRAMESxHEIGHTxWIDTH"):
        Bucket.parse("480x720")
    t = TransformerConfig(sample_height=60, sample_width=90)
    v = VAEConfig()
    assert check_buckets([Bucket(49, 480, 720), Bucket(49, 480, 720)], t, v) == [Bucket(49, 480, 720)]
    with pytest.raises(InputError, match="bucket 48x480x720: num_frames must be 8k\\+1"):
        check_buckets([Bucket(48, 480, 720)], t, v)
    with pytest.raises(InputError, match="bucket 49x480x700: width must be a positive multiple of 16"):
        check_buckets([Bucket(49, 480, 700)], t, v)


def test_multi_resolution_clips_land_in_their_buckets(tmp_path):
    export_video(sample_frames(12, 40, 64), tmp_path / "wide.mp4", fps=8)
    export_video(sample_frames(12, 64, 40), tmp_path / "tall.mp4", fps=8)
    (tmp_path / "videos.txt").write_text("wide.mp4\ntall.mp4\n")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    clips, _ = scan_folder(tmp_path)
    buckets = [Bucket(9, 32, 48), Bucket(9, 48, 32)]
    shapes = [tuple(load_clip(c, buckets, fps=8)[0].shape) for c in clips]
    assert shapes == [(3, 9, 32, 48), (3, 9, 48, 32)]

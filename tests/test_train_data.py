"""Fine-tuning data: both folder layouts, skip-and-report, frame-rate sampling, buckets and cover crops."""

import json

import numpy as np
import pytest
import torch
from helpers import TRAIN_CAPTIONS, make_video_folder, sample_frames

from cogvideox import InputError, read_video
from cogvideox.models.config import TransformerConfig, VAEConfig
from cogvideox.train.data import (
    Bucket,
    Clip,
    ClipError,
    check_buckets,
    choose_bucket,
    cover_crop,
    load_clip,
    load_masked_clip,
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


def test_a_prompts_file_shorter_than_the_videos_file_is_said_to_be(tmp_path):
    root = make_video_folder(tmp_path, "lines")
    lines = (root / "prompts.txt").read_text().splitlines()
    (root / "prompts.txt").write_text("\n".join(lines[:2]) + "\n")
    clips, skipped = scan_folder(root)
    assert [c.name for c in clips] == ["videos/clip0.mp4", "videos/clip1.mp4"]
    assert str(skipped[0]) == "videos/clip2.mp4: no caption: prompts.txt has 2 line(s), videos.txt 6"
    assert len(skipped) == 4


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
    with pytest.raises(ClipError, match="cannot decode") as corrupt:
        load_clip(clips["videos/corrupt.mp4"], buckets, fps=8)
    assert "Errno" not in str(corrupt.value) and str(root) not in str(corrupt.value)  # FFmpeg's words only
    with pytest.raises(ClipError, match="too short: 4 frames at 8 fps, the shortest bucket needs 9"):
        load_clip(clips["videos/short.mp4"], buckets, fps=8)
    from PIL import Image

    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(root / "videos" / "still.png")  # a picture listed
    with pytest.raises(ClipError, match="too short: a still picture \\(1 frame\\), the shortest bucket needs 9"):
        load_clip(Clip(root / "videos" / "still.png", "a still", "videos/still.png"), buckets, fps=8)
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


# ----------------------------------------------------------------------------------------------------
# Masks


def _masked_folder(root, mask_names):
    """clip0..clipN-1 (12 frames, 40x56, 8 fps) whose rows name the given masks (None: no mask)."""
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, mask in enumerate(mask_names):
        export_video(sample_frames(12, 40, 56, seed=i), root / "videos" / f"clip{i}.mp4", fps=8)
        row = {"video": f"videos/clip{i}.mp4", "caption": "a cat"}
        if mask is not None:
            row["mask"] = mask
        rows.append(json.dumps(row))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_a_row_whose_mask_is_missing_is_skipped_with_the_reason(tmp_path):
    root = _masked_folder(tmp_path, ["masks/gone.mp4", None, "masks/here.png", 7])
    (root / "masks").mkdir()
    (root / "masks" / "here.png").write_bytes(b"")  # exists: whether it decodes is told when loading
    clips, skipped = scan_folder(root)
    assert [(c.name, c.mask) for c in clips] == [("videos/clip1.mp4", None),
                                                 ("videos/clip2.mp4", root / "masks" / "here.png")]
    assert [str(s) for s in skipped] == ['videos/clip3.mp4: "mask" must be a file path, got 7',
                                         "videos/clip0.mp4: mask masks/gone.mp4 not found"]
    with pytest.raises(ClipError, match="cannot decode mask here.png"):
        load_masked_clip(clips[1], [Bucket(9, 32, 48)], fps=8)


def test_a_mask_image_is_cropped_like_its_video_and_used_for_every_frame(tmp_path):
    from PIL import Image

    root = _masked_folder(tmp_path, ["m.png", "wide.png"])
    image = np.zeros((40, 56, 3), np.uint8)
    image[10:20, 30:50] = (255, 255, 255)
    image[25:30, 0:8] = (255, 0, 0)  # mean over RGB: a third
    Image.fromarray(image).save(root / "m.png")
    Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(root / "wide.png")
    clips, _ = scan_folder(root)
    bucket = Bucket(9, 32, 48)
    video, mask, got = load_masked_clip(clips[0], [bucket], fps=8)
    assert got == bucket and video.shape == (3, 9, 32, 48) and mask.shape == (9, 32, 48)
    # The video's crop applied to the image's mean over RGB / 255.
    expected = cover_crop(torch.from_numpy(image).float().mean(-1)[None, None] / 255.0, 32, 48)[0, 0]
    for frame in mask:
        assert torch.allclose(frame, expected, atol=1e-6)
    assert 0.9 < float(mask[0, 12, 32]) <= 1.0 and float(mask[0, 0, 0]) == 0.0
    assert abs(float(mask[0, 23, 2]) - 1 / 3) < 0.02
    with pytest.raises(ClipError, match="mask wide.png is 80x40, the video 56x40: they must have the same aspect"):
        load_masked_clip(clips[1], [bucket], fps=8)


def test_a_mask_video_takes_the_frames_its_video_takes(tmp_path):
    root = _masked_folder(tmp_path, ["m.mp4", "short.mp4"])
    # Mask frame i is uniformly 20 * i; at 4 fps frames 0, 2, 4, ... of the 8 fps file are kept.
    ramp = np.stack([np.full((40, 56, 3), 20 * i, np.uint8) for i in range(12)])
    export_video(ramp, root / "m.mp4", fps=8)
    export_video(ramp[:4], root / "short.mp4", fps=8)
    clips, _ = scan_folder(root)
    _, mask, bucket = load_masked_clip(clips[0], [Bucket(5, 32, 48)], fps=4)
    assert bucket == Bucket(5, 32, 48)
    assert [round(float(m.mean()) * 255 / 20) for m in mask] == [0, 2, 4, 6, 8]
    with pytest.raises(ClipError, match="mask short.mp4 is too short: 2 frames at 4 fps, the clip has 5"):
        load_masked_clip(clips[1], [Bucket(5, 32, 48)], fps=4)
    # Without a mask the clip loads as load_clip loads it.
    plain = Clip(clips[0].video, "a cat", "videos/clip0.mp4")
    video, none, _ = load_masked_clip(plain, [Bucket(5, 32, 48)], fps=4)
    assert none is None and torch.equal(video, load_clip(plain, [Bucket(5, 32, 48)], fps=4)[0])


def _rotate_mp4(path, degrees):
    """Sets the track's display matrix of an mp4 (its tkhd box) to a clockwise turn, as phones write."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd") + 4
    assert data[at] == 0  # version 0: 32-bit times
    matrix = at + 4 + 5 * 4 + 8 + 4 * 2
    one = 0x10000
    values = {90: (0, one, 0, -one, 0, 0), 270: (0, -one, 0, one, 0, 0), 180: (-one, 0, 0, -one, 0, 0)}[degrees]
    data[matrix : matrix + 36] = struct.pack(">9i", *values, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))


def test_a_rotated_phone_video_is_read_upright(tmp_path):
    # Stored landscape (80 wide, 48 high) with its left half white and a 90 degree rotation flag: shown
    # as a portrait whose top half is white, and that is what a portrait bucket must get.
    frames = np.zeros((12, 48, 80, 3), np.uint8)
    frames[:, :, :40] = 255
    export_video(frames, tmp_path / "phone.mp4", fps=8)
    _rotate_mp4(tmp_path / "phone.mp4", 90)
    upright = read_frames(tmp_path / "phone.mp4", 8, 9)
    assert upright.shape == (9, 80, 48, 3)
    assert upright[:, :36].min() > 200 and upright[:, 44:].max() < 50
    # read_video (generate --extend, the service's remixes) turns it as well.
    assert np.array_equal(read_video(tmp_path / "phone.mp4", max_frames=9)[0], upright)
    clip = Clip(tmp_path / "phone.mp4", "a phone video", "phone.mp4")
    video, bucket = load_clip(clip, [Bucket(9, 32, 48), Bucket(9, 48, 32)], fps=8)
    assert bucket == Bucket(9, 48, 32)
    assert video[:, :, :20].min() > 0.5 and video[:, :, 28:].max() < -0.5


@pytest.mark.parametrize("layout", ["jsonl", "lines"])
def test_listing_files_saved_with_a_byte_order_mark_and_crlf_are_read(tmp_path, layout):
    # Windows editors write UTF-8 with a BOM and CRLF line ends: the first row must not be lost or
    # its path or caption carry the mark.
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"")
    if layout == "jsonl":
        rows = [{"video": "a.mp4", "caption": "un chat"}, {"video": "b.mp4", "caption": "ein Hund"}]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)
        (tmp_path / "metadata.jsonl").write_text(text, encoding="utf-8-sig")
    else:
        (tmp_path / "prompts.txt").write_text("un chat\r\nein Hund\r\n", encoding="utf-8-sig")
        (tmp_path / "videos.txt").write_text("a.mp4\r\nb.mp4\r\n", encoding="utf-8-sig")
    clips, skipped = scan_folder(tmp_path)
    assert [(c.name, c.caption) for c in clips] == [("a.mp4", "un chat"), ("b.mp4", "ein Hund")]
    assert skipped == []


def test_bad_metadata_lines_are_named_and_skipped_and_the_others_read(tmp_path):
    """One damaged line stopped the whole run (a line not UTF-8), or did so with a traceback (nested past
    the JSON parser's stack, an integer too long to convert); a raw U+2028 in a caption split its line."""
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"")
    rows = [
        b'{"video": "a.mp4", "caption": "x"}',
        b'{"video": "b.mp4", "caption": "caf\xe9"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"video": "b.mp4", "caption": "x", "seed": ' + b"1" * 5000 + b"}",
        b'["b.mp4", "x"]',
        b'{"video": 5, "caption": "x"}',
        b'{"video": "b.mp4", "caption": 5}',
        '{"video": "b.mp4", "caption": "one\u2028two"}'.encode(),
    ]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    clips, skipped = scan_folder(tmp_path)
    assert [(c.name, c.caption) for c in clips] == [("a.mp4", "x"), ("b.mp4", "one\u2028two")]
    assert [str(s) for s in skipped] == [
        "metadata.jsonl line 2: not UTF-8 text",
        "metadata.jsonl line 3: not a JSON object",
        "metadata.jsonl line 4: not a JSON object",
        "metadata.jsonl line 5: not a JSON object",
        'metadata.jsonl line 6: no "video" path',
        "b.mp4: no caption",
    ]


def test_a_variable_frame_rate_video_is_sampled_by_its_timestamps(tmp_path):
    # 8 frames 1/32 s apart, then 12 frames 1/8 s apart (a phone slowing down in low light): at 8 fps
    # the clip must keep real time, not step through the frames at their average rate.
    import fractions

    import av

    times = [i / 32 for i in range(8)] + [0.25 + i / 8 for i in range(12)]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=32)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv444p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), i * 10, np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    taken = [int(round(f.mean() / 10)) for f in read_frames(path, 8, 14)]
    assert taken[0] == 0 and taken[1] in (3, 4)  # 0.125 s
    assert taken[2:] == list(range(8, 20))  # 0.25 s, 0.375 s, ...: one frame each


def test_a_caption_under_a_later_key_counts_when_an_earlier_one_is_empty(tmp_path):
    """A row exported with an empty or null "caption" column beside its "text" has a caption, as a row with
    an empty "video" beside its "file_name" has a video."""
    export_video(sample_frames(9, 40, 56, seed=0), tmp_path / "a.mp4", fps=8)
    rows = [{"video": "a.mp4", "caption": None, "text": "a cat on a mat"},
            {"video": "a.mp4", "caption": "", "prompt": " a dog "},
            {"video": "", "file_name": "a.mp4", "caption": "a bird", "text": "not this"},
            {"video": "a.mp4", "caption": None}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    clips, skipped = scan_folder(tmp_path)
    assert [c.caption for c in clips] == ["a cat on a mat", "a dog", "a bird"]
    assert [str(s) for s in skipped] == ["a.mp4: no caption"]


def test_a_line_of_prompts_or_videos_txt_that_is_not_utf8_skips_its_pair(tmp_path):
    """The official layout pairs line i of prompts.txt with line i of videos.txt: a line of either that is
    not UTF-8 stopped the run; it is named by file and number and its pair skipped, the others read."""
    from cogvideox.caption import read_entries

    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "prompts.txt").write_bytes(b"one\ncaf\xe9\nthree\nfour\n")
    (tmp_path / "videos.txt").write_bytes(b"a.mp4\nb.mp4\nc\xff.mp4\nd.mp4\n")
    clips, skipped = scan_folder(tmp_path)
    assert [(c.name, c.caption) for c in clips] == [("a.mp4", "one"), ("d.mp4", "four")]
    assert [str(s) for s in skipped] == [
        "prompts.txt line 2: not UTF-8 text (the caption of b.mp4)",
        "videos.txt line 3: not UTF-8 text",
    ]
    # Captioning rewrites the listing as metadata.jsonl: it refuses to drop the line, and names it.
    with pytest.raises(InputError, match=rf"^{tmp_path}/prompts.txt line 2 is not UTF-8 text; save the file as UTF-8$"):
        read_entries(tmp_path)


def test_a_caption_holding_a_line_separator_keeps_the_official_layout_paired(tmp_path):
    """prompts.txt is split at newlines alone: a form feed or a U+2028 pasted into a caption split it into
    two lines (str.splitlines), pairing every later caption with the wrong video."""
    from cogvideox.caption import read_entries

    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "prompts.txt").write_text("one\u2028more\ntwo\x0cpages\r\nthree\n", encoding="utf-8")
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\nc.mp4\n")
    clips, skipped = scan_folder(tmp_path)
    assert [(c.name, c.caption) for c in clips] == [("a.mp4", "one\u2028more"), ("b.mp4", "two\x0cpages"),
                                                    ("c.mp4", "three")]  # fmt: skip
    assert skipped == []
    assert [e["caption"] for e in read_entries(tmp_path)] == ["one\u2028more", "two\x0cpages", "three"]
    # Captioning rewrites the listing as metadata.jsonl with the separator kept raw; it reads back whole.
    (tmp_path / "prompts.txt").unlink()
    (tmp_path / "videos.txt").unlink()
    lines = [json.dumps({"video": "a.mp4", "caption": "one\u2028more"}, ensure_ascii=False), '{"video": "b.mp4"}']
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [e.get("caption") for e in read_entries(tmp_path)] == ["one\u2028more", None]

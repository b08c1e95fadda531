"""Captions for fine-tuning data against a local stand-in for a chat endpoint that sees images: the frames
sent are the clip's, spread from its start to its end; captions land in metadata.jsonl where `train`
reads them; a second run goes on and keeps what is there; failures are reported and keep the rest."""

import base64
import fcntl
import io
import json
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402
from serve_helpers import chat_stand_in  # noqa: E402

from cogvideox.caption import (  # noqa: E402
    ENV_KEY,
    ENV_URL,
    LOCK,
    SYSTEM_PROMPT,
    CaptionError,
    VideoCaptioner,
    caption_folder,
)
from cogvideox.cli import main  # noqa: E402
from cogvideox.errors import InputError  # noqa: E402
from cogvideox.train.data import scan_folder  # noqa: E402
from cogvideox.video import export_video, sample_frames  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def clip(path, *colours, frames_each=8):
    """A 32x32 MP4 at 8 fps: `frames_each` frames of each colour in turn."""
    frames = np.concatenate([np.full((frames_each, 32, 32, 3), COLOURS[c], np.uint8) for c in colours])
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_video(frames, path.with_suffix(".mp4"), fps=8).rename(path)  # a .mov holding MP4 is read alike


def colour_of(pixels) -> str:
    mean = np.asarray(pixels).reshape(-1, 3).mean(axis=0)
    return min(COLOURS, key=lambda name: np.abs(mean - COLOURS[name]).sum())


@pytest.fixture(scope="module")
def endpoint():
    """Answers with what it saw: "N frames, COLOUR to COLOUR" (first and last picture). A system prompt
    that mentions "refuse" gets a 400, one that mentions "down" a 500."""

    def respond(body):
        system = body["messages"][0]["content"]
        if "refuse" in system or "down" in system:
            return 400 if "refuse" in system else 500
        parts = body["messages"][1]["content"]
        pictures = [p["image_url"]["url"].split(",", 1)[1] for p in parts if p["type"] == "image_url"]
        seen = [colour_of(Image.open(io.BytesIO(base64.b64decode(p))).convert("RGB")) for p in pictures]
        return f'"{len(seen)} frames, {seen[0]} to {seen[-1]}"'

    with chat_stand_in(respond) as stand_in:
        yield stand_in


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "clips"
    clip(root / "a.mp4", "red", "blue")
    clip(root / "sub" / "b.mov", "green")
    (root / "bad.mp4").write_bytes(b"not a video at all")
    clip(root / ".trash" / "old.mp4", "red")  # hidden: left alone
    (root / "notes.txt").write_text("not a video")
    return root


def read_metadata(root):
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text("utf-8").splitlines()]


def test_sample_frames_spans_the_clip(tmp_path):
    path = clip(tmp_path / "c.mp4", "red", "green", "blue")  # 24 frames, 3 s
    frames = sample_frames(path, 6)
    assert frames.shape == (6, 32, 32, 3)
    assert [colour_of(f) for f in frames] == ["red", "red", "green", "green", "blue", "blue"]
    assert [colour_of(f) for f in sample_frames(path, 1)] == ["red"]


def test_captions_land_where_train_reads_them(endpoint, folder, monkeypatch, capsys):
    url, requests = endpoint
    requests.clear()
    monkeypatch.setenv(ENV_KEY, "ck")
    status = main(["caption", str(folder), "--captioner", url, "--captioner-model", "see-7b", "--frames", "4",
                   "--prefix", "xyz style, ", "--context", "toy blocks", "--quiet"])  # fmt: skip
    assert status == 0
    out, err = capsys.readouterr()
    assert "2 captions written" in out and "0 kept, 1 skipped, 0 failed" in out
    assert "skipped bad.mp4: cannot decode it" in err
    assert read_metadata(folder) == [
        {"video": "a.mp4", "caption": "xyz style, 4 frames, red to blue"},
        {"video": "sub/b.mov", "caption": "xyz style, 4 frames, green to green"},
    ]
    clips, skipped = scan_folder(folder)
    assert [(c.name, c.caption) for c in clips] == [(e["video"], e["caption"]) for e in read_metadata(folder)]
    assert skipped == []

    assert len(requests) == 2  # a and b; nothing for the undecodable file
    sent = requests[0]
    assert sent["authorization"] == "Bearer ck" and sent["body"]["model"] == "see-7b"
    system = sent["body"]["messages"][0]["content"]
    assert system.startswith(SYSTEM_PROMPT.format(frames=4)) and system.endswith("name things by: toy blocks")


def test_a_second_run_goes_on_and_keeps_what_is_there(endpoint, folder):
    url, _ = endpoint
    (folder / "metadata.jsonl").write_text(
        json.dumps({"video": "a.mp4", "caption": "my own words", "mask": "masks/a.mp4"}) + "\n"
        + json.dumps({"file_name": "sub/b.mov"}) + "\n",
        "utf-8",
    )  # fmt: skip
    clip(folder / "masks" / "a.mp4", "green")  # a mask: never captioned
    captioner = VideoCaptioner(url, frames=2)
    report = caption_folder(folder, captioner)
    assert (report.written, report.kept, [v for v, _ in report.skipped]) == (["sub/b.mov"], 1, ["bad.mp4"])
    assert read_metadata(folder) == [
        {"video": "a.mp4", "caption": "my own words", "mask": "masks/a.mp4"},
        {"video": "sub/b.mov", "caption": "2 frames, green to green"},
    ]
    again = caption_folder(folder, captioner)
    assert (again.written, again.kept) == ([], 2)
    redone = caption_folder(folder, captioner, overwrite=True, jobs=2)
    assert sorted(redone.written) == ["a.mp4", "sub/b.mov"]
    assert read_metadata(folder)[0] == {"video": "a.mp4", "caption": "2 frames, red to blue", "mask": "masks/a.mp4"}


def test_an_entry_written_with_dot_slash_is_the_file_found(endpoint, folder):
    """"./a.mp4" in metadata.jsonl is a.mp4 on disk: kept with its caption, not listed and captioned again;
    "./masks/a.mp4" a mask, never captioned."""
    url, _ = endpoint
    (folder / "metadata.jsonl").write_text(
        json.dumps({"video": "./a.mp4", "caption": "my own words", "mask": "./masks/a.mp4"}) + "\n", "utf-8")
    clip(folder / "masks" / "a.mp4", "green")
    report = caption_folder(folder, VideoCaptioner(url, frames=2))
    assert (report.written, report.kept) == (["sub/b.mov"], 1)
    assert [e["video"] for e in read_metadata(folder)] == ["./a.mp4", "sub/b.mov"]


def test_a_folder_with_nothing_to_caption_is_not_locked(endpoint, folder, monkeypatch):
    """Every video captioned: the run reads and reports, and takes no lock (a read-only folder works)."""
    from cogvideox import caption

    url, _ = endpoint
    (folder / "bad.mp4").unlink()
    captioner = VideoCaptioner(url, frames=2)
    caption_folder(folder, captioner)
    monkeypatch.setattr(caption, "lock_folder", lambda *a: pytest.fail("locked a folder with nothing to write"))
    report = caption_folder(folder, captioner)
    assert (report.written, report.kept, report.skipped) == ([], 2, [])


def test_the_official_layouts_captions_are_carried_over(endpoint, folder):
    url, _ = endpoint
    (folder / "prompts.txt").write_text("their caption\n", "utf-8")
    (folder / "videos.txt").write_text("a.mp4\nsub/b.mov\n", "utf-8")
    report = caption_folder(folder, VideoCaptioner(url, frames=2))
    assert (report.written, report.kept) == (["sub/b.mov"], 1)
    assert read_metadata(folder) == [
        {"video": "a.mp4", "caption": "their caption"},
        {"video": "sub/b.mov", "caption": "2 frames, green to green"},
    ]


def test_a_failing_endpoint_stops_the_run_and_keeps_what_was_written(endpoint, tmp_path, capsys):
    url, _ = endpoint
    root = tmp_path / "many"
    for i in range(5):
        clip(root / f"{i}.mp4", "red")
    down = VideoCaptioner(url, context="down", attempts=2, backoff=0.0)
    report = caption_folder(root, down)
    # Stopped at the third failure in a row: one video at a time, so the fourth and fifth never start.
    assert [video for video, _ in report.failed] == ["0.mp4", "1.mp4", "2.mp4"] and report.written == []
    assert "failed for 3 videos in a row" in report.stopped and "HTTP 500" in report.stopped
    assert "(2 attempts)" in report.failed[0][1]  # a 500 may pass: tried again
    assert not (root / "metadata.jsonl").exists()

    caption_folder(root, VideoCaptioner(url, frames=1))  # the endpoint is back
    assert len(read_metadata(root)) == 5
    status = main(["caption", str(root), "--captioner", url, "--context", "refuse", "--overwrite", "--quiet"])
    out, err = capsys.readouterr()
    assert status == 1 and "stopped: the captioner failed for 3 videos in a row" in err and "HTTP 400" in err
    assert [e["caption"] for e in read_metadata(root)] == ["1 frames, red to red"] * 5  # nothing lost


def test_mistakes_are_one_line(endpoint, tmp_path, capsys, monkeypatch):
    url, _ = endpoint
    monkeypatch.delenv(ENV_URL, raising=False)
    (tmp_path / "metadata.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\nnot json\n', "utf-8")
    cases = [
        (["caption", str(tmp_path)], "no endpoint: give --captioner URL"),
        (["caption", str(tmp_path), "--captioner", "localhost:8000"], "give the endpoint's address"),
        (["caption", str(tmp_path / "nowhere"), "--captioner", url], "no folder at"),
        (["caption", str(tmp_path / "metadata.jsonl"), "--captioner", url], f"{tmp_path / 'metadata.jsonl'} is a "
                                                                           f"file; give the folder of videos"),
        (["caption", str(tmp_path), "--captioner", url], "metadata.jsonl line 2 is not an object"),
        (["caption", str(tmp_path), "--captioner", url, "--frames", "40"], "frames must be from 1 to 32"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(CaptionError):
        VideoCaptioner(url, context="refuse").caption(clip(tmp_path / "c.mp4", "red"))
    with pytest.raises(InputError, match="cannot decode it"):
        VideoCaptioner(url).caption(tmp_path / "metadata.jsonl")


def test_ctrl_c_stops_at_once_and_keeps_the_captions_written(endpoint, tmp_path, monkeypatch, capsys):
    url, _ = endpoint
    root = tmp_path / "clips"
    for name in ("a.mp4", "b.mp4"):
        clip(root / name, "red")
    released, hanging = threading.Event(), threading.Event()

    def caption(self, video):  # the second request hangs, as against an endpoint that stopped answering
        if video.name == "a.mp4":
            return "a red clip"
        hanging.set()
        released.wait(10)
        return "too late"

    def press_ctrl_c():
        if hanging.wait(10):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    monkeypatch.setattr(VideoCaptioner, "caption", caption)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    start = time.perf_counter()
    try:
        status = main(["caption", str(root), "--captioner", url, "--quiet"])
    finally:
        released.set()
    assert status == 130 and time.perf_counter() - start < 3
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cogvideox caption: interrupted; 1 caption written and kept in {root / 'metadata.jsonl'}, 1 video left "
        "to caption; run again to go on")
    assert read_metadata(root) == [{"video": "a.mp4", "caption": "a red clip"}]


def test_a_second_run_in_the_same_folder_is_refused(endpoint, folder, capsys):
    url, _ = endpoint
    with open(folder / LOCK, "a") as held:  # another caption run, busy in this folder
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["caption", str(folder), "--captioner", url, "--quiet"]) == 2
    assert "another caption run is captioning" in capsys.readouterr().err
    assert not (folder / "metadata.jsonl").exists()
    assert main(["caption", str(folder), "--captioner", url, "--quiet"]) == 0  # once it is done
    assert len(read_metadata(folder)) == 2


@pytest.mark.parametrize("line", [b"[" * 100_000 + b"]" * 100_000, b'{"video": "a.mp4", "n": ' + b"1" * 5000 + b"}"],
                         ids=["nested", "huge integer"])
def test_a_metadata_line_json_cannot_read_is_named_before_captioning(tmp_path, line):
    """The caption command rewrites metadata.jsonl, so a line it cannot read must be mended first; such a
    line was a RecursionError or ValueError traceback."""
    from cogvideox.caption import read_entries

    (tmp_path / "metadata.jsonl").write_bytes(b'{"video": "a.mp4", "caption": "x"}\n' + line + b"\n")
    with pytest.raises(InputError, match=r"metadata.jsonl line 2 is not an object with a \"video\" path"):
        read_entries(tmp_path)

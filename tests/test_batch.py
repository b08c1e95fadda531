"""`cogvideox batch`: one video per prompt with the demo model, a manifest, resuming, and prompts spread
over torchrun processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from cogvideox import read_video
from cogvideox.batch import MANIFEST, finished, plan, read_prompts, video_name
from cogvideox.cli import main

FAST = ["--steps", "2", "--frames", "9", "--quiet"]
PROMPTS = "a red ball rolls left\n\n# a comment line\n  a blue square moves up  \na green ball bounces\n"


def _manifest(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def test_read_prompts_and_names(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    prompts = read_prompts(path)
    assert prompts == ["a red ball rolls left", "a blue square moves up", "a green ball bounces"]
    assert video_name(7, "A Panda, playing a guitar!") == "0007-a-panda-playing-a-guitar.mp4"
    assert video_name(0, "???") == "0000-video.mp4"
    assert [(i.index, i.seed) for i in plan(prompts, seed=10)] == [(0, 10), (1, 11), (2, 12)]


def test_batch_writes_videos_and_manifest_then_resumes(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "-o", str(out), "--seed", "4", *FAST]) == 0
    assert "wrote 3 video(s)" in capsys.readouterr().out
    entries = _manifest(out)
    assert [(e["index"], e["prompt"], e["seed"]) for e in entries] == [
        (0, "a red ball rolls left", 4),
        (1, "a blue square moves up", 5),
        (2, "a green ball bounces", 6),
    ]
    for e in entries:
        frames, fps = read_video(out / e["file"])
        assert frames.shape == (9, 64, 96, 3) == (e["frames"], e["height"], e["width"], 3)
        assert fps == e["fps"] == 8
        assert set(e["timings"]) >= {"text", "denoise", "decode", "write"}
    first = {e["file"]: (out / e["file"]).read_bytes() for e in entries}

    # An interrupted batch: one video lost, a manifest line cut short. The re-run redoes only that video.
    lost = entries[1]["file"]
    (out / lost).unlink()
    with open(out / MANIFEST, "a") as f:
        f.write('{"index": 2, "prom')
    kept = {e["file"]: os.stat(out / e["file"]).st_mtime_ns for e in entries if e["file"] != lost}
    assert main(["batch", str(prompts), "-o", str(out), "--seed", "4", *FAST]) == 0
    report = capsys.readouterr().out
    assert "wrote 1 video(s)" in report and "2 finished earlier" in report
    assert {f: os.stat(out / f).st_mtime_ns for f in kept} == kept  # untouched
    redone = json.loads((out / MANIFEST).read_text().splitlines()[-1])
    assert redone["file"] == lost and redone["seed"] == 5
    # Same seed, same video: the very same file.
    assert (out / lost).read_bytes() == first[lost]

    # Another seed is another batch: nothing is skipped.
    items = plan(read_prompts(prompts), seed=5)
    assert finished(out, items) == set()


def test_batch_reports_progress_over_the_whole_batch(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\na blue square moves up\n")
    assert main(["batch", str(prompts), "-o", str(tmp_path / "out"), "--steps", "2", "--frames", "9"]) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "video" in err


def test_batch_samples_as_generate_does(capsys, tmp_path):
    """The sampling flags the two commands share reach the pipeline the same way: same flags and seed,
    same video; and dropping --dynamic-cfg changes it, so the flag is not silently ignored."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\n")
    flags = ["--scheduler", "dpm", "--dynamic-cfg", "--dynamic-cfg-clock", "smooth", "--guidance", "4",
             "--negative-prompt", "blurry", "--max-sequence-length", "12", "--seed", "3", *FAST]  # fmt: skip
    assert main(["generate", "a red ball rolls left", "-o", str(tmp_path / "one.mp4"), *flags]) == 0
    assert main(["batch", str(prompts), "-o", str(tmp_path / "dyn"), *flags]) == 0
    flags.remove("--dynamic-cfg")
    assert main(["batch", str(prompts), "-o", str(tmp_path / "fixed"), *flags]) == 0
    capsys.readouterr()
    name = video_name(0, "a red ball rolls left")
    single = read_video(tmp_path / "one.mp4")[0]
    assert np.array_equal(read_video(tmp_path / "dyn" / name)[0], single)
    assert not np.array_equal(read_video(tmp_path / "fixed" / name)[0], single)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no prompts file at"),
        ("\n# only a comment\n   \n", "holds no prompts"),
        (b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ],
)
def test_bad_prompts_file_is_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert main(["batch", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_bad_requests_fail_before_loading(capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red ball\n")
    (tmp_path / "file").write_text("")
    assert main(["batch", str(path), "-o", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert main(["batch", str(path), "-o", str(tmp_path / "out"), "--frames", "10"]) == 2
    assert "frames" in capsys.readouterr().err
    assert main(["batch", str(path), "-o", str(tmp_path / "out"), "--parallel", "cfg=2"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_spreads_prompts_over_processes(tmp_path):
    """Two processes, three prompts: each process makes its share, rank 0 keeps the one manifest."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
        str(_free_port()), "-m", "cogvideox", "batch", str(prompts), "-o", str(out), *FAST,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote 3 video(s)") == 1  # only rank 0 reports
    entries = _manifest(out)
    assert sorted(e["index"] for e in entries) == [0, 1, 2]
    assert all((out / e["file"]).is_file() for e in entries)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [e["file"] for e in entries])

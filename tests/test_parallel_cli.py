"""`cogvideox generate --parallel` under torchrun (2 gloo processes, demo model) and its one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from cogvideox import Pipeline, read_video
from cogvideox.cli import main

FAST = ["--steps", "2", "--frames", "9", "--seed", "5", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_generate_writes_once_on_rank_0(tmp_path):
    output = tmp_path / "video.mp4"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
        str(_free_port()), "-m", "cogvideox", "generate", "a red ball rolls left", "-o", str(output),
        "--parallel", "ulysses=2", *FAST,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote ") == 1 and "seed 5" in result.stdout  # rank 0 alone reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]

    # The single-process video of the same seed (the exact match is checked in test_parallel.py; the
    # H.264 encoder is not bit-reproducible run to run, so the file is compared loosely).
    # H.264 at CRF 18 alone moves these noisy frames by ~3.3/255 on average.
    pipe = Pipeline.from_pretrained(device="cpu")
    call = dict(num_inference_steps=2, num_frames=9, progress=False)
    want = pipe("a red ball rolls left", seed=5, **call).frames[0].astype(int)
    other = pipe("a red ball rolls left", seed=6, **call).frames[0].astype(int)
    got = read_video(output)[0].astype(int)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 5 < np.abs(got - other).mean()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--parallel", "cfg=2"], "needs 2 processes: launch with torchrun --nproc-per-node 2"),
        (["--parallel", "ulysses=3"], "ulysses=3 does not divide the model's 4 attention heads"),
        (["--parallel", "cfg=2", "--guidance", "1"], "guidance is off"),
        (["--parallel", "pipeline=2"], "kinds: cfg, ulysses, ring"),
        (["--parallel", "cfg=2", "--cache", "0.1"], "does not combine with --cache"),
    ],
)
def test_parallel_mistakes_exit_2_with_one_line(capsys, tmp_path, extra, message):
    assert main(["generate", "a cat", "-o", str(tmp_path / "v.mp4"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "v.mp4").exists()

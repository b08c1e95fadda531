"""`cogvideox generate --parallel` under torchrun (2 gloo processes, demo model) and its one-line errors.

The parallel videos must be the single-process ones for the same flags: untiled by default, tiled with
--vae-tiling (then the tiles are split). Tolerance: uint8 frames within 1/255, fp32 on the CPU (the
latents agree to a relative 1e-5, `test_parallel.py`, and a pixel on a rounding edge may move by one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    assert_sigterm_ends_rank_zero_waiting,
    cli_rank,
    cli_status,
    free_port,
    join_or_fail,
    shared_port,
    start_processes,
)

from cogvideox import Pipeline, cli, export_video, read_video
from cogvideox.cli import main

FAST = ["--steps", "2", "--frames", "9", "--seed", "5", "--quiet"]
FRAME_TOLERANCE = 1  # of 255


def test_torchrun_generate_writes_once_on_rank_0(tmp_path):
    output = tmp_path / "video.mp4"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
        str(free_port()), "-m", "cogvideox", "generate", "a red ball rolls left", "-o", str(output),
        "--parallel", "ulysses=2", *FAST,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote ") == 1 and "seed 5" in result.stdout  # rank 0 alone reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]

    # The single-process video of the same seed, through the same (deterministic) encoder: the frames
    # agree up to summation order (exactness is checked on arrays in test_parallel.py).
    pipe = Pipeline.from_pretrained(device="cpu")
    call = dict(num_inference_steps=2, num_frames=9, progress=False)
    export_video(pipe("a red ball rolls left", seed=5, **call).frames[0], tmp_path / "want.mp4", fps=8)
    export_video(pipe("a red ball rolls left", seed=6, **call).frames[0], tmp_path / "other.mp4", fps=8)
    want, other = (read_video(tmp_path / name)[0].astype(int) for name in ("want.mp4", "other.mp4"))
    got = read_video(output)[0].astype(int)
    assert got.shape == want.shape
    # Two-step frames are noise-like: H.264 turns their +-1 differences into a few /255 (measured 6.6
    # against 33 for another seed), so the files are compared relative to another seed's.
    assert np.abs(got - want).mean() < 0.3 * np.abs(got - other).mean()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--parallel", "cfg=2"], "needs 2 processes: launch with torchrun --nproc-per-node 2"),
        (["--parallel", "ulysses=3"], "ulysses=3 does not divide the model's 4 attention heads"),
        (["--parallel", "cfg=2", "--guidance", "1"], "guidance is off"),
        (["--parallel", "pipeline=2"], "kinds: cfg, ulysses, ring"),
    ],
)
def test_parallel_mistakes_exit_2_with_one_line(capsys, tmp_path, extra, message):
    assert main(["generate", "a cat", "-o", str(tmp_path / "v.mp4"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "v.mp4").exists()


# ------------------------------------------------------------------------------------------------------
# The parallel video is the single-process video (frames compared as arrays, before H.264)

CPU = ["--device", "cpu", "--dtype", "fp32"]
LAYOUTS = ("cfg=2", "ulysses=2", "ring=2")
# The group decodes the same way whatever the layout (the whole world splits the tiles, see
# parallel/decode.py), so the tiled decode runs under one of them.
TILED_LAYOUT = "ulysses=2"
# The step cache over 10 steps (it skips 3: the nearest change is 0.306), and compiled
# blocks, under a sequence split: the parallel video is the single-process video with the same levers.
LEVERS = ["--steps", "10", "--frames", "9", "--seed", "5", "--quiet", "--cache", "0.3"]
LEVER_RUNS = {"ulysses=2": [], "ring=2": ["--compile"]}
PROMPT = "a red circle moving up"


def _recorder(written: dict[str, np.ndarray]):
    """An `export_video` that keeps the frames under the file's name instead of writing an MP4."""

    def export_video(frames, path, fps=8, metadata=None):
        written[Path(path).name] = frames

    return export_video


def _cli_worker(rank: int, world: int, runs: list[list[str]], out_file: str) -> None:
    """Process `rank` of a torchrun-like world: `main(argv)` for each argv of `runs`, with the MP4 writer
    replaced by a recorder; saves (statuses, {file name: frames} it was asked to write)."""
    import torch

    from cogvideox import video

    torch.set_num_threads(1)
    written: dict[str, np.ndarray] = {}
    video.export_video = _recorder(written)
    statuses = []
    for i, argv in enumerate(runs):  # each run joins and leaves its own process group, on a port of its own
        port = shared_port(rank, f"{out_file}.port{i}")  # taken as the run starts, not minutes before
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        statuses.append(main(argv))
    torch.save((statuses, written), f"{out_file}.{rank}")


def _record_frames(monkeypatch) -> dict[str, np.ndarray]:
    """Replace the MP4 writer in this process with a recorder: {file name: frames}."""
    from cogvideox import video

    written: dict[str, np.ndarray] = {}
    monkeypatch.setattr(video, "export_video", _recorder(written))
    return written


@pytest.fixture(scope="module")
def parallel_frames(tmp_path_factory):
    """Every 2-process layout through `cogvideox generate --parallel` (and one with --vae-tiling), and one
    `batch --parallel cfg=2`: each rank's (statuses, frames it wrote)."""
    import torch

    folder = tmp_path_factory.mktemp("parallel-cli")
    (folder / "prompts.txt").write_text(PROMPT + "\n")
    runs = []
    for spec in LAYOUTS:
        for tiling in ([], ["--vae-tiling"]) if spec == TILED_LAYOUT else ([],):
            name = f"{spec}{'-tiled' if tiling else ''}.mp4"
            argv = ["generate", PROMPT, "-o", str(folder / name), "--parallel", spec, *FAST, *CPU, *tiling]
            runs.append(argv)
    batch = ["batch", str(folder / "prompts.txt"), "-o", str(folder / "batch"), "--parallel", "cfg=2"]
    runs.append([*batch, *FAST, *CPU])
    for spec, levers in LEVER_RUNS.items():
        runs.append(["generate", PROMPT, "-o", str(folder / f"{spec}-levers.mp4"), "--parallel", spec, *LEVERS,
                     *levers, *CPU])  # fmt: skip
    out_file = str(folder / "results")
    context = start_processes(_cli_worker, (2, runs, out_file), 2)
    join_or_fail(context, 600, f"{len(runs)} parallel CLI runs")
    return [torch.load(f"{out_file}.{rank}", weights_only=False) for rank in range(2)]


def _single_process(monkeypatch, tmp_path, *extra: str) -> np.ndarray:
    written = _record_frames(monkeypatch)
    assert main(["generate", PROMPT, "-o", str(tmp_path / "single.mp4"), *FAST, *CPU, *extra]) == 0
    return written.pop("single.mp4")


def _max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_parallel_generate_is_the_single_process_video(parallel_frames, monkeypatch, tmp_path):
    """Untiled by default (no tiling behind the user's back) on every layout, tiled with --vae-tiling;
    only rank 0 writes."""
    (statuses, frames), (other_statuses, other_frames) = parallel_frames
    assert statuses == other_statuses == [0] * (len(LAYOUTS) + 1 + 1 + len(LEVER_RUNS))
    assert other_frames == {}, "a rank other than 0 wrote a file"
    untiled = _single_process(monkeypatch, tmp_path)
    tiled = _single_process(monkeypatch, tmp_path, "--vae-tiling")
    assert _max_difference(untiled, tiled) > 20  # the demo's tiles show: the comparison below can tell
    for spec in LAYOUTS:
        assert _max_difference(frames[f"{spec}.mp4"], untiled) <= FRAME_TOLERANCE, spec
    assert _max_difference(frames[f"{TILED_LAYOUT}-tiled.mp4"], tiled) <= FRAME_TOLERANCE


def test_parallel_levers_give_the_single_process_video(parallel_frames, monkeypatch, tmp_path, capsys):
    """--cache (the group decides which steps skip) and --compile with --parallel."""
    (statuses, frames), _ = parallel_frames
    assert statuses[-len(LEVER_RUNS) :] == [0] * len(LEVER_RUNS)
    written = _record_frames(monkeypatch)
    assert main(["generate", PROMPT, "-o", str(tmp_path / "single.mp4"), *LEVERS, *CPU]) == 0
    computed = capsys.readouterr().out.split("cache 0.3: ")[1].split(" steps computed")[0]
    assert computed in {f"{n}/10" for n in range(2, 10)}  # some steps skipped, some computed
    for spec in LEVER_RUNS:
        assert _max_difference(frames[f"{spec}-levers.mp4"], written["single.mp4"]) <= FRAME_TOLERANCE, spec


def test_parallel_batch_is_the_single_process_batch(parallel_frames, monkeypatch, tmp_path):
    (_, frames), _ = parallel_frames
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
    written = _record_frames(monkeypatch)
    assert main(["batch", str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "out"), *FAST, *CPU]) == 0
    [(name, single)] = written.items()
    assert _max_difference(frames[name], single) <= FRAME_TOLERANCE


# ------------------------------------------------------------------------------------------------------
# Under torchrun only global rank 0 reports


RANK_MISTAKES = [
    (["generate", "a cat", "--parallel", "foo=2"], "cannot read 'foo=2'"),
    (["generate", "a cat", "--parallel", "cfg=3"], "cfg is 1 or 2"),
    (["generate", "a cat", "--parallel", "cfg=2", "--guidance", "1"], "guidance is off"),
    (["batch", "nofile.txt", "-o", "out"], "no prompts file at nofile.txt"),
    (["generate", "a cat", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("argv, message", RANK_MISTAKES)
def test_errors_are_printed_by_rank_0_alone(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "QUIET_EXIT_DELAY_S", 0, raising=False)
    monkeypatch.setenv("RANK", "0")
    status = cli_status(argv)
    out, err = capsys.readouterr()
    assert status == 2 and err.count("\n") == 1 and err.startswith("cogvideox: error:") and message in err
    monkeypatch.setenv("RANK", "1")  # the process group is not up: torchrun's RANK says who we are
    assert cli_status(argv) == status
    assert capsys.readouterr() == ("", "")


def test_warnings_are_printed_by_rank_0_alone(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    cli._show_warning("slow", UserWarning, "file.py", 1)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    cli._show_warning("slow", UserWarning, "file.py", 1)
    assert capsys.readouterr().err == "cogvideox: warning: slow\n"


def test_silent_ranks_leave_rank_0_time_to_report(monkeypatch):
    """torchrun stops every process when one exits: a silent one waits a moment after an error."""
    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    monkeypatch.setenv("RANK", "1")
    assert cli._quiet_exit(0) == 0 and waits == []
    assert cli._quiet_exit(2) == 2 and waits == [cli.QUIET_EXIT_DELAY_S]
    monkeypatch.setenv("RANK", "0")
    assert cli._quiet_exit(1) == 1 and waits == [cli.QUIET_EXIT_DELAY_S]


@pytest.mark.parametrize("argv, message", [RANK_MISTAKES[-2], RANK_MISTAKES[-1]])
def test_a_silent_rank_stopped_while_it_waits_stays_silent(capsys, monkeypatch, tmp_path, argv, message):
    """Rank 0 reports the shared mistake and exits; torchrun then sends SIGTERM to the others, which are
    waiting in _quiet_exit. They exit with the same status, without a traceback."""

    def stopped(seconds):
        raise cli.Terminated()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "sleep", stopped)
    monkeypatch.setenv("RANK", "1")
    assert cli_status(argv) == 2
    assert capsys.readouterr() == ("", "")


# One error found before the process group is up, one after (in the group); `batch`'s, found before, is
# checked in-process with torchrun's RANK (test_errors_are_printed_by_rank_0_alone), as are the other
# one-group messages below.
ERRORS_UNDER_TORCHRUN = [
    (["generate", "a cat", "--parallel", "foo=2"], "cannot read 'foo=2'"),
    (["generate", "a cat", "--parallel", "cfg=2,ulysses=2"], "one video runs on 4 process(es)"),
]


@pytest.mark.parametrize(
    "spec, world, message",
    [
        (None, 2, "one video runs on 1 process(es) without --parallel, but 2 were started (torchrun "
                  "--nproc-per-node): start 1, or use `cogvideox batch` to spread prompts over groups"),
        # One video wants exactly one group, not "a multiple of 3", and 2 processes are no two groups.
        ("ring=3", 2, "but 2 were started (torchrun --nproc-per-node): start 3"),
    ],
)
def test_one_video_wants_exactly_one_group(spec, world, message):
    from cogvideox.errors import InputError
    from cogvideox.parallel.launch import _check_one_group
    from cogvideox.parallel.mesh import parse_layout

    with pytest.raises(InputError) as error:
        _check_one_group(parse_layout(spec), world)
    assert str(error.value).endswith(message)
    _check_one_group(parse_layout(spec), parse_layout(spec).size)  # the right count passes


def test_each_error_under_torchrun_is_printed_once(tmp_path):
    """Each user mistake in two processes as torchrun starts them is reported once (by rank 0), not once
    per process, and each process exits with an error status."""
    for i, (argv, message) in enumerate(ERRORS_UNDER_TORCHRUN):
        folder = tmp_path / str(i)
        folder.mkdir()
        args = ([*argv, "--device", "cpu"], str(free_port()), str(folder), False)
        join_or_fail(start_processes(cli_rank, args, 2), 300, f"cogvideox {' '.join(argv)}")
        statuses = [int((folder / f"rank-{rank}.status").read_text()) for rank in range(2)]
        stderr = "".join((folder / f"rank-{rank}.err").read_text() for rank in range(2))
        errors = [line + "\n" for line in stderr.splitlines() if line.startswith("cogvideox: error:")]
        assert 0 not in statuses and len(errors) == 1 and message in errors[0], (argv, statuses, stderr[-2000:])


def _rank_of_torchrun(rank: int, argvs: list[list[str]], port: str, log_dir: str) -> None:
    """`cli_rank` with an argv of each rank's own, in the environment of torchrun's agent (which stops
    every process as soon as one exits with an error)."""
    os.environ["TORCHELASTIC_RUN_ID"] = "none"
    cli_rank(rank, argvs[rank], port, log_dir, check=False)


def test_an_error_of_one_process_alone_is_printed_by_it(tmp_path):
    """A LoRA file that rank 1 alone cannot read (as a file missing or damaged on one node): rank 1 says
    so, naming itself, after rank 0 had its moment; rank 0, whose collective lost its peer, says in one
    line that it stopped with it, without a traceback."""
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a safetensors file")
    argv = ["generate", "a cat", "-o", str(tmp_path / "v.mp4"), "--parallel", "cfg=2", *FAST, *CPU]
    argvs = [argv, [*argv, "--lora", str(bad)]]
    join_or_fail(start_processes(_rank_of_torchrun, (argvs, str(free_port()), str(tmp_path)), 2), 300,
                 "an error on rank 1 alone")  # fmt: skip
    statuses = [int((tmp_path / f"rank-{rank}.status").read_text()) for rank in range(2)]
    errs = [(tmp_path / f"rank-{rank}.err").read_text() for rank in range(2)]
    assert statuses == [1, 2], (statuses, errs)
    assert errs[1] == f"cogvideox: error: (rank 1) cannot read {bad} as a safetensors LoRA file (Error while " \
                      "deserializing header: header too large)\n", errs[1]  # fmt: skip
    assert errs[0].count("\n") == 1 and "another process of this torchrun run stopped" in errs[0], errs[0]
    assert not (tmp_path / "v.mp4").exists()


def test_a_kept_back_error_is_printed_only_by_a_process_torchrun_did_not_stop(capsys, monkeypatch):
    monkeypatch.setattr(cli.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    cli._say("cogvideox: error: no such file", error=True)
    assert cli._quiet_exit(2) == 2 and capsys.readouterr() == ("", "")  # a launcher that stops no one
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    cli._say("cogvideox: warning: slow")  # warnings stay rank 0's
    cli._say("cogvideox: error: no such file", error=True)
    assert cli._quiet_exit(2) == 2 and capsys.readouterr() == ("", "cogvideox: error: (rank 1) no such file\n")

    def stopped(seconds):
        raise cli.Terminated()

    monkeypatch.setattr(cli.time, "sleep", stopped)  # rank 0 met it too, reported it and exited
    cli._say("cogvideox: error: no such file", error=True)
    assert cli._quiet_exit(2) == 2 and capsys.readouterr() == ("", "")


def test_sigterm_stops_a_process_waiting_for_the_others_to_join(tmp_path):
    """Rank 0 waits in the rendezvous for a rank 1 that never comes (it failed before joining); torchrun's
    SIGTERM ends it at once instead of 30 s later with SIGKILL."""
    argv = ["generate", "a cat", "-o", str(tmp_path / "v.mp4"), "--parallel", "cfg=2", *FAST, *CPU]
    assert_sigterm_ends_rank_zero_waiting(argv)

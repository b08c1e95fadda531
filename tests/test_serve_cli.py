"""`serve` and `worker` on the command line: their options, one-line errors, and a `worker` process that
takes a job from the queue, generates it with the tiny model, and exits cleanly on SIGTERM."""

import argparse
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")

from serve_helpers import wait_until  # noqa: E402

from cogvideox.serve.cli import _is_loopback, add_serve_parsers, main  # noqa: E402
from cogvideox.serve.jobs import SQLiteStore  # noqa: E402
from cogvideox.video import read_video  # noqa: E402


def parse(argv):
    parser = argparse.ArgumentParser()
    add_serve_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_safe_defaults_and_options():
    args = parse(["serve"])
    assert (args.host, args.port, args.model, args.db, args.no_worker, args.api_key) == (
        "127.0.0.1",
        8000,
        None,
        None,
        False,
        [],
    )
    assert (args.rate_limit, args.max_queue, args.max_steps, args.prompt_enhancer) == (30.0, 100, 100, None)
    args = parse(["serve", "--api-key", "a", "--api-key", "b", "--db", "postgresql://u@h/db", "--no-worker"])
    assert args.api_key == ["a", "b"] and args.db == "postgresql://u@h/db" and args.no_worker
    args = parse(["worker", "--model", "THUDM/CogVideoX-2b", "--lease-seconds", "30"])
    assert args.command == "worker" and args.lease_seconds == 30.0 and args.run.__name__ == "run_worker"
    for bad in (["serve", "--port", "-1"], ["serve", "--rate-limit", "fast"], ["worker", "--lease-seconds", "0"]):
        with pytest.raises(SystemExit):
            parse(bad)
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.0.2.1")


def test_every_flag_says_what_it_does_and_its_default():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parsers(commands)
    for name in ("serve", "worker"):
        for action in commands.choices[name]._actions:
            if action.option_strings != ["-h", "--help"]:
                assert action.help and "default" in action.help, (name, action.option_strings)


def test_max_steps_says_it_caps_the_default_too():
    parser = argparse.ArgumentParser()
    add_serve_parsers(parser.add_subparsers(dest="command", required=True))
    serve = parser._subparsers._group_actions[0].choices["serve"]
    (max_steps,) = [a for a in serve._actions if a.option_strings == ["--max-steps"]]
    assert "a request without one gets the model's default (50), capped at this" in max_steps.help


def test_a_port_out_of_range_is_a_usage_error(capsys):
    for port in ("99999", "0", "http"):
        with pytest.raises(SystemExit) as exit_:
            parse(["serve", "--port", port])
        assert exit_.value.code == 2
        assert "argument --port: expected a port number from 1 to 65535, got" in capsys.readouterr().err
    assert parse(["serve", "--port", "65535"]).port == 65535


def test_a_poll_interval_past_the_clock_is_a_usage_error(capsys):
    for command in ("serve", "worker"):
        for seconds in ("1e10", "3601", "0", "soon"):
            with pytest.raises(SystemExit) as exit_:
                parse([command, "--poll-interval", seconds])
            assert exit_.value.code == 2
            assert "argument --poll-interval: expected" in capsys.readouterr().err
        assert parse([command, "--poll-interval", "3600"]).poll_interval == 3600


@pytest.mark.parametrize(
    "command, flag, expected",
    [
        # "" is every interface to the socket library: an unset $HOST opened the server to the network
        ("serve", "--host", "an address such as 127.0.0.1, or 0.0.0.0 for every interface"),
        # A worker with --db " " waited on a queue of its own, a file named by spaces, for jobs never coming
        *[(command, flag, "a file name") for command in ("serve", "worker") for flag in ("--db", "--data-dir")],
        # --model-name "" silently meant the folder's name, and " " served a model clients cannot name
        *[(command, "--model-name", "a model name") for command in ("serve", "worker")],
        # --sizes " " served the native size alone, as if no --sizes were given
        ("serve", "--sizes", "sizes such as 768x1360,1360x768"),
    ],
)
def test_a_blank_value_is_a_usage_error(capsys, command, flag, expected):
    for blank in ("", "  "):
        with pytest.raises(SystemExit) as exit_:
            parse([command, flag, blank])
        assert exit_.value.code == 2
        assert f"argument {flag}: expected {expected}, got an empty one (an unset variable?)" in capsys.readouterr().err


def test_a_port_in_use_fails_in_one_line_before_anything_starts(tmp_path, capsys, monkeypatch):
    import socket

    from cogvideox.serve import spec

    monkeypatch.setattr(spec.ModelSpec, "load", lambda *a: pytest.fail("loaded the model before binding"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cogvideox: error: cannot listen on 127.0.0.1:{port}: address already in use")
    assert err.count("\n") == 1 and not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "flags, variable, message",
    [
        (["--api-key", ""], None, "--api-key is empty (an unset variable?)"),
        (["--api-key", "  "], None, "--api-key is empty"),
        ([], ",", "$COGVIDEOX_API_KEYS is set but holds no key"),
        ([], "", "$COGVIDEOX_API_KEYS is set but holds no key"),
        (["--api-key", "clé"], None, "an API key may hold printable ASCII characters only"),  # no client can send it
        ([], "good,tab\tkey", "an API key may hold printable ASCII characters only"),
    ],
)
def test_an_empty_or_unsendable_api_key_is_refused_not_ignored(tmp_path, capsys, monkeypatch, flags, variable, message):
    from cogvideox.serve import spec

    monkeypatch.setattr(spec.ModelSpec, "load", lambda *a: pytest.fail("loaded the model before checking keys"))
    if variable is not None:
        monkeypatch.setenv("COGVIDEOX_API_KEYS", variable)
    assert main(["serve", "--host", "0.0.0.0", *flags, "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"cogvideox: error: {message}")


def test_a_missing_model_is_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("cogvideox: error: ") and "\n" not in error
    assert main(["worker", "--model", str(tmp_path), "--data-dir", str(tmp_path)]) == 2


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_data_dir_or_queue_that_cannot_be_opened_is_one_line(tmp_path, capsys, command):
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = ["--port", str(free.getsockname()[1])] if command == "serve" else []
    (tmp_path / "file").write_text("not a folder")
    assert main([command, *port, "--data-dir", str(tmp_path / "file")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"cogvideox: error: --data-dir {tmp_path / 'file'}: cannot make ")
    assert error.count("\n") == 1
    (tmp_path / "queue.sqlite3").write_bytes(b"not a database" * 100)
    assert main([command, *port, "--data-dir", str(tmp_path / "data"), "--db", str(tmp_path / "queue.sqlite3")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"cogvideox: error: cannot open the SQLite queue at {tmp_path / 'queue.sqlite3'} (file is")
    assert error.count("\n") == 1


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_data_dir_that_takes_no_file_is_one_line(tmp_path, capsys, monkeypatch, command):
    """A read-only mount (a permission a root test cannot take away): refused at start, not at each job."""
    import errno
    import tempfile

    from cogvideox.serve import jobs

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(jobs, "open_store", lambda *a: pytest.fail("opened the queue with a folder that takes no file"))
    port = ["--port", str(_free_port())] if command == "serve" else []
    data = tmp_path / "data"
    assert main([command, *port, "--data-dir", str(data)]) == 2
    error = capsys.readouterr().err
    assert error == (f"cogvideox: error: --data-dir {data}: cannot write in {data / 'videos'} (read-only file "
                     "system); give a folder this process can write\n")  # fmt: skip


def test_files_left_half_written_by_a_killed_process_are_removed_at_start(tmp_path):
    """A worker killed while it wrote an MP4 leaves its temporary file; the next start removes such files
    once they are an hour old (a younger one may be another worker's, being written), and nothing else."""
    import os
    import time

    from cogvideox.serve.cli import STALE_PART_S, make_data_dir

    videos = tmp_path / "data" / "videos"
    videos.mkdir(parents=True)
    stale, fresh, video = videos / ".abc.x1y2.mp4.part", videos / ".def.z3w4.mp4.part", videos / "abc.mp4"
    for path in (stale, fresh, video):
        path.write_bytes(b"frames")
    old = time.time() - STALE_PART_S - 60
    for path in (stale, video):
        os.utime(path, (old, old))
    make_data_dir(str(tmp_path / "data"))
    assert sorted(p.name for p in videos.iterdir()) == sorted([fresh.name, video.name])


def _free_port() -> int:
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def test_memory_and_speed_flags_reach_the_workers_pipeline(tmp_path):
    import torch

    from cogvideox.serve.cli import load_settings

    args = parse(["worker", "--model", "m", "--dtype", "fp32", "--device", "cpu", "--text-device", "cpu",
                  "--vae-tiling", "--quantize", "int8", "--cache", "0.1"])  # fmt: skip
    load, speed = load_settings(args)
    assert load == dict(dtype="fp32", device="cpu", offload="auto", text_device=torch.device("cpu"), vae_tiling=True)
    assert speed == dict(quantize="int8", compile=False, cache=0.1, attention="auto")
    assert load_settings(parse(["serve", "--device", "cpu"]))[1] is None  # no speed flag: the exact model


def test_a_worker_builds_its_pipeline_with_those_settings(tiny_rope_dir):
    from cogvideox.serve.worker import PipelineGenerator

    generator = PipelineGenerator(
        str(tiny_rope_dir),
        load=dict(dtype="fp32", device="cpu", offload="auto", vae_tiling=True),
        speed=dict(quantize="int8", compile=False, cache=0.0, attention="auto"),
    )
    generator.load()
    pipe = generator.pipe
    assert pipe.vae.use_tiling and pipe.acceleration.quantize == "int8" and pipe.acceleration.cache
    frames = []
    generated = generator(dict(prompt="a cat", negative_prompt="", num_frames=9, height=64, width=96, fps=8,
                               num_inference_steps=2, guidance_scale=6.0, seed=0), lambda i, n: frames.append(i))  # fmt: skip
    assert generated.frames.shape == (9, 64, 96, 3) and frames == [1, 2]
    # The video's record names the lever that changes it (int8; the cache at 0 computes every step).
    assert (generated.record["quantize"], generated.record["lossy_levers"]) == ("int8", "int8")
    assert (generated.record["model"], generated.record["fps"]) == (str(tiny_rope_dir), 8)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_speed_flag_the_device_cannot_run_stops_before_anything_starts(tmp_path, capsys, command):
    data = tmp_path / "data"
    argv = [command, "--device", "cpu", "--attention", "fa3", "--data-dir", str(data)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("cogvideox: error: the fa3 attention backend needs a CUDA GPU") and error.count("\n") == 1
    assert not data.exists()  # no queue was opened, no worker started
    assert main([command, "--device", "cpu", "--compile", "--offload", "sequential", "--data-dir", str(data)]) == 2
    assert "--compile does not combine with --offload sequential" in capsys.readouterr().err


def test_worker_process_runs_a_queued_job_and_stops_on_sigterm(tiny_rope_dir, tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    params = {"prompt": "a bird flies", "negative_prompt": "", "width": 64, "height": 64, "num_frames": 9, "fps": 8,
              "num_inference_steps": 2, "guidance_scale": 6.0, "seed": 3}  # fmt: skip
    job = store.create("tiny", "test", params)
    command = [sys.executable, "-m", "cogvideox.serve", "worker", "--model", str(tiny_rope_dir), "--model-name", "tiny",
               "--data-dir", str(tmp_path), "--poll-interval", "0.05", "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        # The worker imports torch and loads the model first: seconds, or a minute on a loaded machine.
        finished = lambda: store.get(job.id).status == "completed" or process.poll() is not None  # noqa: E731
        done = wait_until(finished, timeout=180)
        assert done and process.poll() is None, process.stderr.read()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0  # the interpreter's exit after torch alone takes seconds here
    frames, fps = read_video(tmp_path / "videos" / f"{job.id}.mp4")
    assert frames.shape == (9, 64, 64, 3) and fps == 8
    assert process.stderr.read() == ""  # a quiet log at --log-level warning
    store.close()


def test_expire_after_is_hours_and_reaches_the_app(tmp_path, monkeypatch, tiny_rope_dir):
    import socket

    import uvicorn

    from cogvideox.serve import app

    assert parse(["serve"]).expire_after is None  # videos are kept unless asked
    with pytest.raises(SystemExit):
        parse(["serve", "--expire-after", "0"])
    made = {}
    monkeypatch.setattr(app, "create_app", lambda spec, store, settings, worker: made.setdefault("settings", settings))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["serve", "--model", str(tiny_rope_dir), "--no-worker", "--expire-after", "1.5", "--port", str(port),
            "--data-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert made["settings"].expire_after == 5400


def test_a_variant_reaches_the_workers_pipeline_and_its_records(tiny_rope_dir, tmp_path, capsys):
    """`--variant fp16`: the worker loads the variant's weights and its videos' records carry it; a variant
    the model lacks stops `serve` and `worker` at start, in one line."""
    import torch
    from helpers import make_variant_model

    from cogvideox import Pipeline
    from cogvideox.serve.cli import load_settings
    from cogvideox.serve.worker import PipelineGenerator

    model = make_variant_model(tiny_rope_dir, tmp_path / "model")
    load, _ = load_settings(parse(["worker", "--model", str(model), "--device", "cpu", "--variant", "fp16"]))
    assert load["variant"] == "fp16"
    assert "variant" not in load_settings(parse(["worker", "--device", "cpu"]))[0]
    generator = PipelineGenerator(str(model), load=load)
    generator.load()
    want = Pipeline.from_pretrained(model, variant="fp16").transformer.state_dict()
    got = generator.pipe.transformer.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    generated = generator(dict(prompt="a cat", negative_prompt="", num_frames=9, height=64, width=96, fps=8,
                               num_inference_steps=2, guidance_scale=6.0, seed=0), lambda i, n: None)  # fmt: skip
    assert generated.record["variant"] == "fp16"
    for command in ("serve", "worker"):
        capsys.readouterr()
        assert main([command, "--model", str(model), "--variant", "ema", "--data-dir", str(tmp_path / "data")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.endswith("has no weights of the variant 'ema'; its weights come in the variant(s) fp16")
        assert "\n" not in error

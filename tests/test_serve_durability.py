"""A restart loses nothing: `serve` is killed with SIGKILL while a job runs, started again on the same data
folder, and the running job (re-queued when its lease runs out) and the queued ones all complete."""

import os
import signal
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("fastapi")

from helpers import free_port  # noqa: E402
from serve_helpers import wait_until  # noqa: E402

from cogvideox.serve.jobs import SQLiteStore  # noqa: E402
from cogvideox.video import read_video  # noqa: E402

LEASE = 2  # seconds: how long the dead worker's job waits before it is claimed again


def start_server(model_dir, data_dir, port, log):
    command = [
        sys.executable, "-m", "cogvideox.serve", "serve", "--model", str(model_dir), "--model-name", "tiny",
        "--port", str(port), "--data-dir", str(data_dir), "--lease-seconds", str(LEASE), "--poll-interval", "0.05",
        "--sizes", "128x128", "--max-steps", "1000", "--rate-limit", "0", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}; see {log.name}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).json()["worker"] == "ready"
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=60, interval=0.1, what="the server")
    return process, url


def test_kill_9_while_running_loses_nothing(tiny_rope_dir, tmp_path):
    data = tmp_path / "data"
    log = open(tmp_path / "server.log", "w")
    process, url = start_server(tiny_rope_dir, data, free_port(), log)
    try:
        # A long job (1000 steps at 128x128, a few seconds here) to kill mid-way, and two behind it.
        slow_request = {"prompt": "a cat", "size": "128x128", "num_inference_steps": 1000, "seed": 1}
        slow = httpx.post(f"{url}/v1/videos", json=slow_request).json()
        queued = [
            httpx.post(f"{url}/v1/videos", json={"prompt": f"a dog {i}", "num_inference_steps": 2}).json()
            for i in range(2)
        ]
        wait_until(
            lambda: httpx.get(f"{url}/v1/videos/{slow['id']}").json()["progress"] >= 5,
            timeout=30,
            what="the slow job to be under way",
        )
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()

    store = SQLiteStore(data / "jobs.sqlite3")
    assert store.get(slow["id"]).status == "in_progress"  # as the dead worker left it
    assert [store.get(v["id"]).status for v in queued] == ["queued", "queued"]
    assert list((data / "videos").iterdir()) == []  # nothing half-written

    process, url = start_server(tiny_rope_dir, data, free_port(), log)
    try:

        def all_done():
            videos = [httpx.get(f"{url}/v1/videos/{v['id']}").json() for v in (slow, *queued)]
            return videos if all(v["status"] not in ("queued", "in_progress") for v in videos) else None

        videos = wait_until(all_done, timeout=60, interval=0.1, what="every job to finish after the restart")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        log.close()

    assert [v["status"] for v in videos] == ["completed"] * 3
    assert [store.get(v["id"]).attempts for v in videos] == [2, 1, 1]  # the slow one ran twice, the others once
    frames, fps = read_video(data / "videos" / f"{slow['id']}.mp4")
    assert frames.shape == (9, 128, 128, 3) and fps == 8
    assert sorted(p.name for p in (data / "videos").iterdir()) == sorted(f"{v['id']}.mp4" for v in videos)
    store.close()

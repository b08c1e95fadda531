"""The worker's side of the contract: a job cut short by shutdown goes back to the queue untouched, a job
cancelled while its file was being written leaves no file, and failures are reported by kind."""

import errno
import tempfile
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")

from helpers import fill_disk_for, read_rescued  # noqa: E402
from serve_helpers import BlockingGenerator  # noqa: E402

from cogvideox.errors import NonFiniteError, OutOfMemoryError  # noqa: E402
from cogvideox.serve.jobs import SQLiteStore  # noqa: E402
from cogvideox.serve.worker import Generated, Worker, video_path  # noqa: E402
from cogvideox.video import read_video  # noqa: E402

PARAMS = {"prompt": "a cat", "fps": 8}


@pytest.fixture
def store(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    yield store
    store.close()


def test_shutdown_mid_job_hands_it_back(store, tmp_path):
    generate = BlockingGenerator()
    job = store.create("m", "o", PARAMS)
    worker = Worker(store, generate, tmp_path, "m", poll_interval=0.02).start()
    assert generate.started.wait(10)
    worker.stop()
    assert generate.stopped.is_set()
    back = store.get(job.id)
    assert (back.status, back.worker, back.attempts, back.progress) == ("queued", None, 0, 0)
    assert not video_path(tmp_path, job.id).exists()


def test_a_job_cancelled_while_its_file_is_written_leaves_no_file(store, tmp_path):
    def cancelled_at_the_last_moment(params, on_step):
        store.cancel(job.id)  # as if DELETE came in after the last step, before the next heartbeat
        return Generated(np.zeros((2, 16, 16, 3), np.uint8), {})

    job = store.create("m", "o", PARAMS)
    worker = Worker(store, cancelled_at_the_last_moment, tmp_path, "m")
    assert worker.run_once()
    assert store.get(job.id).status == "cancelled"
    assert list((tmp_path / "videos").iterdir()) == []


@pytest.mark.parametrize(
    "error, code, message",
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "out_of_memory", "the GPU ran out of memory"),
        (OutOfMemoryError("out of GPU memory in VAE decoding (offload none); try --vae-tiling", stage="decode"),
         "out_of_memory", "the GPU ran out of memory (decode); try a smaller size"),
        (NonFiniteError("NaN latents at step 3"), "generation_failed", "NaN latents at step 3"),
        (KeyError("width"), "internal_error", "KeyError: 'width'"),
    ],
)
def test_failures_are_reported_by_kind(store, tmp_path, error, code, message):
    def fail(params, on_step):
        raise error

    job = store.create("m", "o", PARAMS)
    assert Worker(store, fail, tmp_path, "m").run_once()
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error["code"] == code and failed.error["message"].startswith(message)


def test_a_video_the_server_cannot_store_is_its_own_failure_and_logged(store, tmp_path, caplog, monkeypatch):
    def made(params, on_step):
        return Generated(np.zeros((2, 16, 16, 3), np.uint8), {})

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the video is kept instead
    job = store.create("m", "o", PARAMS)
    worker = Worker(store, made, tmp_path, "m", write_retry_delays=())
    (tmp_path / "videos").rmdir()
    (tmp_path / "videos").write_text("")  # the data folder broken under the running server
    with caplog.at_level("WARNING", logger="cogvideox.serve"):
        assert worker.run_once()
    failed = store.get(job.id)
    assert failed.error["code"] == "internal_error" and str(tmp_path) not in failed.error["message"]
    assert any(job.id in r.getMessage() and "cannot store its video" in r.getMessage() for r in caplog.records)


def test_a_full_disk_is_the_servers_failure_and_names_no_path(store, tmp_path, monkeypatch, caplog):
    """A data folder whose disk stays full: tried again, then the video is kept in the temporary folder
    (minutes of GPU work), the log tells the operator why and where, and the caller learns no path."""
    job = store.create("m", "o", PARAMS)
    target = video_path(tmp_path, job.id)
    fill_disk_for(monkeypatch, target, tmp_path / "rescue")
    (tmp_path / "rescue").mkdir()
    made = np.full((2, 16, 16, 3), 200, np.uint8)
    worker = Worker(store, lambda params, on_step: Generated(made, {}), tmp_path, "m",
                    write_retry_delays=(0.01, 0.01))  # fmt: skip
    with caplog.at_level("WARNING", logger="cogvideox.serve"):
        assert worker.run_once()
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error["code"] == "internal_error"
    assert failed.error["message"] == "the server could not store the video; its operator has the details"
    retried = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert len(retried) == 2 and all("No space left on device" in m for m in retried), retried
    (logged,) = [r.getMessage() for r in caplog.records if "cannot store its video" in r.getMessage()]
    rescued = read_rescued("cogvideox: error: " + logged.split("cannot store its video: ")[1], target)
    frames = read_video(rescued)[0]
    assert frames.shape == made.shape and abs(frames.astype(int) - 200).max() <= 3
    assert not target.exists()


def test_a_disk_freed_while_the_worker_waits_takes_the_video(store, tmp_path, monkeypatch):
    import cogvideox.video

    export, calls = cogvideox.video.export_video, []

    def full_once(frames, path, **kwargs):  # the sweep of expired videos frees room meanwhile
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return export(frames, path, **kwargs)

    monkeypatch.setattr(cogvideox.video, "export_video", full_once)
    job = store.create("m", "o", PARAMS)
    worker = Worker(store, lambda params, on_step: Generated(np.zeros((2, 16, 16, 3), np.uint8), {}), tmp_path,
                    "m", write_retry_delays=(0.01, 0.01))  # fmt: skip
    assert worker.run_once()
    assert store.get(job.id).status == "completed" and len(calls) == 2
    assert read_video(video_path(tmp_path, job.id))[0].shape == (2, 16, 16, 3)


def test_the_worker_keeps_its_lease_while_a_step_runs_long(store, tmp_path):
    """A step (or the VAE decode) longer than the lease must not let another worker take the job."""
    release = threading.Event()

    def one_long_step(params, on_step):
        release.wait(10)
        return Generated(np.zeros((2, 16, 16, 3), np.uint8), {})

    job = store.create("m", "o", PARAMS)
    worker = Worker(store, one_long_step, tmp_path, "m", lease_seconds=0.4, poll_interval=0.02).start()
    try:
        time.sleep(1.2)  # three leases' worth
        assert store.claim("other", "m", 30) is None
    finally:
        release.set()
        worker.stop()
    done = store.get(job.id)
    assert (done.status, done.attempts) == ("completed", 1)


def test_a_model_that_fails_to_load_shows_in_the_state(store, tmp_path):
    from cogvideox.serve.worker import PipelineGenerator

    worker = Worker(store, PipelineGenerator(str(tmp_path / "no-model")), tmp_path, "m").start()
    worker._thread.join(30)
    assert worker.state == "failed"

"""Shared pieces of the serve tests: a real server on loopback, waiting, stand-in generators, outside services."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_VAE_KWARGS, tiny_transformer_kwargs

from cogvideox.serve.worker import Generated

try:  # a module name, for FastAPI to resolve the stand-in's annotation (these helpers postpone them)
    from fastapi import Request
except ImportError:  # the serve tests skip themselves then
    Request = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PG_URL_ENV = "COGVIDEOX_TEST_PG_URL"
ARTIFACTS = Path(__file__).parent / "artifacts" / "serve"


def service_missing(reason: str):
    """Skip: the outside service is not on this machine. In CI (CI=true) fail instead: CI installs and starts
    them (scripts/ci-services.sh), so a missing one there is a broken setup, not a reason to test less."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must provide it: see scripts/ci-services.sh)")
    pytest.skip(reason)


def artifacts_dir() -> Path:
    """tests/artifacts/serve: screenshots and such; the folder ignores itself in git."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ignore = ARTIFACTS.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return ARTIFACTS


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; that value, or an AssertionError at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def serving(app):
    """Run `app` under uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=20, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def chat_stand_in(respond):
    """A stand-in for any OpenAI-compatible chat server, on loopback. Each POST /v1/chat/completions is
    recorded as {"body", "authorization"} and answered by `respond(body)`: a string is the answer's text,
    an int an error of that status, a dict a body sent as it is. Yields (the base URL, ending in /v1, and
    the list of records)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    requests = []

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        requests.append({"body": body, "authorization": request.headers.get("authorization")})
        answer = respond(body)
        if isinstance(answer, int):
            return JSONResponse({"error": {"message": "stand-in error"}}, status_code=answer)
        if isinstance(answer, dict):
            return answer
        message = {"role": "assistant", "content": answer}
        return {"object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    with serving(app) as url:
        yield url + "/v1", requests


@contextmanager
def in_process_service(folder, name: str, data: Path, pipe, extra_sizes=(), loras: dict | None = None):
    """The model at `folder` (loaded as `pipe`) served with its worker in this process, as `cogvideox serve`
    runs it, without rate or queue limits: yields (a TestClient, once the worker is ready; the store).
    loras: {name: path} served (`pipe` holds them under those names)."""
    from fastapi.testclient import TestClient

    from cogvideox.serve.app import Settings, create_app
    from cogvideox.serve.jobs import SQLiteStore
    from cogvideox.serve.spec import ModelSpec
    from cogvideox.serve.worker import PipelineGenerator, Worker

    spec = ModelSpec.from_folder(folder, name, extra_sizes=extra_sizes, loras=tuple(loras or {}))
    store = SQLiteStore(data / "jobs.sqlite3")
    worker = Worker(store, PipelineGenerator(pipe=pipe, loras=loras), data, spec.name, poll_interval=0.05)
    app = create_app(spec, store, Settings(data_dir=data, rate_limit=0, max_active_per_key=0), worker)
    try:
        with TestClient(app) as client:
            wait_until(lambda: client.get("/healthz").json()["worker"] == "ready", what="the worker")
            yield client, store
    finally:
        store.close()


def write_config_folder(folder: Path, **transformer_overrides) -> Path:
    """A model folder with only the two configs `ModelSpec` reads (no weights): the tiny model's shape."""
    transformer = {
        "_class_name": "CogVideoXTransformer3DModel",
        **tiny_transformer_kwargs("rope"),
        **transformer_overrides,
    }
    vae = {"_class_name": "AutoencoderKLCogVideoX", **TINY_VAE_KWARGS}
    for name, config in (("transformer", transformer), ("vae", vae)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    return folder


class CountingGenerator:
    """A stand-in for the Pipeline that makes a 2-frame 16x16 clip at once and counts calls per prompt."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, params, on_step):
        with self._lock:
            self.calls[params["prompt"]] += 1
        if self.delay:
            time.sleep(self.delay)
        on_step(1, 1)
        value = (sum(map(ord, params["prompt"])) * 7) % 256
        return Generated(np.full((2, 16, 16, 3), value, np.uint8), {"denoise": self.delay})


class BlockingGenerator:
    """Steps every 10 ms until `release` is set, so a test can act while a job runs."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.stopped = threading.Event()  # the worker's callback raised: the job was abandoned
        self.prompts: list[str] = []

    def __call__(self, params, on_step):
        self.prompts.append(params["prompt"])
        self.started.set()
        step = 0
        while not self.release.is_set():
            step += 1
            try:
                on_step(min(step, 99), 100)  # raises when the job was cancelled
            except BaseException:
                self.stopped.set()
                raise
            time.sleep(0.01)
        return Generated(np.zeros((2, 16, 16, 3), np.uint8), {"denoise": 0.0})


def chromium_or_skip() -> None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        service_missing(f"no headless Chromium: {CHROMIUM} and {CHROMEDRIVER} (Debian's chromium, chromium-driver)")

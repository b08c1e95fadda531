"""Prompt enhancement against a local fake OpenAI-compatible chat endpoint: the rewritten prompt is what
the worker generates from; opting out, or an endpoint that fails, leaves the prompt as given."""

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from serve_helpers import chat_stand_in, write_config_folder  # noqa: E402

from cogvideox.serve.app import Settings, create_app  # noqa: E402
from cogvideox.enhance import PromptEnhancer  # noqa: E402
from cogvideox.serve.jobs import SQLiteStore  # noqa: E402
from cogvideox.serve.spec import ModelSpec  # noqa: E402
from cogvideox.serve.worker import PipelineGenerator, Worker  # noqa: E402

REWRITTEN = "A giant panda in a bamboo grove strums a small guitar; soft morning light, slow dolly in."


@pytest.fixture(scope="module")
def chat_endpoint():
    """Answers every chat completion with REWRITTEN; the prompt "fail" gets a 500."""
    with chat_stand_in(lambda body: 500 if body["messages"][-1]["content"] == "fail" else f'  "{REWRITTEN}"\n') as e:
        yield e


class RecordingPipe:
    """Takes the place of a Pipeline: records the prompt it was called with."""

    def __init__(self):
        self.prompts = []

    def __call__(self, prompt, **kwargs):
        self.prompts.append(prompt)
        return SimpleNamespace(frames=[np.zeros((9, 16, 16, 3), np.uint8)], timings={"denoise": 0.0})


class Unrecorded(PipelineGenerator):
    """The worker's generator without the record of each video (a `RecordingPipe` has no settings)."""

    def _record(self, prompt, params, request, loras):
        return None


def service(tmp_path, enhancer_url):
    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "model"), "tiny")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    enhancer = enhancer_url and PromptEnhancer(enhancer_url, "chat-small", "ek", attempts=2, backoff=0.0)
    settings = Settings(data_dir=tmp_path, prompt_enhancer=enhancer or None)
    pipe = RecordingPipe()
    worker = Worker(store, Unrecorded(pipe=pipe), tmp_path, spec.name)
    return TestClient(create_app(spec, store, settings)), worker, pipe


def test_the_enhanced_prompt_is_generated(chat_endpoint, tmp_path):
    url, requests = chat_endpoint
    client, worker, pipe = service(tmp_path, url)
    requests.clear()
    video = client.post("/v1/videos", json={"prompt": "panda with guitar"}).json()
    assert video["prompt"] == "panda with guitar" and video["enhanced_prompt"] == REWRITTEN

    [sent] = requests
    assert sent["authorization"] == "Bearer ek" and sent["body"]["model"] == "chat-small"
    assert sent["body"]["messages"] == PromptEnhancer(url).messages("panda with guitar")
    assert worker.run_once()
    assert pipe.prompts == [REWRITTEN]
    assert client.get(f"/v1/videos/{video['id']}").json()["status"] == "completed"


def test_opting_out_or_a_failing_enhancer_keeps_the_prompt(chat_endpoint, tmp_path):
    url, requests = chat_endpoint
    client, worker, pipe = service(tmp_path, url)
    requests.clear()
    kept = client.post("/v1/videos", json={"prompt": "a cat", "enhance_prompt": False}).json()
    assert kept["enhanced_prompt"] is None and requests == []
    failed = client.post("/v1/videos", json={"prompt": "fail"})
    # Retried once (a 500 may pass), then the prompt as given.
    assert failed.status_code == 200 and failed.json()["enhanced_prompt"] is None and len(requests) == 2
    assert worker.run_once() and worker.run_once()
    assert pipe.prompts == ["a cat", "fail"]

    unreachable, _, _ = service(tmp_path / "other", "http://127.0.0.1:9/v1")  # nothing listens on port 9
    assert unreachable.post("/v1/videos", json={"prompt": "a dog"}).json()["enhanced_prompt"] is None


def test_off_by_default(tmp_path):
    client, _, _ = service(tmp_path, None)
    assert client.post("/v1/videos", json={"prompt": "a cat"}).json()["enhanced_prompt"] is None


def test_an_image_to_video_job_shows_its_first_frame_to_the_enhancer(chat_endpoint, tmp_path):
    """As `generate --image --prompt-enhancer` does: the chat model sees the picture the video starts from."""
    import io

    from helpers import tiny_transformer_kwargs
    from PIL import Image

    from cogvideox.serve.inputs import input_path

    url, requests = chat_endpoint
    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "model", **tiny_transformer_kwargs("i2v")), "i2v")
    enhancer = PromptEnhancer(url, "chat-small", attempts=1)
    client = TestClient(create_app(spec, SQLiteStore(tmp_path / "j.sqlite3"),
                                   Settings(data_dir=tmp_path, prompt_enhancer=enhancer)))  # fmt: skip
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 250)).save(png, format="PNG")
    requests.clear()
    video = client.post("/v1/videos", data={"prompt": "the car drives off"},
                        files={"input_reference": ("car.png", png.getvalue(), "image/png")}).json()  # fmt: skip
    assert video["enhanced_prompt"] == REWRITTEN
    [sent] = requests
    [stored] = (tmp_path / "inputs").iterdir()
    assert sent["body"]["messages"] == enhancer.messages("the car drives off", input_path(tmp_path, stored.name))
    assert sent["body"]["messages"][1]["content"][1]["type"] == "image_url"

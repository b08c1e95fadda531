"""LoRAs chosen per request: `serve --lora NAME=PATH` loads them at start, a request names them in `lora`, and
the served video is the library's with the same LoRA; the next request without one gets the base model."""

import argparse

import numpy as np
import pytest

pytest.importorskip("fastapi")

from helpers import random_lora  # noqa: E402
from serve_helpers import in_process_service, wait_until  # noqa: E402

from cogvideox import InputError  # noqa: E402
from cogvideox.cli import build_parser  # noqa: E402
from cogvideox.pipeline import Pipeline  # noqa: E402
from cogvideox.serve.cli import load_settings, served_loras  # noqa: E402
from cogvideox.serve.worker import PipelineGenerator, load_served_loras, video_path  # noqa: E402
from cogvideox.train import lora  # noqa: E402
from cogvideox.video import export_video, read_metadata, read_video  # noqa: E402

FAST = dict(num_inference_steps=2, seed=5, seconds="1")
SAME = dict(num_inference_steps=2, seed=5, height=64, width=64, num_frames=9)


@pytest.fixture(scope="module")
def lora_paths(tiny_rope_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-loras")
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    random_lora(pipe.transformer, 4, 8.0, seed=1, name="style")
    random_lora(pipe.transformer, 2, 1.0, seed=2, name="motion", targets=("to_q", "to_v"))
    return {name: str(lora.save_lora(pipe.transformer, root / name, name=name)) for name in ("style", "motion")}


@pytest.fixture(scope="module")
def lora_service(tiny_rope_dir, lora_paths, tmp_path_factory):
    data = tmp_path_factory.mktemp("serve-lora")
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    load_served_loras(pipe, lora_paths)  # as PipelineGenerator.load does for a pipeline it loads itself
    with in_process_service(tiny_rope_dir, "tiny", data, pipe, loras=lora_paths) as (client, store):
        yield client, data


def finished(client, video_id):
    def done():
        video = client.get(f"/v1/videos/{video_id}").json()
        return video if video["status"] not in ("queued", "in_progress") else None

    return wait_until(done, timeout=60, what=f"{video_id} to finish")


def as_served(frames, tmp_path):
    """The library's frames through the same MP4 encoding the service writes."""
    return read_video(export_video(frames, tmp_path / "direct.mp4", fps=8))[0]


def served_frames(client, data, body, form=False):
    response = client.post("/v1/videos", data=body) if form else client.post("/v1/videos", json=body)
    assert response.status_code == 200, response.text
    video = finished(client, response.json()["id"])
    assert video["status"] == "completed", video["error"]
    return video, read_video(video_path(data, video["id"]))[0]


def test_a_request_runs_the_lora_it_names_and_the_next_one_runs_none(tiny_rope_dir, lora_service, lora_paths,
                                                                      tmp_path):
    client, data = lora_service
    assert client.get("/v1/models").json()["data"][0]["loras"] == ["style", "motion"]

    video, frames = served_frames(client, data, {"prompt": "a cat", **FAST, "lora": [{"name": "style", "scale": 0.7}]})
    assert video["lora"] == [{"name": "style", "scale": 0.7}]
    want = Pipeline.from_pretrained(tiny_rope_dir, lora=[(lora_paths["style"], 0.7)])("a cat", progress=False, **SAME)
    assert np.array_equal(frames, as_served(want.frames[0], tmp_path))
    assert read_metadata(video_path(data, video["id"]))["lora"] == [[lora_paths["style"], 0.7]]

    # Two at once, as a form sends them.
    video, frames = served_frames(client, data, {"prompt": "a cat", **FAST, "lora": "style:0.7,motion:-1.5"}, form=True)
    assert video["lora"] == [{"name": "style", "scale": 0.7}, {"name": "motion", "scale": -1.5}]
    both = [(lora_paths["style"], 0.7), (lora_paths["motion"], -1.5)]
    want = Pipeline.from_pretrained(tiny_rope_dir, lora=both)("a cat", progress=False, **SAME)
    assert np.array_equal(frames, as_served(want.frames[0], tmp_path))

    # No LoRA: the base model, exactly, though both stay loaded.
    video, frames = served_frames(client, data, {"prompt": "a cat", **FAST})
    assert video["lora"] is None and "lora" not in read_metadata(video_path(data, video["id"]))
    want = Pipeline.from_pretrained(tiny_rope_dir)("a cat", progress=False, **SAME)
    assert np.array_equal(frames, as_served(want.frames[0], tmp_path))


def test_a_remix_keeps_the_videos_loras_unless_told(lora_service):
    client, data = lora_service
    video, _ = served_frames(client, data, {"prompt": "a cat", **FAST, "lora": "motion:0.5"})
    kept = client.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "a dog", "num_inference_steps": 2})
    assert kept.status_code == 200 and kept.json()["lora"] == [{"name": "motion", "scale": 0.5}]
    dropped = client.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "a dog", "lora": ""})
    assert dropped.status_code == 200 and dropped.json()["lora"] is None
    for job in (kept.json()["id"], dropped.json()["id"]):
        assert finished(client, job)["status"] == "completed"


@pytest.mark.parametrize(
    "value, message",
    [
        ("sepia", "lora: no LoRA named 'sepia'; this server has style, motion"),
        ("style,style:0.5", "lora: 'style' is named twice"),
        ("style:strong", "the scale of LoRA 'style' must be a number, got 'strong'"),
        ([{"name": "style", "scale": 11}], "lora.0.scale"),
        ([{"name": "style", "weight": 1}], "lora.0.weight"),
        (3, "lora"),
    ],
)
def test_bad_lora_requests_are_400(lora_service, value, message):
    client, _ = lora_service
    response = client.post("/v1/videos", json={"prompt": "a cat", "lora": value})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"] or response.json()["error"]["param"] == message


def test_a_server_without_loras_refuses_one(tiny_rope_dir, tmp_path):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    with in_process_service(tiny_rope_dir, "plain", tmp_path, pipe) as (client, _):
        assert client.get("/v1/models").json()["data"][0]["loras"] == []
        response = client.post("/v1/videos", json={"prompt": "a cat", "lora": "style"})
        assert response.status_code == 400 and response.json()["error"]["message"] == (
            "lora: plain is served without LoRAs"
        )


def test_a_worker_without_the_named_lora_fails_the_job_saying_so(tiny_rope_dir):
    generate = PipelineGenerator(pipe=Pipeline.from_pretrained(tiny_rope_dir))
    params = dict(prompt="a cat", negative_prompt="", num_frames=9, height=32, width=48, num_inference_steps=1,
                  guidance_scale=6.0, seed=1, fps=8, lora=[["style", 1.0]])  # fmt: skip
    with pytest.raises(InputError, match=r"this worker serves no LoRA named 'style' \(start it with --lora "
                                         r"style=PATH, as the server\)"):  # fmt: skip
        generate(params, lambda done, total: None)


def test_lora_flags_are_checked_at_start(lora_paths, tmp_path):
    assert served_loras([f"style={lora_paths['style']}"]) == {"style": lora_paths["style"]}
    assert served_loras(["any=/not/here"], check_files=False) == {"any": "/not/here"}  # an API alone
    for values, message in [
        (["style"], "--lora style: give NAME=PATH"),
        ([f"a b={lora_paths['style']}"], "a name is 1-64 letters, digits"),
        ([f"s={lora_paths['style']}", f"s={lora_paths['motion']}"], "--lora s is given twice"),
        ([f"s={tmp_path / 'missing'}"], "missing"),
    ]:
        with pytest.raises(InputError, match=message):
            served_loras(values)

    def settings(*flags):
        return load_settings(build_parser().parse_args(["worker", "--device", "cpu", *flags]))

    with pytest.raises(InputError, match="--lora serves LoRAs chosen per video, which --quantize would fold"):
        settings("--lora", f"s={lora_paths['style']}", "--quantize", "int8")
    _, speed = settings("--lora", f"s={lora_paths['style']}", "--cache", "0.1")
    assert speed["fuse_qkv"] is False and speed["cache"] == 0.1
    assert isinstance(build_parser().parse_args(["serve"]), argparse.Namespace)

"""OpenAI's own Python client, pointed at our server by its base URL, creates, polls, lists, downloads and
deletes a video (a real HTTP server on loopback, the tiny model generating in-process)."""

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_helpers import serving, wait_until  # noqa: E402

from cogvideox.serve.app import Settings, create_app  # noqa: E402
from cogvideox.serve.jobs import SQLiteStore  # noqa: E402
from cogvideox.serve.spec import ModelSpec  # noqa: E402
from cogvideox.serve.worker import PipelineGenerator, Worker  # noqa: E402
from cogvideox.video import read_video  # noqa: E402

# The client marks its video methods deprecated (OpenAI's own service is going away); ours stays.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def base_url(tiny_rope_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("serve-openai")
    spec = ModelSpec.from_folder(tiny_rope_dir, "cogvideox-tiny")
    store = SQLiteStore(data / "jobs.sqlite3")
    worker = Worker(store, PipelineGenerator(str(tiny_rope_dir)), data, spec.name, poll_interval=0.05)
    app = create_app(spec, store, Settings(data_dir=data, api_keys=("sk-test",)), worker)
    with serving(app) as url:
        yield url + "/v1"
    store.close()


def test_openai_client_round_trip(base_url, tmp_path):
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
    video = client.videos.create(
        prompt="a panda plays a small guitar",
        model="cogvideox-tiny",
        size="64x64",
        seconds="1",
        extra_body={"num_inference_steps": 2, "seed": 11},
    )
    assert video.status == "queued" and video.size == "64x64" and video.seconds == "1.125"

    def done():
        current = client.videos.retrieve(video.id)
        return current if current.status in ("completed", "failed") else None

    video = wait_until(done, timeout=60, interval=0.05, what="the video")
    assert video.status == "completed" and video.progress == 100 and video.error is None
    assert video.model_extra["seed"] == 11  # our extension fields come through as extras

    path = tmp_path / "panda.mp4"
    client.videos.download_content(video.id).write_to_file(path)
    frames, fps = read_video(path)
    assert frames.shape == (9, 64, 64, 3) and fps == 8
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").read()
    assert thumbnail[:4] == b"RIFF" and thumbnail[8:12] == b"WEBP"
    assert client.videos.download_content(video.id, variant="spritesheet").read()[:3] == b"\xff\xd8\xff"  # JPEG

    remix = client.videos.remix(video.id, prompt="a panda plays a big drum")
    assert remix.status == "queued" and remix.remixed_from_video_id == video.id and remix.size == video.size

    assert video.id in [v.id for v in client.videos.list(limit=10).data]
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_openai_client_sees_our_errors(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.videos.create(prompt="a cat", size="1280x720")
    assert "size 1280x720 is not one of 64x64" in str(error.value)
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        client.videos.create(prompt="a cat", model="sora-2")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0).videos.list()


def test_openai_client_sends_a_first_frame_to_an_image_to_video_model(tiny_i2v_dir, tmp_path):
    """`input_reference` as the client sends it (a multipart form, our extras as its text fields): the video
    is the library's from the same picture."""
    import numpy as np
    from PIL import Image

    from cogvideox.pipeline import Pipeline
    from cogvideox.video import export_video

    Image.new("RGB", (64, 64), (30, 200, 60)).save(tmp_path / "green.png")
    spec = ModelSpec.from_folder(tiny_i2v_dir, "cogvideox-tiny-i2v")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    worker = Worker(store, PipelineGenerator(str(tiny_i2v_dir)), tmp_path, spec.name, poll_interval=0.05)
    with serving(create_app(spec, store, Settings(data_dir=tmp_path), worker)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with open(tmp_path / "green.png", "rb") as image:
            video = client.videos.create(
                prompt="a green field", input_reference=image, extra_body={"num_inference_steps": 2, "seed": 4}
            )
        assert video.model_extra["input_reference"] == "green.png" and video.model_extra["seed"] == 4

        def done():
            current = client.videos.retrieve(video.id)
            return current if current.status in ("completed", "failed") else None

        assert wait_until(done, timeout=60, interval=0.05, what="the video").status == "completed"
        client.videos.download_content(video.id).write_to_file(tmp_path / "field.mp4")
    store.close()
    pipe = Pipeline.from_pretrained(tiny_i2v_dir)
    direct = pipe("a green field", image=tmp_path / "green.png", seed=4, num_inference_steps=2, progress=False)
    expected, _ = read_video(export_video(direct.frames[0], tmp_path / "direct.mp4", fps=8))
    np.testing.assert_array_equal(read_video(tmp_path / "field.mp4")[0], expected)

"""Image-to-video through the service: OpenAI's `input_reference` file, checked and kept at the API, read by
the worker; the served video is the one the library makes from the same picture. And RIFLEx requests for
clips longer than the model was trained on."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from helpers import tiny_transformer_kwargs  # noqa: E402
from PIL import Image  # noqa: E402
from serve_helpers import CountingGenerator, in_process_service, wait_until, write_config_folder  # noqa: E402

from cogvideox.pipeline import Pipeline  # noqa: E402
from cogvideox.serve.app import Settings, create_app  # noqa: E402
from cogvideox.serve.jobs import SQLiteStore  # noqa: E402
from cogvideox.serve.spec import ModelSpec  # noqa: E402
from cogvideox.serve.worker import PipelineGenerator, Worker, video_path  # noqa: E402
from cogvideox.video import export_video, read_metadata, read_video  # noqa: E402

FAST = {"num_inference_steps": "2"}
I2V_CONFIG = tiny_transformer_kwargs("i2v")


def picture(width=80, height=48, fmt="PNG", orientation=None) -> bytes:
    """A picture with a gradient and a corner mark, so a turned or stretched copy differs."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    pixels[:8, :8] = (255, 255, 0)
    image, buffer = Image.fromarray(pixels), io.BytesIO()
    if orientation is None:
        image.save(buffer, format=fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation  # EXIF Orientation, as a phone writes it
        image.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


def finished(client, video_id):
    def done():
        video = client.get(f"/v1/videos/{video_id}").json()
        return video if video["status"] not in ("queued", "in_progress") else None

    return wait_until(done, timeout=60, what=f"{video_id} to finish")


def stored_inputs(data):
    folder = data / "inputs"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def i2v_service(tiny_i2v_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("serve-i2v")
    pipe = Pipeline.from_pretrained(tiny_i2v_dir)
    with in_process_service(tiny_i2v_dir, "tiny-i2v", data, pipe) as (client, _):
        yield client, pipe, data


def test_a_video_starts_from_the_uploaded_first_frame(i2v_service, tmp_path):
    """A phone's JPEG (turned by its EXIF flag), cropped to the video: the served video equals the library's
    from the same file; the record names the client's file, and deleting the video deletes the picture."""
    client, pipe, data = i2v_service
    card = client.get("/v1/models").json()["data"][0]
    assert (card["image_to_video"], card["riflex_max_seconds"]) == (True, None)

    jpeg = picture(fmt="JPEG", orientation=6)
    form = {"prompt": "a ball rolls", "seed": "3", "resize": "crop", **FAST}
    response = client.post("/v1/videos", data=form, files={"input_reference": ("phone.jpg", jpeg, "image/jpeg")})
    assert response.status_code == 200, response.text
    created = response.json()
    assert (created["input_reference"], created["resize"], created["size"]) == ("phone.jpg", "crop", "64x64")
    assert len(stored_inputs(data)) == 1
    video = finished(client, created["id"])
    assert video["status"] == "completed", video["error"]

    (tmp_path / "served.mp4").write_bytes(client.get(f"/v1/videos/{video['id']}/content").content)
    got, _ = read_video(tmp_path / "served.mp4")
    (tmp_path / "phone.jpg").write_bytes(jpeg)
    direct = pipe("a ball rolls", image=tmp_path / "phone.jpg", resize="crop", seed=3, num_inference_steps=2,
                  progress=False).frames[0]  # fmt: skip
    expected, _ = read_video(export_video(direct, tmp_path / "direct.mp4", fps=8))
    np.testing.assert_array_equal(got, expected)
    unturned = pipe("a ball rolls", image=Image.open(io.BytesIO(jpeg)), resize="crop", seed=3,
                    num_inference_steps=2, progress=False).frames[0]  # fmt: skip
    assert not np.array_equal(direct, unturned)  # the EXIF turn mattered, and was made
    record = read_metadata(tmp_path / "served.mp4")
    assert (record["image"], record["resize"], record["seed"]) == ("phone.jpg", "crop", 3)

    assert client.delete(f"/v1/videos/{video['id']}").json()["deleted"] is True
    assert stored_inputs(data) == [] and not video_path(data, video["id"]).exists()


def _i2v_client(tmp_path, generate=None, **settings):
    folder = write_config_folder(tmp_path / "model", **I2V_CONFIG)
    spec = ModelSpec.from_folder(folder, "tiny-i2v")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    worker = Worker(store, generate, tmp_path, spec.name, poll_interval=0.02) if generate else None
    return TestClient(create_app(spec, store, Settings(data_dir=tmp_path, **settings))), store, worker


PNG = picture()


def clip_bytes(frames=17, green=200) -> bytes:
    """An MP4 of `frames` frames at 8 fps, 48x32, a green that brightens."""
    import tempfile

    pixels = np.zeros((frames, 32, 48, 3), np.uint8)
    pixels[..., 1] = np.linspace(green // 2, green, frames, dtype=np.uint8)[:, None, None]
    with tempfile.TemporaryDirectory() as folder:
        return export_video(pixels, Path(folder) / "clip.mp4", fps=8).read_bytes()


VIDEO = clip_bytes()
NOISE = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(NOISE, format="PNG")

def png_header(width, height) -> bytes:
    """A PNG that says it is `width` x `height` (1 bit a pixel) and holds no pixels: what Pillow opens."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _with(field, value):
    return {"data": {"prompt": "a", field: value}, "files": {"input_reference": ("a.png", PNG, "image/png")}}


def _file(name, data, kind="image/png"):
    return {"files": {"input_reference": (name, data, kind)}}


MISTAKES = {
    "no picture": ({"data": {"prompt": "a"}}, 400, "input_reference", "send the picture as input_reference"),
    "the picture in JSON": (
        {"json": {"prompt": "a", "input_reference": "data:image/png;base64,AAAA"}}, 400, "input_reference",
        "send the file in a multipart/form-data request",
    ),
    "text, not a file": (
        {"data": {"prompt": "a", "input_reference": "photo.png"}}, 400, "input_reference", "send a file, not text"
    ),
    "not a picture": (_file("a.png", b"hello"), 400, "input_reference", "send the picture as input_reference"),
    "a video": (_file("a.mp4", VIDEO), 400, "input_reference", "send the picture as input_reference"),
    "strength": (_with("strength", "0.5"), 400, "strength", "strength applies to a video"),
    "an empty file": (_file("a.png", b""), 400, "input_reference", "the file is empty"),
    "a GIF": (_file("a.gif", picture(fmt="GIF"), "image/gif"), 400, "input_reference", "a GIF file; send a PNG"),
    "another file field": (
        {"files": {"input_reference": ("a.png", PNG, "image/png"), "mask": ("m.png", PNG, "image/png")}}, 400,
        "mask", "mask: only input_reference and last_frame take a file",
    ),
    "two pictures": (
        {"files": [("input_reference", ("a.png", PNG, "image/png")), ("input_reference", ("b.png", PNG, "image/png"))]},
        400, "input_reference", "send one file, not several",
    ),
    "too big a picture": (_file("a.png", NOISE.getvalue()), 413, "input_reference", "the file is over 20000 bytes"),
    "a picture over 40 megapixels": (_file("a.png", png_header(8000, 6000)), 400, "input_reference", "8000x6000 is "
                                     "over 40 megapixels"),
    "a picture over Pillow's limit": (_file("a.png", png_header(20000, 20000)), 400, "input_reference", "over 40 "
                                      "megapixels"),  # Pillow refuses to open it at all
    "another length": (_with("seconds", "2"), 400, "seconds", "makes 9 frames only"),
    "riflex": (_with("riflex", "true"), 400, "riflex", "leave riflex off"),
    "a bad resize": (_with("resize", "fit"), 400, "resize", "stretch"),
    "a last frame that is no picture": (
        {"files": {"input_reference": ("a.png", PNG, "image/png"), "last_frame": ("b.png", b"hello", "image/png")}},
        400, "last_frame", "last_frame: cannot decode the file as a picture",
    ),
    "a last frame without a first": (
        {"files": {"last_frame": ("b.png", PNG, "image/png")}}, 400, "input_reference", "send the picture",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", MISTAKES, ids=list(MISTAKES))
def test_mistakes_are_a_4xx_that_names_the_field_and_keep_nothing(tmp_path, case):
    client, store, _ = _i2v_client(tmp_path, max_upload_bytes=20_000)
    kwargs, status, param, message = MISTAKES[case]
    if "json" not in kwargs:
        kwargs = {**kwargs, "data": kwargs.get("data", {"prompt": "a"})}
    response = client.post("/v1/videos", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert str(tmp_path) not in error["message"]  # the server's folders are none of the client's business
    assert store.page()[0] == [] and stored_inputs(tmp_path) == []


def test_a_text_to_video_model_refuses_a_picture_and_an_image_model_refuses_remixes(tmp_path):
    folder = write_config_folder(tmp_path / "t2v")
    t2v = TestClient(create_app(ModelSpec.from_folder(folder, "tiny"), SQLiteStore(tmp_path / "a.sqlite3"),
                                Settings(data_dir=tmp_path / "a")))  # fmt: skip
    refused = t2v.post("/v1/videos", data={"prompt": "a"}, files={"input_reference": ("a.png", PNG, "image/png")})
    assert refused.status_code == 400
    assert "is a text-to-video model and takes no picture as input_reference" in refused.json()["error"]["message"]
    assert stored_inputs(tmp_path / "a") == []

    client, store, worker = _i2v_client(tmp_path / "b", CountingGenerator())
    files = {"input_reference": ("a.png", PNG, "image/png")}
    video = client.post("/v1/videos", data={"prompt": "a"}, files=files).json()
    assert worker.run_once()
    remix = client.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "b"})
    assert remix.status_code == 400 and "is an image-to-video model" in remix.json()["error"]["message"]


def test_a_queue_that_refuses_the_job_keeps_no_picture(tmp_path):
    client, store, _ = _i2v_client(tmp_path, max_active_per_key=1)
    files = {"input_reference": ("a.png", PNG, "image/png")}
    assert client.post("/v1/videos", data={"prompt": "a"}, files=files).status_code == 200
    full = client.post("/v1/videos", data={"prompt": "b"}, files=files)
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    assert len(stored_inputs(tmp_path)) == 1  # the first job's only


def test_a_job_whose_picture_is_gone_fails_saying_so(tmp_path):
    client, store, worker = _i2v_client(tmp_path, CountingGenerator())
    video = client.post("/v1/videos", data={"prompt": "a"}, files={"input_reference": ("a.png", PNG, "image/png")})
    for name in stored_inputs(tmp_path):
        (tmp_path / "inputs" / name).unlink()
    assert worker.run_once()
    failed = client.get(f"/v1/videos/{video.json()['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
    assert "first frame of this video is gone" in failed["error"]["message"]


# -----------------------------------------------------------------------------------------------------
# RIFLEx


def test_riflex_makes_a_longer_video_the_library_makes(tiny_rope_dir, tmp_path):
    """The tiny RoPE model, trained at 9 frames, asked for 17 (2 s at 8 fps): refused without riflex, with a
    hint; with it, the library's riflex video."""
    data = tmp_path / "data"
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    spec = ModelSpec.from_folder(tiny_rope_dir, "tiny")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    worker = Worker(store, PipelineGenerator(pipe=pipe), data, spec.name)
    client = TestClient(create_app(spec, store, Settings(data_dir=data)))
    assert client.get("/v1/models").json()["data"][0]["riflex_max_seconds"] == 17 / 8

    request = {"prompt": "a ball", "seconds": 2, "seed": 5, "num_inference_steps": 2}
    plain = client.post("/v1/videos", json=request)
    assert plain.status_code == 400 and "or up to 17 frames with riflex: true" in plain.json()["error"]["message"]
    created = client.post("/v1/videos", json=request | {"riflex": True}).json()
    assert (created["num_frames"], created["riflex"]) == (17, True)
    assert worker.run_once()
    assert client.get(f"/v1/videos/{created['id']}").json()["status"] == "completed"

    got, _ = read_video(video_path(data, created["id"]))
    direct = pipe("a ball", num_frames=17, seed=5, num_inference_steps=2, riflex=True, progress=False).frames[0]
    expected, _ = read_video(export_video(direct, tmp_path / "direct.mp4", fps=8))
    np.testing.assert_array_equal(got, expected)
    assert read_metadata(video_path(data, created["id"]))["riflex"] is True


def test_riflex_is_refused_without_rotary_positions(tmp_path):
    folder = write_config_folder(tmp_path / "2b", use_rotary_positional_embeddings=False)
    client = TestClient(create_app(ModelSpec.from_folder(folder, "tiny-2b"), SQLiteStore(tmp_path / "j.sqlite3"),
                                   Settings(data_dir=tmp_path)))  # fmt: skip
    assert client.get("/v1/models").json()["data"][0]["riflex_max_seconds"] is None
    refused = client.post("/v1/videos", json={"prompt": "a", "riflex": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "riflex"


# -----------------------------------------------------------------------------------------------------
# Video-to-video: a text-to-video model redraws a video sent as input_reference


def test_a_text_to_video_model_redraws_a_video_sent_as_input_reference(tiny_rope_dir, tmp_path):
    """The video is sampled at the request's frame rate from its start, cropped to the size, and redrawn
    over the last `strength` of the schedule: the library's video-to-video of the same file."""
    from cogvideox.conditioning import load_video

    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    data = tmp_path / "data"
    with in_process_service(tiny_rope_dir, "tiny", data, pipe) as (client, _):
        form = {"prompt": "a blue ball", "seed": "3", "strength": "0.5", "resize": "crop", "num_inference_steps": "4"}
        response = client.post("/v1/videos", data=form, files={"input_reference": ("clip.mp4", VIDEO, "video/mp4")})
        assert response.status_code == 200, response.text
        created = response.json()
        assert (created["input_reference"], created["strength"], created["resize"], created["num_frames"]) == (
            "clip.mp4", 0.5, "crop", 9,
        )  # fmt: skip
        video = finished(client, created["id"])
        assert video["status"] == "completed", video["error"]
        served = video_path(data, video["id"])
        got, _ = read_video(served)
        (tmp_path / "clip.mp4").write_bytes(VIDEO)
        frames = load_video(tmp_path / "clip.mp4", 9, 8)
        direct = pipe("a blue ball", video=frames, strength=0.5, resize="crop", seed=3, num_inference_steps=4,
                      progress=False).frames[0]  # fmt: skip
        expected, _ = read_video(export_video(direct, tmp_path / "direct.mp4", fps=8))
        np.testing.assert_array_equal(got, expected)
        plain = pipe("a blue ball", seed=3, num_inference_steps=4, progress=False).frames[0]
        assert not np.array_equal(direct, plain)  # it did start from the video
        record = read_metadata(served)
        assert (record["video"], record["video_fps"], record["strength"], record["resize"]) == ("clip.mp4", 8, 0.5, "crop")
        assert len(stored_inputs(data)) == 1
        assert client.delete(f"/v1/videos/{video['id']}").json()["deleted"] is True
        assert stored_inputs(data) == []


VIDEO_MISTAKES = {
    "not a video": ({"input_reference": ("a.mp4", b"hello", "video/mp4")}, {}, "input_reference",
                    "cannot decode the file as a picture or a video"),
    "too short a video": ({"input_reference": ("a.mp4", clip_bytes(frames=5), "video/mp4")}, {}, "seconds",
                          "video-to-video needs at least 9"),
    "more seconds than it has": ({"input_reference": ("a.mp4", clip_bytes(frames=5), "video/mp4")}, {"seconds": "1"},
                                 "seconds", "fewer than the 9 of 1 s"),
    "a strength that runs no step": ({"input_reference": ("a.mp4", VIDEO, "video/mp4")},
                                     {"strength": "0.01", "num_inference_steps": "2"}, "strength", "runs no step"),
    "strength without a video": ({}, {"strength": "0.5"}, "strength", "strength applies to a video"),
}  # fmt: skip


@pytest.mark.parametrize("case", VIDEO_MISTAKES, ids=list(VIDEO_MISTAKES))
def test_video_to_video_mistakes_keep_nothing(tmp_path, case):
    files, fields, param, message = VIDEO_MISTAKES[case]
    client, store = _t2v_client(tmp_path)
    response = client.post("/v1/videos", data={"prompt": "a", **fields}, files=files or None)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert str(tmp_path) not in error["message"]  # the server's folders are none of the client's business
    assert store.page()[0] == [] and stored_inputs(tmp_path) == []


def _t2v_client(tmp_path):
    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "model"), "tiny")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    return TestClient(create_app(spec, store, Settings(data_dir=tmp_path))), store


def test_a_video_over_4k_is_refused_before_its_frames_are_decoded(tmp_path, monkeypatch):
    """A few KB of black frames decode to gigabytes: the frame size is read from the header first."""
    from cogvideox.serve import inputs

    monkeypatch.setattr(inputs, "read_input_video", lambda *a: pytest.fail("decoded a video over 4K"))
    big = export_video(np.zeros((1, 2176, 3856, 3), np.uint8), tmp_path / "big.mp4", fps=8).read_bytes()
    client, store = _t2v_client(tmp_path / "data")
    response = client.post("/v1/videos", data={"prompt": "a"}, files={"input_reference": ("big.mp4", big, "video/mp4")})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "input_reference" and "its frames are 3856x2176, over 4K" in error["message"]
    assert store.page()[0] == [] and stored_inputs(tmp_path / "data") == []


def test_a_last_frame_draws_the_video_towards_it(i2v_service, tmp_path):
    """`last_frame` beside `input_reference` (keyframe interpolation): the served video equals the library's
    with the same two pictures; the record and the API name both files, and deleting the video deletes both."""
    client, pipe, data = i2v_service
    last = picture(orientation=3)  # the same picture, turned upside down by its EXIF flag
    files = {"input_reference": ("first.png", PNG, "image/png"), "last_frame": ("last.jpg", last, "image/png")}
    created = client.post("/v1/videos", data={"prompt": "a ball rolls", "seed": "4", **FAST}, files=files).json()
    assert (created["input_reference"], created["last_frame"]) == ("first.png", "last.jpg")
    assert len(stored_inputs(data)) == 2
    video = finished(client, created["id"])
    assert video["status"] == "completed", video["error"]
    (tmp_path / "served.mp4").write_bytes(client.get(f"/v1/videos/{video['id']}/content").content)
    (tmp_path / "first.png").write_bytes(PNG)
    (tmp_path / "last.jpg").write_bytes(last)
    direct = pipe("a ball rolls", image=tmp_path / "first.png", last_image=tmp_path / "last.jpg", seed=4,
                  num_inference_steps=2, progress=False).frames[0]  # fmt: skip
    expected, _ = read_video(export_video(direct, tmp_path / "direct.mp4", fps=8))
    np.testing.assert_array_equal(read_video(tmp_path / "served.mp4")[0], expected)
    alone = pipe("a ball rolls", image=tmp_path / "first.png", seed=4, num_inference_steps=2, progress=False)
    assert not np.array_equal(alone.frames[0], direct)
    record = read_metadata(tmp_path / "served.mp4")
    assert (record["image"], record["last_image"]) == ("first.png", "last.jpg")
    assert client.delete(f"/v1/videos/{video['id']}").json()["deleted"] is True
    assert stored_inputs(data) == []


def test_a_last_frame_needs_an_image_to_video_model(tmp_path):
    folder = write_config_folder(tmp_path / "t2v")
    t2v = TestClient(create_app(ModelSpec.from_folder(folder, "tiny"), SQLiteStore(tmp_path / "a.sqlite3"),
                                Settings(data_dir=tmp_path / "a")))  # fmt: skip
    for files in ({"last_frame": ("b.png", PNG, "image/png")},
                  {"input_reference": ("clip.mp4", VIDEO, "video/mp4"), "last_frame": ("b.png", PNG, "image/png")}):
        refused = t2v.post("/v1/videos", data={"prompt": "a"}, files=files)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "last_frame" and "goes with the first frame (input_reference) of an image-to-video" \
            in error["message"]
    assert stored_inputs(tmp_path / "a") == []

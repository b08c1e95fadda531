"""The HTTP API end to end on the tiny model: every endpoint, every bad input, keys and limits, metrics and
the OpenAPI schema. The in-process worker runs the real Pipeline; the video it serves is checked against a
direct Pipeline call with the same parameters."""

import io
import json
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from serve_helpers import (  # noqa: E402
    BlockingGenerator,
    CountingGenerator,
    in_process_service,
    wait_until,
    write_config_folder,
)

from cogvideox.errors import InputError  # noqa: E402
from cogvideox.pipeline import Pipeline  # noqa: E402
from cogvideox.serve.app import Settings, create_app  # noqa: E402
from cogvideox.serve.jobs import SQLiteStore  # noqa: E402
from cogvideox.serve.spec import ModelSpec  # noqa: E402
from cogvideox.serve.worker import Worker, video_path  # noqa: E402
from cogvideox.video import export_video, read_metadata, read_video  # noqa: E402

FAST = {"num_inference_steps": 2}
JSON = {"content-type": "application/json"}


def finished(client, video_id, headers=None, timeout=30.0):
    def done():
        video = client.get(f"/v1/videos/{video_id}", headers=headers).json()
        return video if video["status"] not in ("queued", "in_progress") else None

    return wait_until(done, timeout=timeout, what=f"{video_id} to finish")


@pytest.fixture(scope="module")
def pipe(tiny_rope_dir):
    return Pipeline.from_pretrained(tiny_rope_dir)


@pytest.fixture(scope="module")
def service(tiny_rope_dir, pipe, tmp_path_factory):
    """The tiny model served with its worker in-process, as `cogvideox serve` runs it."""
    data = tmp_path_factory.mktemp("serve-api")
    with in_process_service(tiny_rope_dir, "tiny", data, pipe, extra_sizes=("32x32",)) as (client, store):
        yield client, store, data


def make_client(tmp_path, generate=None, **settings):
    """An app on a config-only model folder; with `generate`, a worker using it (not started)."""
    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "model"), "tiny")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    worker = Worker(store, generate, tmp_path, spec.name, poll_interval=0.02) if generate else None
    app = create_app(spec, store, Settings(data_dir=tmp_path, **settings))
    return TestClient(app), store, worker


# -----------------------------------------------------------------------------------------------------
# The happy path


def test_a_video_is_created_polled_downloaded_and_deleted(service, pipe, tmp_path):
    client, store, data = service
    request = {
        "prompt": "a cat sits on the mat",
        "negative_prompt": "the sun",
        "seed": 7,
        "guidance_scale": 5.0,
        **FAST,
    }
    response = client.post("/v1/videos", json=request)
    assert response.status_code == 200
    created = response.json()
    assert created["object"] == "video" and created["status"] == "queued" and created["model"] == "tiny"
    assert (created["size"], created["seconds"], created["num_frames"], created["fps"]) == ("64x64", "1.125", 9, 8)

    video = finished(client, created["id"])
    assert video["status"] == "completed" and video["progress"] == 100 and video["error"] is None
    assert set(video["timings"]) == {"text", "denoise", "decode", "write"}
    assert video["completed_at"] >= video["created_at"]

    content = client.get(f"/v1/videos/{video['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    (tmp_path / "served.mp4").write_bytes(content.content)
    frames, fps = read_video(tmp_path / "served.mp4")
    assert frames.shape == (9, 64, 64, 3) and fps == 8

    # The same request straight through the library gives the same video: the service adds nothing.
    direct = pipe(
        "a cat sits on the mat", negative_prompt="the sun", seed=7, guidance_scale=5.0, progress=False, **FAST
    ).frames[0]
    expected, _ = read_video(export_video(direct, tmp_path / "direct.mp4", fps=8))
    np.testing.assert_array_equal(frames, expected)
    # The MP4 keeps how it was made, as generate's do (`cogvideox info`).
    record = read_metadata(tmp_path / "served.mp4")
    assert (record["prompt"], record["seed"], record["negative_prompt"], record["guidance"]) == (
        "a cat sits on the mat", 7, "the sun", 5.0
    )
    assert (record["frames"], record["height"], record["width"], record["fps"], record["model"]) == (9, 64, 64, 8, None)

    deleted = client.delete(f"/v1/videos/{video['id']}")
    assert deleted.json() == {"id": video["id"], "object": "video.deleted", "deleted": True, "status": "deleted"}
    assert not video_path(data, video["id"]).exists()
    assert client.get(f"/v1/videos/{video['id']}").status_code == 404
    assert client.delete(f"/v1/videos/{video['id']}").status_code == 404


def test_a_remix_redraws_the_video_for_a_new_prompt(service, pipe, tmp_path):
    """OpenAI's remix, as video-to-video: the completed video's frames, its size, length, frame rate and
    (by default) seed, the last `strength` of the schedule; the same video the library makes from them."""
    client, _, data = service
    source = finished(client, client.post("/v1/videos", json={"prompt": "a red ball", "seed": 9, **FAST}).json()["id"])
    response = client.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "a blue ball", "strength": 0.5})
    assert response.status_code == 200
    remix = response.json()
    assert remix["status"] == "queued" and remix["remixed_from_video_id"] == source["id"] and remix["strength"] == 0.5
    assert (remix["size"], remix["seconds"], remix["fps"], remix["seed"]) == (
        source["size"], source["seconds"], source["fps"], 9,
    )  # fmt: skip
    remix = finished(client, remix["id"])
    assert remix["status"] == "completed", remix["error"]

    (tmp_path / "remix.mp4").write_bytes(client.get(f"/v1/videos/{remix['id']}/content").content)
    got, _ = read_video(tmp_path / "remix.mp4")
    frames, _ = read_video(video_path(data, source["id"]))  # what the worker redrew: the MP4's frames
    direct = pipe("a blue ball", video=frames, strength=0.5, seed=9, progress=False, **FAST).frames[0]
    expected, _ = read_video(export_video(direct, tmp_path / "direct.mp4", fps=8))
    np.testing.assert_array_equal(got, expected)
    record = read_metadata(tmp_path / "remix.mp4")
    assert (record["prompt"], record["remix_of"], record["strength"]) == ("a blue ball", source["id"], 0.5)
    plain = pipe("a blue ball", seed=9, progress=False, **FAST).frames[0]
    assert not np.array_equal(direct, plain)  # it did start from the video


def test_remix_mistakes(tmp_path):
    client, store, worker = make_client(tmp_path, CountingGenerator())
    queued = client.post("/v1/videos", json={"prompt": "a cat"}).json()["id"]
    url = f"/v1/videos/{queued}/remix"
    response = client.post(url, json={"prompt": "a dog"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "video_not_ready"
    assert worker.run_once()
    unknown = client.post("/v1/videos/video_" + "0" * 32 + "/remix", json={"prompt": "a dog"})
    assert unknown.status_code == 404
    for body, message in (
        ({"prompt": " "}, "is blank"),
        ({"prompt": "a dog", "strength": 0}, "strength"),
        ({"prompt": "a dog", "strength": 0.01, "num_inference_steps": 2}, "runs no step"),
        ({"prompt": "a dog", "size": "64x64"}, "size"),  # the remix keeps the video's size
    ):
        error = client.post(url, json=body)
        assert error.status_code == 400 and message in error.json()["error"]["message"], (body, error.json())
    assert [j.id for j in store.page(10, None)[0]] == [queued]  # none of them queued anything

    # The source deleted before its remix ran: the remix fails, saying so.
    remix = client.post(url, json={"prompt": "a green cat"}).json()["id"]
    assert client.delete(f"/v1/videos/{queued}").json()["deleted"] is True
    assert worker.run_once()
    failed = client.get(f"/v1/videos/{remix}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
    assert failed["error"]["message"] == f"video {queued}, which this remix redraws, was deleted before the remix ran"


def test_content_honours_range_requests(service):
    client, _, _ = service
    video = finished(
        client, client.post("/v1/videos", json={"prompt": "a dog runs", "size": "32x32", **FAST}).json()["id"]
    )
    url = f"/v1/videos/{video['id']}/content"
    whole = client.get(url).content
    size = len(whole)
    assert video["size"] == "32x32"

    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.headers["content-range"] == f"bytes 100-199/{size}"
    assert part.content == whole[100:200]
    tail = client.get(url, headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == whole[-50:]
    assert client.get(url, headers={"Range": f"bytes={size}-"}).status_code == 416


def _few_colour_clip(params, on_step):
    """A 9-frame 32x48 clip of three colours with a square moving right: every format keeps it exactly
    (or, lossy, closely)."""
    from cogvideox.serve.worker import Generated

    on_step(1, 1)
    frames = np.zeros((9, 32, 48, 3), np.uint8)
    frames[:] = (30, 60, 120)
    for i in range(9):
        frames[i, 8:20, 2 + 4 * i : 14 + 4 * i] = (250, 200, 0)
    return Generated(frames, {"denoise": 0.0})


def test_content_variants_are_made_from_the_mp4_once_and_deleted_with_it(tmp_path):
    """OpenAI's `variant`: thumbnail (WebP of the first frame) and spritesheet (JPEG grid); ours: gif."""
    from PIL import Image

    from cogvideox.serve import assets

    client, _, worker = make_client(tmp_path, _few_colour_clip)
    video_id = client.post("/v1/videos", json={"prompt": "a square", "fps": 12}).json()["id"]
    assert worker.run_once()
    url = f"/v1/videos/{video_id}/content"
    (tmp_path / "served.mp4").write_bytes(client.get(url, params={"variant": "video"}).content)
    frames, _ = read_video(tmp_path / "served.mp4")

    thumbnail = client.get(url, params={"variant": "thumbnail"})
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/webp"
    picture = np.asarray(Image.open(io.BytesIO(thumbnail.content)).convert("RGB")).astype(int)
    assert picture.shape == (32, 48, 3) and np.abs(picture - frames[0]).mean() < 3

    sheet = client.get(url, params={"variant": "spritesheet"})
    assert sheet.status_code == 200 and sheet.headers["content-type"] == "image/jpeg"
    grid = np.asarray(Image.open(io.BytesIO(sheet.content)).convert("RGB")).astype(int)
    assert grid.shape == (3 * 32, 3 * 48, 3)  # nine frames, 3 x 3, each at its own size (under 160 wide)
    assert np.abs(grid[32:64, 48:96] - frames[4]).mean() < 4  # the fifth frame: row 1, column 1

    gif = client.get(url, params={"variant": "gif"})
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    with Image.open(io.BytesIO(gif.content)) as animation:
        assert animation.n_frames == 9 and animation.info["duration"] in (80, 90)  # 12 fps
    (tmp_path / "served.gif").write_bytes(gif.content)
    assert np.abs(read_video(tmp_path / "served.gif")[0].astype(int) - frames).max() <= 2

    # Made once: the second request is the same file (same ETag), not a new one.
    video = video_path(tmp_path, video_id)
    made = {variant: assets.asset_path(video, variant).stat().st_mtime_ns for variant in ("thumbnail", "gif")}
    again = client.get(url, params={"variant": "gif"})
    assert again.headers["etag"] == gif.headers["etag"]
    assert made == {v: assets.asset_path(video, v).stat().st_mtime_ns for v in ("thumbnail", "gif")}

    wrong = client.get(url, params={"variant": "poster"})
    assert wrong.status_code == 400 and "variant" in wrong.json()["error"]["message"]

    assert client.delete(f"/v1/videos/{video_id}").json()["deleted"] is True
    assert sorted(p.name for p in video.parent.iterdir()) == []  # the MP4 and everything made from it


def test_a_variant_the_server_cannot_write_is_its_failure_not_a_video_gone(tmp_path, monkeypatch):
    from cogvideox.serve import assets

    client, _, worker = make_client(tmp_path, CountingGenerator())
    video_id = client.post("/v1/videos", json={"prompt": "a square"}).json()["id"]
    assert worker.run_once()

    def read_only(picture, path, options):  # as `write_into_place` says it on a read-only data folder
        raise InputError(f"cannot write {path}: Read-only file system")

    monkeypatch.setattr(assets, "_save_image", read_only)
    url = f"/v1/videos/{video_id}/content"
    response = client.get(url, params={"variant": "thumbnail"})
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "internal_error" and "could not make the thumbnail" in error["message"]
    assert str(tmp_path) not in error["message"]
    assert client.get(url).status_code == 200  # the video itself is there all along


def test_spritesheet_fills_rows_and_scales_wide_frames():
    from cogvideox.serve.assets import spritesheet

    frames = np.stack([np.full((20, 10, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    sheet = spritesheet(frames)
    assert sheet.shape == (2 * 20, 3 * 10, 3)  # ceil(sqrt(5)) = 3 columns, 2 rows
    assert sheet[25, 15, 0] == 50 and sheet[25, 25].max() == 0  # frame 5 in row 1, then a black cell
    wide = spritesheet(np.zeros((4, 90, 320, 3), np.uint8), width=160)
    assert wide.shape == (2 * 45, 2 * 160, 3)


def test_bad_ranges_are_ignored_or_a_416_in_the_error_shape(tmp_path):
    """RFC 9110: a Range that is not a valid bytes range is ignored (the whole file, 200); one that lies past
    the end is a 416 with Content-Range: bytes */SIZE, in the JSON error shape like every other error."""
    client, store, worker = make_client(tmp_path, CountingGenerator())
    video_id = client.post("/v1/videos", json={"prompt": "a cat"}).json()["id"]
    assert worker.run_once()
    url = f"/v1/videos/{video_id}/content"
    whole = client.get(url)
    size, etag = len(whole.content), whole.headers["etag"]

    for ignored in ("bytes=abc", "bytes=9-3", "bytes=5", "items=0-5", "bytes=", "bytes=" + "9" * 30 + "-",
                    "bytes=" + ",".join(["0-1"] * 101)):  # fmt: skip
        response = client.get(url, headers={"Range": ignored})
        assert response.status_code == 200 and response.content == whole.content, ignored
    for unsatisfiable in (f"bytes={size}-", f"bytes={size}-{size + 10}", "bytes=-0", f"bytes={size}-,{size + 5}-"):
        response = client.get(url, headers={"Range": unsatisfiable})
        assert response.status_code == 416, unsatisfiable
        assert response.headers["content-range"] == f"bytes */{size}"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "range_not_satisfiable")
    # Of several ranges, the satisfiable ones are served.
    part = client.get(url, headers={"Range": f"bytes=0-9,{size}-"})
    assert part.status_code == 206 and part.headers["content-range"] == f"bytes 0-9/{size}"
    assert part.content == whole.content[:10]
    # If-Range naming another version of the file: the whole (current) file.
    assert client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'}).status_code == 200
    assert client.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}).status_code == 206
    # A client that has this version gets a 304; HEAD gives the headers of the whole file, no body.
    for match in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        cached = client.get(url, headers={"If-None-Match": match})
        assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == etag, match
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    head = client.head(url)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == size
    assert head.headers["content-type"] == "video/mp4"
    store.close()


def test_forms_are_read_like_json(service):
    """OpenAI's client posts multipart/form-data; HTML forms post urlencoded."""
    client, _, _ = service
    multipart = client.post("/v1/videos", data={"prompt": "a red sun", "seconds": "1", "seed": "3", **FAST}, files={})
    urlencoded = client.post(
        "/v1/videos",
        content=b"prompt=a+bird+flies&num_inference_steps=2&guidance_scale=1.5",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    for response in (multipart, urlencoded):
        assert response.status_code == 200, response.text
        assert finished(client, response.json()["id"])["status"] == "completed"
    assert multipart.json()["seed"] == 3 and urlencoded.json()["guidance_scale"] == 1.5


def _multipart(*parts: tuple[str, str], close: bool = True) -> tuple[bytes, dict]:
    """A multipart/form-data body of text fields as given (a name may come twice), and its headers."""
    body = "".join(f'--B0undary\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n' for n, v in parts)
    return (body + ("--B0undary--\r\n" if close else "")).encode(), {
        "content-type": "multipart/form-data; boundary=B0undary"}


def test_a_field_given_twice_is_refused_naming_it_in_json_and_in_forms(tmp_path):
    """Neither the first nor the last value silently: the client meant one of them, and says which."""
    client, _, _ = make_client(tmp_path)
    body, headers = _multipart(("prompt", "a cat"), ("seed", "3"), ("seed", "4"))
    sent = [
        (body, headers),
        (b"prompt=a+cat&seed=3&seed=4", {"content-type": "application/x-www-form-urlencoded"}),
        (b'{"prompt": "a cat", "seed": 3, "seed": 4}', JSON),
    ]
    for content, headers in sent:
        response = client.post("/v1/videos", content=content, headers=headers)
        assert response.status_code == 400, (headers, response.text)
        error = response.json()["error"]
        assert (error["code"], error["param"], error["message"]) == (
            "invalid_request", "seed", "seed: given twice; send each field once"), headers
    assert client.get("/v1/videos").json()["data"] == []
    body, headers = _multipart(("prompt", "a cat"), ("seed", "3"))
    assert client.post("/v1/videos", content=body, headers=headers).json()["seed"] == 3  # once is fine


def test_a_form_cut_short_is_called_so(tmp_path):
    """A multipart body without its closing boundary lost its end: its last field (here the seed) or all
    of them; it is refused as such, not run without the seed, nor answered "prompt required"."""
    client, _, _ = make_client(tmp_path)
    whole_fields, headers = _multipart(("prompt", "a cat"), ("seed", "3"), close=False)
    cut_in_a_field = whole_fields[: whole_fields.index(b"a cat") + 3]
    for body in (whole_fields, cut_in_a_field):
        response = client.post("/v1/videos", content=body, headers=headers)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["message"]) == (
            "invalid_form", "the form is cut short: it lacks its closing boundary; send it whole")
    assert client.get("/v1/videos").json()["data"] == []


def test_a_request_without_guidance_takes_the_models(tmp_path):
    """The released models' 6 when the folder recommends nothing; its sampling.json's scale when it does."""
    client, store, _ = make_client(tmp_path / "plain")
    assert client.post("/v1/videos", json={"prompt": "a cat"}).json()["guidance_scale"] == 6.0
    store.close()
    folder = write_config_folder(tmp_path / "model")
    (folder / "sampling.json").write_text(json.dumps({"guidance_scale": 2.5}))
    spec = ModelSpec.from_folder(folder, "tiny")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    client = TestClient(create_app(spec, store, Settings(data_dir=tmp_path)))
    assert client.post("/v1/videos", json={"prompt": "a cat"}).json()["guidance_scale"] == 2.5
    assert client.post("/v1/videos", json={"prompt": "a cat", "guidance_scale": 7}).json()["guidance_scale"] == 7.0
    store.close()


def test_list_is_newest_first_and_paginated(service):
    client, _, _ = service
    ids = [client.post("/v1/videos", json={"prompt": f"a cat {i}", **FAST}).json()["id"] for i in range(3)]
    first = client.get("/v1/videos", params={"limit": 2}).json()
    assert first["object"] == "list" and [v["id"] for v in first["data"]] == ids[:0:-1]
    assert first["has_more"] and first["first_id"] == ids[2] and first["last_id"] == ids[1]
    second = client.get("/v1/videos", params={"limit": 1, "after": first["last_id"]}).json()
    assert [v["id"] for v in second["data"]] == [ids[0]]
    oldest_first = client.get("/v1/videos", params={"limit": 100, "order": "asc"}).json()["data"]
    assert [v["id"] for v in oldest_first][-3:] == ids
    for video_id in ids:
        finished(client, video_id)


def test_models_health_and_page(service):
    client, _, _ = service
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "tiny" and card["sizes"] == ["64x64", "32x32"] and card["max_seconds"] == 1.125
    assert card["guidance_scale"] == 6.0
    assert client.get("/healthz").json() == {"status": "ok", "model": "tiny", "worker": "ready"}
    docs = client.get("/docs")  # an open server: Swagger UI can fetch the schema
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text and "/static/app.js" in page.text
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200


# -----------------------------------------------------------------------------------------------------
# Bad input: a clear 4xx with a JSON error, and nothing queued


def _form_with_file():
    return {"data": {"prompt": "a cat"}, "files": {"input_reference": ("ref.png", io.BytesIO(b"\x89PNG"), "image/png")}}


BAD_REQUESTS = {
    "missing prompt": ({"json": {}}, 400, "prompt"),
    "empty prompt": ({"json": {"prompt": ""}}, 400, "prompt"),
    "blank prompt": ({"json": {"prompt": "  \n "}}, 400, "prompt"),
    "prompt too long": ({"json": {"prompt": "a" * 2001}}, 400, "prompt"),
    "prompt not text": ({"json": {"prompt": ["a", "b"]}}, 400, "prompt"),
    "unknown model": ({"json": {"prompt": "a", "model": "sora-2"}}, 400, "model"),
    "unknown size": ({"json": {"prompt": "a", "size": "1280x720"}}, 400, "size"),
    "malformed size": ({"json": {"prompt": "a", "size": "large"}}, 400, "size"),
    "too long a clip": ({"json": {"prompt": "a", "seconds": "12"}}, 400, "seconds"),
    "seconds beyond any float's frames": ({"json": {"prompt": "a", "seconds": "1e308"}}, 400, "seconds"),
    "seconds not a number": ({"json": {"prompt": "a", "seconds": "four"}}, 400, "seconds"),
    "negative seconds": ({"json": {"prompt": "a", "seconds": -1}}, 400, "seconds"),
    "zero steps": ({"json": {"prompt": "a", "num_inference_steps": 0}}, 400, "num_inference_steps"),
    "steps over the server's cap": ({"json": {"prompt": "a", "num_inference_steps": 101}}, 400, "num_inference_steps"),
    "steps not a number": ({"json": {"prompt": "a", "num_inference_steps": "many"}}, 400, "num_inference_steps"),
    "steps as a JSON string": ({"json": {"prompt": "a", "num_inference_steps": "3"}}, 400, "num_inference_steps"),
    "steps as a JSON bool": ({"json": {"prompt": "a", "num_inference_steps": True}}, 400, "num_inference_steps"),
    "steps as a fraction": ({"json": {"prompt": "a", "num_inference_steps": 2.5}}, 400, "num_inference_steps"),
    "seed as a JSON string": ({"json": {"prompt": "a", "seed": "3"}}, 400, "seed"),
    "guidance as a JSON string": ({"json": {"prompt": "a", "guidance_scale": "1.5"}}, 400, "guidance_scale"),
    "guidance as a JSON bool": ({"json": {"prompt": "a", "guidance_scale": False}}, 400, "guidance_scale"),
    "fps as a JSON bool": ({"json": {"prompt": "a", "fps": True}}, 400, "fps"),
    "seconds as a JSON bool": ({"json": {"prompt": "a", "seconds": True}}, 400, "seconds"),
    "enhance_prompt as a JSON string": ({"json": {"prompt": "a", "enhance_prompt": "no"}}, 400, "enhance_prompt"),
    "a JSON number Python will not convert": ({"content": b'{"prompt": "a", "seed": ' + b"1" * 5000 + b"}"}, 400, None),
    "negative guidance": ({"json": {"prompt": "a", "guidance_scale": -1}}, 400, "guidance_scale"),
    "guidance too high": ({"json": {"prompt": "a", "guidance_scale": 51}}, 400, "guidance_scale"),
    "guidance NaN": ({"content": b'{"prompt": "a", "guidance_scale": NaN}'}, 400, "guidance_scale"),
    "negative seed": ({"json": {"prompt": "a", "seed": -1}}, 400, "seed"),
    "seed too big": ({"json": {"prompt": "a", "seed": 2**32}}, 400, "seed"),
    "zero fps": ({"json": {"prompt": "a", "fps": 0}}, 400, "fps"),
    "fps below one": ({"json": {"prompt": "a", "fps": 0.001}}, 400, "fps"),  # a GIF cannot play it
    "unknown field": ({"json": {"prompt": "a", "steps": 3}}, 400, "steps"),
    "not JSON": ({"content": b'{"prompt": "a"'}, 400, None),
    "JSON nested too deeply": ({"content": b"[" * 5000}, 400, None),
    "a field nested too deeply": ({"content": b'{"prompt": "a", "x": ' + b"[" * 5000}, 400, None),
    "JSON but not an object": ({"content": b'["a cat"]'}, 400, None),
    "empty body": ({"content": b""}, 400, None),
    "oversized body": ({"json": {"prompt": "a", "negative_prompt": "b" * 70_000}}, 413, None),
    "unsupported content type": ({"content": b"a cat", "headers": {"content-type": "text/plain"}}, 415, None),
    "a file upload": (_form_with_file(), 400, "input_reference"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx_and_never_reach_the_queue(tmp_path, case):
    client, store, _ = make_client(tmp_path, max_steps=100)
    kwargs, status, param = BAD_REQUESTS[case]
    if "content" in kwargs:
        kwargs = {"headers": {"content-type": "application/json"}, **kwargs}
    response = client.post("/v1/videos", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["code"]
    assert error["param"] == param
    assert store.page()[0] == []


def test_a_client_gone_mid_body_is_answered_not_raised_to_the_server(tmp_path):
    """A cancelled upload: the app answers (to nobody) rather than raise, which the server logs as a bug."""
    import asyncio

    client, store, _ = make_client(tmp_path)
    part = {"type": "http.request", "body": b'{"prompt": "a', "more_body": True}
    messages = iter([part, {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", b"500")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/videos", "raw_path": b"/v1/videos", "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}  # fmt: skip
    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["status"] == 400 and b"client_disconnected" in sent[1]["body"]
    assert store.page()[0] == []


def test_a_request_without_steps_gets_the_models_default_capped_at_max_steps(tmp_path):
    """OpenAI's client never sends num_inference_steps: under a --max-steps below the model's 50 its requests
    are still taken (at the cap), and an error names a field the client did send."""
    client, store, _ = make_client(tmp_path / "capped", max_steps=20)
    created = client.post("/v1/videos", json={"prompt": "a"})
    assert created.status_code == 200, created.text
    assert created.json()["num_inference_steps"] == 20
    assert client.get("/v1/models").json()["data"][0]["num_inference_steps"] == 20
    too_long = client.post("/v1/videos", json={"prompt": "a", "seconds": "100"})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "seconds"
    assert "at most 9 frames" in too_long.json()["error"]["message"]
    too_many = client.post("/v1/videos", json={"prompt": "a", "num_inference_steps": 21})
    assert too_many.status_code == 400 and too_many.json()["error"] == {
        "message": "num_inference_steps: at most 20",
        "type": "invalid_request_error",
        "code": "invalid_request",
        "param": "num_inference_steps",
    }
    assert client.post("/v1/videos", json={"prompt": "a", "num_inference_steps": 20}).status_code == 200
    store.close()

    roomy, store, _ = make_client(tmp_path / "roomy", max_steps=100)
    assert roomy.post("/v1/videos", json={"prompt": "a"}).json()["num_inference_steps"] == 50  # the model's
    assert roomy.get("/v1/models").json()["data"][0]["num_inference_steps"] == 50
    store.close()


def test_json_python_will_not_parse_is_a_400_that_says_why(tmp_path):
    """Deep nesting exhausts the parser's recursion, a 5000-digit number Python's int limit: 400s, not 500s."""
    client, store, _ = make_client(tmp_path)
    for body, why in (
        (b"[" * 5000, "nested too deeply"),
        (b'{"prompt": "a", "x": ' + b'{"y": ' * 5000, "nested too deeply"),
        (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", "a number with too many digits"),
    ):
        response = client.post("/v1/videos", content=body, headers=JSON)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_json", None)
        assert why in error["message"]
    assert store.page()[0] == []


@pytest.mark.parametrize(
    "body",
    [b'{"prompt": "a", "guidance_scale": NaN}', b'{"prompt": "a", "guidance_scale": 1e400}',
     b'{"prompt": "a", "guidance_scale": -Infinity}', b'{"prompt": "a", "guidance_scale": 1' + b"0" * 400 + b"}"],
    ids=["NaN", "1e400", "-Infinity", "10**400"],
)  # fmt: skip
def test_non_finite_guidance_is_called_not_finite(tmp_path, body):
    client, _, _ = make_client(tmp_path)
    response = client.post("/v1/videos", content=body, headers=JSON)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "guidance_scale: must be a finite number from 0 to 50"
    assert response.json()["error"]["param"] == "guidance_scale"


def test_non_finite_fps_and_form_values_are_called_not_finite(tmp_path):
    client, _, _ = make_client(tmp_path)
    fps = client.post("/v1/videos", content=b'{"prompt": "a", "fps": NaN}', headers=JSON).json()["error"]
    assert (fps["param"], fps["message"]) == ("fps", "fps: must be a finite number from 1 to 120")
    form = client.post("/v1/videos", data={"prompt": "a", "guidance_scale": "nan"}).json()["error"]
    assert form["message"] == "guidance_scale: must be a finite number from 0 to 50"


def test_json_numbers_are_strict_but_forms_and_openais_string_fields_are_converted(tmp_path):
    """JSON says what type a value is, so `true` or "3" for a number is refused (BAD_REQUESTS); a form's
    values are all text and are read as numbers; OpenAI's `seconds` is a string in its own API."""
    client, _, _ = make_client(tmp_path)
    form = client.post(
        "/v1/videos",
        data={"prompt": "a", "num_inference_steps": "3", "seed": "4", "guidance_scale": "1.5",
              "fps": "8", "seconds": "1", "enhance_prompt": "false"},
    )  # fmt: skip
    assert form.status_code == 200, form.text
    video = form.json()
    assert (video["num_inference_steps"], video["seed"], video["guidance_scale"], video["fps"]) == (3, 4, 1.5, 8)
    for seconds in ("1", 1, 1.0):
        answer = client.post("/v1/videos", json={"prompt": "a", "seconds": seconds, "guidance_scale": 7})
        assert answer.status_code == 200 and answer.json()["seconds"] == "1.125", answer.text
        assert answer.json()["guidance_scale"] == 7.0  # a JSON integer is a number


def test_a_json_number_without_a_fraction_is_an_integer(tmp_path):
    """The schema's `integer` is JSON Schema's, which 7.0 and 1e1 satisfy (JavaScript writes every number
    alike); strict checking still refuses 2.5 (BAD_REQUESTS), and a remix reads them the same way."""
    client, store, worker = make_client(tmp_path, generate=CountingGenerator())
    body = b'{"prompt": "a", "seed": 7.0, "num_inference_steps": 1e1}'
    answer = client.post("/v1/videos", content=body, headers=JSON)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["seed"], answer.json()["num_inference_steps"]) == (7, 10)
    assert isinstance(store.get(answer.json()["id"]).params["seed"], int)
    worker.start()
    try:
        finished(client, answer.json()["id"])
    finally:
        worker.stop()
    remix = client.post(f"/v1/videos/{answer.json()['id']}/remix", json={"prompt": "b", "seed": 8.0})
    assert remix.status_code == 200 and remix.json()["seed"] == 8, remix.text


def test_a_wrong_method_is_a_client_error(tmp_path):
    client, _, _ = make_client(tmp_path)
    for method, path in (("PUT", "/v1/videos"), ("PATCH", "/v1/videos/video_" + "0" * 24), ("POST", "/v1/models")):
        response = client.request(method, path)
        assert response.status_code == 405, (method, path)
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "method_not_allowed"), (method, path)


def test_a_wrong_method_names_every_method_the_path_takes(tmp_path):
    """Allow lists all of a path's methods, as RFC 9110 asks: GET and POST /v1/videos are two routes, and
    the header named only the first one's."""
    client, _, _ = make_client(tmp_path)
    video = "/v1/videos/video_" + "0" * 24
    cases = (("OPTIONS", "/v1/videos", "GET, POST"), ("PUT", video, "DELETE, GET"), ("DELETE", "/v1/models", "GET"),
             ("GET", f"{video}/remix", "POST"), ("POST", f"{video}/content", "GET, HEAD"))  # fmt: skip
    for method, path, allowed in cases:
        response = client.request(method, path)
        assert response.status_code == 405 and response.headers["allow"] == allowed, (method, path)


def test_an_unexpected_failure_is_a_500_in_the_error_shape(tmp_path, monkeypatch):
    client, store, _ = make_client(tmp_path)

    def broken():
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(store, "stats", broken)
    response = TestClient(client.app, raise_server_exceptions=False).get("/metrics")
    assert response.status_code == 500
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "server_error")
    assert "fire" not in error["message"]  # the details go to the log, not to the client


def test_unknown_and_hostile_ids_are_404(service):
    client, _, data = service
    db = data / "jobs.sqlite3"
    for video_id in ("video_" + "0" * 24, "nope", "..%2Fjobs.sqlite3", "video_..%2F..%2Fjobs", "%2e%2e"):
        for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            response = client.request(method, f"/v1/videos/{video_id}{suffix}")
            assert response.status_code == 404, (method, video_id, suffix)
            assert response.json()["error"]["code"] in ("video_not_found", "not_found")
    for after in ("video_" + "1" * 24, "video_nope"):
        unknown = client.get("/v1/videos", params={"after": after})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "after"
    assert client.get("/v1/videos", params={"limit": 0}).status_code == 400
    assert client.get("/v1/videos", params={"order": "sideways"}).status_code == 400
    assert db.is_file()


# -----------------------------------------------------------------------------------------------------
# Cancelling, failing


def test_cancel_queued_and_running_jobs(tmp_path):
    generate = BlockingGenerator()
    client, store, worker = make_client(tmp_path, generate)
    running = client.post("/v1/videos", json={"prompt": "a cat"}).json()
    queued = client.post("/v1/videos", json={"prompt": "a dog"}).json()
    assert client.get(f"/v1/videos/{queued['id']}/content").status_code == 409  # not ready

    worker.start()
    try:
        assert generate.started.wait(10)
        wait_until(lambda: client.get(f"/v1/videos/{running['id']}").json()["progress"] > 0, what="progress")
        for video in (running, queued):
            answer = client.delete(f"/v1/videos/{video['id']}").json()
            assert answer == {"id": video["id"], "object": "video.deleted", "deleted": False, "status": "cancelled"}
            assert client.get(f"/v1/videos/{video['id']}").json()["status"] == "cancelled"
        # The worker drops the cancelled job at its next heartbeat, and never starts the queued one.
        assert generate.stopped.wait(10)
        time.sleep(0.2)  # ten polls of the worker's: the cancelled queued job is not claimed
    finally:
        generate.release.set()
        worker.stop()
    assert generate.prompts == ["a cat"]
    assert not video_path(tmp_path, running["id"]).exists()
    assert client.delete(f"/v1/videos/{running['id']}").json()["deleted"] is True  # then deleted for good


def test_a_failed_generation_reports_why(tmp_path):
    def refuse(params, on_step):
        raise InputError("height must be a positive multiple of 16, got 8")

    client, store, worker = make_client(tmp_path, refuse)
    video = client.post("/v1/videos", json={"prompt": "a cat"}).json()
    assert worker.run_once()
    failed = client.get(f"/v1/videos/{video['id']}").json()
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "invalid_request", "message": "height must be a positive multiple of 16, got 8"}
    assert client.get(f"/v1/videos/{video['id']}/content").status_code == 409


# -----------------------------------------------------------------------------------------------------
def test_openapi_schema_asks_for_a_key_only_on_a_server_with_keys(tmp_path):
    """An operation's `security` says the key is required: on an open server it is not (a client generated
    from the schema, or a checker, would demand one and expect the 401 it never gets)."""
    open_client, _, _ = make_client(tmp_path / "open")
    schema = open_client.get("/openapi.json").json()
    assert "securitySchemes" not in schema["components"]
    operations = [op for ops in schema["paths"].values() for op in ops.values()]
    assert all("security" not in op and "401" not in op["responses"] for op in operations)
    keyed, _, _ = make_client(tmp_path / "keyed", api_keys=("k1",))
    schema = keyed.get("/openapi.json", headers={"Authorization": "Bearer k1"}).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            guarded = path != "/healthz"
            assert ("security" in op, "401" in op["responses"]) == (guarded, guarded), (method, path)
    assert keyed.get("/v1/models").status_code == 401 and keyed.get("/healthz").status_code == 200


def test_openapi_schema_gives_forms_the_fields_a_form_carries(tmp_path):
    """A form's values are text: none is null (a form leaves a field out) and `lora` is its text; the schema
    gave forms the JSON body's, so a form it described ("seed=null", lora's objects as repeated fields) was
    a 400. A form with every field, as the form schema says, is taken."""
    client, store, worker = make_client(tmp_path, generate=CountingGenerator())
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, name in (("/v1/videos", "VideoCreate"), ("/v1/videos/{video_id}/remix", "VideoRemix")):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert content["application/x-www-form-urlencoded"]["schema"] == {"$ref": f"#/components/schemas/{name}Form"}
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        fields = components[name + "Form"]["properties"]
        assert fields.keys() == components[name]["properties"].keys()
        assert "null" not in json.dumps(fields) and fields["lora"]["type"] == "string"
    form = {"prompt": "a", "model": "tiny", "size": "64x64", "seconds": "1", "negative_prompt": "b", "seed": "3",
            "num_inference_steps": "2", "guidance_scale": "5", "fps": "8", "enhance_prompt": "false",
            "riflex": "false", "resize": "crop", "lora": ""}  # fmt: skip
    assert form.keys() == components["VideoCreateForm"]["properties"].keys() - {"strength"}  # a video's only
    created = client.post("/v1/videos", data=form)
    assert created.status_code == 200, created.text
    worker.start()
    try:
        finished(client, created.json()["id"])
    finally:
        worker.stop()
    remix = {"prompt": "c", "negative_prompt": "d", "seed": "4", "num_inference_steps": "2", "guidance_scale": "4",
             "strength": "0.5", "enhance_prompt": "false", "lora": ""}  # fmt: skip
    assert remix.keys() == components["VideoRemixForm"]["properties"].keys()
    remixed = client.post(f"/v1/videos/{created.json()['id']}/remix", data=remix)
    assert remixed.status_code == 200 and remixed.json()["seed"] == 4, remixed.text


def test_openapi_schema_caps_steps_at_the_servers_max_steps(tmp_path):
    """The schema said 1000 steps (the schedulers' training steps) while the server refuses more than its
    --max-steps: a request the schema allowed was a 400."""
    client, _, _ = make_client(tmp_path, max_steps=30)
    components = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("VideoCreate", "VideoRemix"):
        steps = components[name]["properties"]["num_inference_steps"]["anyOf"][0]
        assert (steps["type"], steps["maximum"]) == ("integer", 30), name
        assert components[name + "Form"]["properties"]["num_inference_steps"]["maximum"] == 30, name
    assert client.post("/v1/videos", json={"prompt": "a", "num_inference_steps": 30}).status_code == 200
    assert client.post("/v1/videos", json={"prompt": "a", "num_inference_steps": 31}).status_code == 400


def test_openapi_schema_takes_seconds_as_the_service_does(tmp_path):
    """`seconds` is a positive number or text that is one; the schema said any string or number, so "0.0"
    or 0, which the service refuses, passed it."""
    jsonschema = pytest.importorskip("jsonschema")
    client, _, _ = make_client(tmp_path)
    components = client.get("/openapi.json").json()["components"]
    for name in ("VideoCreate", "VideoCreateForm"):
        check = jsonschema.Draft202012Validator(components["schemas"][name]["properties"]["seconds"])
        for value in ("1", " .5 ", "1e0", 1, 0.5):
            assert check.is_valid(value), (name, value)
            answer = client.post("/v1/videos", json={"prompt": "a", "seconds": value})
            assert answer.status_code == 200, answer.text
        for value in ("0", "0.0", "-1", "four", "inf", "nan", "", 0, -0.5):
            assert not check.is_valid(value), (name, value)
            answer = client.post("/v1/videos", json={"prompt": "a", "seconds": value})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "seconds", value


def test_openapi_schema_names_the_servers_model_sizes_and_loras(tmp_path):
    """What a body may name is this server's: its model, its sizes, its LoRAs (without any, no `lora`
    entry); the schema took any name, so a request it allowed was a 400."""
    jsonschema = pytest.importorskip("jsonschema")
    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "model"), "tiny", ("32x32",), loras=("style",))
    app = create_app(spec, SQLiteStore(tmp_path / "jobs.sqlite3"), Settings(data_dir=tmp_path))
    plain, _, _ = make_client(tmp_path / "plain")  # 64x64 only, no LoRAs
    for client, sizes, loras in ((TestClient(app), ["64x64", "32x32"], ["style"]), (plain, ["64x64"], [])):
        components = client.get("/openapi.json").json()["components"]

        def valid(body, name, components=components):
            schema = {"$ref": f"#/components/schemas/{name}", "components": components}
            return jsonschema.Draft202012Validator(schema).is_valid(body)

        good = {"prompt": "a", "model": "tiny", "size": sizes[-1], "lora": [{"name": n} for n in loras]}
        assert valid(good, "VideoCreate") and valid({"prompt": "b", "lora": good["lora"]}, "VideoRemix")
        for bad in ({"model": "sora-2"}, {"size": "48x48"}, {"lora": [{"name": "motion"}]}):
            assert not valid({**good, **bad}, "VideoCreate"), bad
            assert client.post("/v1/videos", json={**good, **bad}).status_code == 400, bad
        assert not valid({"prompt": "b", "lora": [{"name": "motion"}]}, "VideoRemix")
        form = components["schemas"]["VideoCreateForm"]["properties"]
        assert (form["model"]["enum"], form["size"]["enum"]) == (["tiny"], sizes)
        # A form's lora is text ("style:0.8"), so its description names the server's LoRAs
        for name in ("VideoCreateForm", "VideoRemixForm"):
            said = components["schemas"][name]["properties"]["lora"]["description"]
            assert said.endswith("This server's: style." if loras else "This server has none: leave it out."), said


def test_openapi_schema_documents_every_error_as_json(tmp_path):
    """Errors are OpenAI's JSON shape on every route, /metrics (a text/plain route) included; the schema
    said text/plain there, so a client reading it would not parse the 401 it gets."""
    client, _, _ = make_client(tmp_path, api_keys=("k1",))
    schema = client.get("/openapi.json", headers={"Authorization": "Bearer k1"}).json()
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                if int(status) >= 400 and (path, status) != ("/healthz", "503"):
                    assert response["content"] == error, (method, path, status)
    answer = client.get("/metrics")
    assert answer.status_code == 401 and answer.headers["content-type"] == "application/json"
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]
    assert metrics["content"] == {"text/plain": {"schema": {"type": "string"}}}


# Keys and limits


def test_api_keys_guard_everything_but_health_and_the_page(tmp_path):
    client, _, _ = make_client(tmp_path, api_keys=("k1", "k2"))
    video_id = "video_" + "0" * 24
    video = f"/v1/videos/{video_id}"
    guarded = [("GET", "/v1/models"), ("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", video),
               ("GET", f"{video}/content"), ("DELETE", video), ("GET", "/metrics"),
               ("GET", "/openapi.json")]  # fmt: skip
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic azE6"}):
        for method, path in guarded:
            response = client.request(method, path, headers=headers, json={"prompt": "a"})
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    for headers in ({}, {"Authorization": "Bearer k1"}):  # Swagger UI could not send the key: off, and says so
        docs = client.get("/docs", headers=headers)
        assert docs.status_code == 404 and docs.json()["error"]["code"] == "not_found"
        assert "GET /openapi.json with Authorization: Bearer KEY" in docs.json()["error"]["message"]
    for key in ("k1", "k2"):
        auth = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/videos", headers=auth).status_code == 200
        assert client.post("/v1/videos", headers=auth, json={"prompt": "a"}).status_code == 200


def test_each_key_sees_only_its_own_videos(tmp_path):
    """Keys are tenants, as their separate rate and queue limits suggest: another key's video is a 404 to
    read, download, delete or page from, exactly like a video that does not exist."""
    client, store, worker = make_client(tmp_path, CountingGenerator(), api_keys=("k1", "k2"), rate_limit=0)
    alice, bob = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    done = client.post("/v1/videos", headers=alice, json={"prompt": "done"}).json()["id"]
    assert worker.run_once()
    queued = client.post("/v1/videos", headers=alice, json={"prompt": "queued"}).json()["id"]
    bobs = client.post("/v1/videos", headers=bob, json={"prompt": "bob's"}).json()["id"]

    for video_id in (done, queued):
        for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            response = client.request(method, f"/v1/videos/{video_id}{suffix}", headers=bob)
            assert response.status_code == 404, (method, suffix)
            assert response.json()["error"] == {
                "message": f"no video with id {video_id!r}",
                "type": "invalid_request_error",
                "code": "video_not_found",
                "param": "video_id",
            }
        after = client.get("/v1/videos", headers=bob, params={"after": video_id})
        assert after.status_code == 404 and after.json()["error"]["param"] == "after"
    assert [v["id"] for v in client.get("/v1/videos", headers=bob).json()["data"]] == [bobs]
    assert [v["id"] for v in client.get("/v1/videos", headers=alice).json()["data"]] == [queued, done]
    page = client.get("/v1/videos", headers=alice, params={"after": queued}).json()
    assert [v["id"] for v in page["data"]] == [done] and not page["has_more"]

    # Nothing of alice's was touched; she still reads, downloads and cancels her own.
    assert client.get(f"/v1/videos/{done}/content", headers=alice).status_code == 200
    assert client.delete(f"/v1/videos/{queued}", headers=alice).json()["status"] == "cancelled"
    # The queue records a hash of the key, never the key.
    owners = {store.get(i).owner for i in (done, bobs)}
    assert len(owners) == 2 and all(o.startswith("key:") and "k1" not in o and "k2" not in o for o in owners)
    store.close()


def test_rate_limit_per_key(tmp_path):
    client, _, _ = make_client(tmp_path, api_keys=("a", "b"), rate_limit=3)
    alice, bob = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
    codes = [client.post("/v1/videos", headers=alice, json={"prompt": "x"}).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = client.post("/v1/videos", headers=alice, json={"prompt": "x"})
    assert limited.json()["error"]["code"] == "rate_limit_exceeded" and int(limited.headers["retry-after"]) >= 1
    assert client.post("/v1/videos", headers=bob, json={"prompt": "x"}).status_code == 200  # bob has his own
    assert client.get("/v1/videos", headers=alice).status_code == 200  # reading is not limited


def test_a_rate_limit_under_one_a_minute_lets_one_video_through_at_a_time(tmp_path):
    client, _, _ = make_client(tmp_path, rate_limit=0.5)  # one video every two minutes
    assert client.post("/v1/videos", json={"prompt": "x"}).status_code == 200
    limited = client.post("/v1/videos", json={"prompt": "x"})
    assert limited.status_code == 429 and 110 <= int(limited.headers["retry-after"]) <= 120


def test_refused_requests_do_not_spend_the_rate_limit(tmp_path):
    client, _, _ = make_client(tmp_path, api_keys=("a",), rate_limit=2, max_active_per_key=1)
    alice = {"Authorization": "Bearer a"}
    for _ in range(5):  # mistakes: refused, and not counted
        assert client.post("/v1/videos", headers=alice, json={"prompt": ""}).status_code == 400
    first = client.post("/v1/videos", headers=alice, json={"prompt": "x"})
    assert first.status_code == 200
    assert client.post("/v1/videos", headers=alice, json={"prompt": "x"}).json()["error"]["code"] == "queue_full"
    client.delete(f"/v1/videos/{first.json()['id']}", headers=alice)
    # Two a minute, one video queued so far: the queue_full answer gave its token back, one is left.
    assert client.post("/v1/videos", headers=alice, json={"prompt": "x"}).status_code == 200
    assert client.post("/v1/videos", headers=alice, json={"prompt": "x"}).json()["error"]["code"] == "rate_limit_exceeded"


def test_queue_limit_per_key(tmp_path):
    client, _, _ = make_client(tmp_path, api_keys=("a", "b"), rate_limit=0, max_active_per_key=2)
    alice, bob = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
    ids = [client.post("/v1/videos", headers=alice, json={"prompt": "x"}).json()["id"] for _ in range(2)]
    full = client.post("/v1/videos", headers=alice, json={"prompt": "x"})
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    assert client.post("/v1/videos", headers=bob, json={"prompt": "x"}).status_code == 200
    client.delete(f"/v1/videos/{ids[0]}", headers=alice)  # cancelling frees a place
    assert client.post("/v1/videos", headers=alice, json={"prompt": "x"}).status_code == 200


# -----------------------------------------------------------------------------------------------------
# Metrics and the schema


def _parse_metrics(text):
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_report_the_queue(tmp_path):
    generate = CountingGenerator(delay=0.01)
    client, store, worker = make_client(tmp_path, generate)
    ids = [client.post("/v1/videos", json={"prompt": f"p{i}"}).json()["id"] for i in range(4)]
    assert worker.run_once() and worker.run_once()
    client.delete(f"/v1/videos/{ids[3]}")
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = _parse_metrics(response.text)
    label = 'model="tiny"'
    assert values[f"cogvideox_queue_depth{{{label}}}"] == 1
    expected = {"queued": 1, "in_progress": 0, "completed": 2, "failed": 0, "cancelled": 1}
    for status, count in expected.items():
        assert values[f'cogvideox_jobs{{{label},status="{status}"}}'] == count
    timings = [sum(store.get(i).timings.values()) for i in ids[:2]]
    assert values[f"cogvideox_generation_seconds_count{{{label}}}"] == 2
    assert values[f"cogvideox_generation_seconds_sum{{{label}}}"] == pytest.approx(sum(timings))
    assert values[f'cogvideox_generation_seconds_bucket{{{label},le="+Inf"}}'] == 2
    assert values[f'cogvideox_generation_seconds_bucket{{{label},le="1"}}'] == 2


def test_openapi_schema_matches_the_routes_and_the_answers(service):
    jsonschema = pytest.importorskip("jsonschema")
    client, _, _ = service
    schema = client.get("/openapi.json").json()
    documented = {(path, method.upper()) for path, ops in schema["paths"].items() for method in ops}
    routes = {(r.path, m) for r in client.app.routes if getattr(r, "include_in_schema", False) for m in r.methods}
    content_head = ("/v1/videos/{video_id}/content", "HEAD")  # the one HEAD route: players ask it first
    assert documented == routes - {(p, "HEAD") for p, _ in routes} | {content_head}
    operation_ids = [op["operationId"] for ops in schema["paths"].values() for op in ops.values()]
    assert len(set(operation_ids)) == len(operation_ids)  # unique, as OpenAPI requires: generators name methods so
    assert {p for p, _ in documented} == {
        "/healthz", "/metrics", "/v1/models", "/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content",
        "/v1/videos/{video_id}/remix",
    }  # fmt: skip
    remix = schema["paths"]["/v1/videos/{video_id}/remix"]["post"]
    assert remix["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/VideoRemix"}
    assert {"prompt", "strength", "seed"} <= set(schema["components"]["schemas"]["VideoRemix"]["properties"])

    create = schema["paths"]["/v1/videos"]["post"]
    body = create["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/VideoCreate"}
    form, upload = body["multipart/form-data"]["schema"]["allOf"]  # the create fields, plus the first frame
    assert form == {"$ref": "#/components/schemas/VideoCreateForm"}
    assert upload["properties"]["input_reference"]["format"] == "binary"
    fields = schema["components"]["schemas"]["VideoCreate"]["properties"]
    assert {"prompt", "model", "size", "seconds", "seed", "negative_prompt", "num_inference_steps",
            "guidance_scale", "fps"} <= set(fields)  # fmt: skip
    steps = [t for t in fields["num_inference_steps"]["anyOf"] if t["type"] == "integer"]  # or null: the default
    assert steps[0]["minimum"] == 1 and fields["prompt"]["maxLength"] == 2000
    assert "416" in schema["paths"]["/v1/videos/{video_id}/content"]["get"]["responses"]
    assert all("422" not in op["responses"] for ops in schema["paths"].values() for op in ops.values())
    assert "securitySchemes" not in schema["components"]  # an open server: see the test below

    def validate(instance, name):
        wrapper = {"$ref": f"#/components/schemas/{name}", "components": schema["components"]}
        jsonschema.Draft202012Validator(wrapper).validate(instance)

    video = client.post("/v1/videos", json={"prompt": "a cat", **FAST}).json()
    validate(video, "Video")
    validate(finished(client, video["id"]), "Video")
    remixed = client.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "a dog", "strength": 0.5}).json()
    validate(remixed, "Video")
    validate(finished(client, remixed["id"]), "Video")
    validate(client.get("/v1/videos").json(), "VideoList")
    validate(client.get("/v1/models").json(), "ModelList")
    validate(client.get("/healthz").json(), "Health")
    validate(client.post("/v1/videos", json={}).json(), "ErrorResponse")
    validate(client.delete(f"/v1/videos/{video['id']}").json(), "VideoDeleted")
    json.dumps(schema)  # the whole schema is plain JSON


# -----------------------------------------------------------------------------------------------------
# Retention


def test_finished_videos_expire_with_their_files(tmp_path):
    """--expire-after: a finished video says when it goes (expires_at), and then its job, MP4 and assets
    go together; the server sweeps by itself while it runs."""
    from cogvideox.serve.app import expire_videos

    client, store, worker = make_client(tmp_path, CountingGenerator(), expire_after=3600)
    video = client.post("/v1/videos", json={"prompt": "a cat"}).json()
    assert video["expires_at"] is None  # not finished: no clock yet
    assert worker.run_once()
    done = client.get(f"/v1/videos/{video['id']}").json()
    assert done["expires_at"] == int(store.get(video["id"]).completed_at + 3600)
    assert client.get(f"/v1/videos/{video['id']}/content", params={"variant": "gif"}).status_code == 200
    files = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert len(files) == 2  # the MP4 and its GIF

    assert expire_videos(store, tmp_path, 3600, now=time.time() + 3000) == 0
    assert expire_videos(store, tmp_path, 3600, now=time.time() + 3601) == 1
    assert list((tmp_path / "videos").iterdir()) == []
    assert client.get(f"/v1/videos/{video['id']}").status_code == 404

    # Inside the running app: a sweep every tenth of the retention.
    data = tmp_path / "live"
    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "model"), "tiny")
    live_store = SQLiteStore(data / "jobs.sqlite3")
    live_worker = Worker(live_store, CountingGenerator(), data, spec.name, poll_interval=0.02)
    with TestClient(create_app(spec, live_store, Settings(data_dir=data, expire_after=0.3), live_worker)) as live:
        made = live.post("/v1/videos", json={"prompt": "a dog"}).json()
        wait_until(lambda: live.get(f"/v1/videos/{made['id']}").status_code == 404, timeout=20, what="the sweep")
        assert not video_path(data, made["id"]).exists()
    live_store.close()


def test_health_is_503_once_the_worker_could_not_load_the_model(tmp_path):
    """A server whose own worker failed to load (a missing model, out of memory) says so with a 503, which a
    supervisor acts on, rather than an "ok" while it queues videos nothing of its own will make."""
    from cogvideox.serve.worker import PipelineGenerator

    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "model"), "tiny")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    worker = Worker(store, PipelineGenerator(str(tmp_path / "no-model")), tmp_path, spec.name)
    with TestClient(create_app(spec, store, Settings(data_dir=tmp_path), worker)) as client:
        wait_until(lambda: worker.state == "failed", timeout=30, what="the failed load")
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "failed", "model": "tiny", "worker": "failed"}
    store.close()


def test_a_retention_of_moments_sweeps_once_a_second_not_without_pause(tmp_path, monkeypatch):
    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "model"), "tiny")
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    sweeps = []
    real = store.expire
    monkeypatch.setattr(store, "expire", lambda before: sweeps.append(before) or real(before))
    with TestClient(create_app(spec, store, Settings(data_dir=tmp_path, expire_after=1e-6))):
        time.sleep(1.5)
    assert 1 <= len(sweeps) <= 3, len(sweeps)  # at start and a second later; not a sweep per event-loop turn
    store.close()

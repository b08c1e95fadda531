"""The HTTP API, in the shape of OpenAI's video endpoints, and the web page, over the job queue.

The API never generates: it checks a request against what the model can make (`ModelSpec`), queues it,
and reads jobs and files back. Workers (`worker.py`) do the generating, in this process or elsewhere.

A request may bring a file as OpenAI's `input_reference`, in a multipart form: the first frame for an
image-to-video model, or a video for a text-to-video model to redraw (video-to-video, our extension). It
is checked and stored (`inputs.py`) before the job is queued.

With API keys, each key is its own tenant: a job records a hash of the key that created it (`Job.owner`,
see `ApiKeys.owner`), and another key's job is answered as if it did not exist (404). Without keys the
service is open and every caller sees every job.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError

from cogvideox.enhance import PromptEnhancer
from cogvideox.errors import InputError
from cogvideox.request import DEFAULT_STRENGTH, check_strength
from cogvideox.serve import assets, inputs, metrics
from cogvideox.serve.body import Fields, read_fields
from cogvideox.serve.errors import ApiError, install_handlers, validation_message
from cogvideox.serve.jobs import ACTIVE, Job, JobStore, is_job_id
from cogvideox.serve.limits import ApiKeys, RateLimiter
from cogvideox.serve.ranges import RangedFile, file_response
from cogvideox.serve.schemas import (
    ErrorResponse,
    Health,
    LoraChoice,
    ModelCard,
    ModelList,
    Video,
    VideoCreate,
    VideoDeleted,
    VideoList,
    VideoRemix,
)
from cogvideox.serve.spec import ModelSpec, parse_size
from cogvideox.serve.worker import Worker, video_path

log = logging.getLogger("cogvideox.serve")

STATIC_DIR = Path(__file__).parent / "static"
IMAGE = "input_reference"  # OpenAI's name for the file a video starts from (ours: or redraws)
_IMAGE_DOC = (
    "The first frame (PNG, JPEG or WebP) for an image-to-video model (image_to_video in GET /v1/models), or a "
    "video for a text-to-video model to redraw (video-to-video, with strength)."
)
LAST = "last_frame"  # ours: the last frame, beside an image-to-video model's first (keyframe interpolation)
_LAST_DOC = (
    "With input_reference's first frame, the last frame (PNG, JPEG or WebP), as CogVideoX-Interpolation (a "
    "5B-I2V fine-tuned on first and last frames) was trained to take it; the released I2V models were not."
)


@dataclass(frozen=True)
class Settings:
    """The service's knobs (the `serve` command's options).

    rate_limit: new jobs per minute per key (or per address when no key is set); 0 turns it off.
    max_active_per_key: queued + running jobs per key; 0 turns it off.
    max_steps: the most num_inference_steps a request may ask for; also caps the model's default step
        count for a request that gives none (a client that never sends the field is never refused for it).
    max_upload_bytes: the largest `input_reference` file (a picture or a video).
    expire_after: seconds after which a finished video is deleted (its job, MP4, assets and input),
        as OpenAI's videos expire; None keeps them.
    """

    data_dir: Path
    api_keys: tuple[str, ...] = ()
    rate_limit: float = 30.0
    max_active_per_key: int = 100
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 20 * 1024 * 1024  # an input_reference file, on top of max_body_bytes
    max_steps: int = 100
    prompt_enhancer: PromptEnhancer | None = field(default=None, repr=False)
    expire_after: float | None = None


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse} for s in statuses}


def create_app(spec: ModelSpec, store: JobStore, settings: Settings, worker: Worker | None = None) -> FastAPI:
    """The FastAPI app serving `spec`'s model from `store`; `worker`, when given, runs in this process
    (started and stopped with the app)."""
    keys = ApiKeys(settings.api_keys)
    limiter = RateLimiter(settings.rate_limit)
    enhancer = settings.prompt_enhancer
    bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY`, when the server has keys.")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if worker is not None:
            worker.start()
        sweeper = asyncio.create_task(_sweep(store, settings)) if settings.expire_after else None
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
            if worker is not None:
                await run_in_threadpool(worker.stop)

    app = FastAPI(
        title="CogVideoX",
        version="1",
        description="Text-to-video in the shape of OpenAI's video API: create a job, poll it, download the MP4.",
        lifespan=lifespan,
        openapi_url=None,  # served below, behind the key like every endpoint
        docs_url=None,
        redoc_url=None,
    )
    install_handlers(app)

    def caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        token = credentials.credentials if credentials is not None else None
        owner = keys.owner(token, request.client.host if request.client else None)
        if owner is None:
            raise ApiError(
                401,
                "invalid_api_key",
                "missing or wrong API key: send Authorization: Bearer KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return owner

    def show(job: Job) -> Video:
        return Video.from_job(job, settings.expire_after)

    def tenant(owner: str) -> str | None:
        """Whose jobs `owner` may see: its own when keys are set (each key a tenant), everyone's (None) on an
        open server, where callers are told apart by address only for limits."""
        return owner if keys.required else None

    def find(video_id: str, owner: str, param: str = "video_id") -> Job:
        """The job `video_id` of `owner`'s tenant; ApiError 404 naming `param` when there is none (another
        key's job included, so ids of other tenants' jobs cannot be probed)."""
        job = store.get(video_id, tenant(owner)) if is_job_id(video_id) else None
        if job is None:
            raise ApiError(404, "video_not_found", f"no video with id {video_id!r}", param)
        return job

    def find_completed(video_id: str, owner: str) -> tuple[Job, Path]:
        """`find`, for a video that must be finished: the job and its MP4's path; ApiError 409 while it is
        not completed."""
        job = find(video_id, owner)
        if job.status != "completed":
            raise ApiError(409, "video_not_ready", f"video {video_id} is {job.status}, not completed", "video_id")
        return job, video_path(settings.data_dir, job.id)

    # -------------------------------------------------------------------------------------------------
    # Service

    @app.get("/healthz", response_model=Health, tags=["service"], responses={503: {"model": Health}})
    def healthz(response: Response) -> Health:
        """Liveness, without a key: answers as soon as the API is up (the worker may still be loading); 503
        once this process's worker could not load the model (its log says why), so that whatever watches
        the service restarts it rather than let it queue videos no worker of its own will make."""
        state = worker.state if worker is not None else "off"
        if state == "failed":
            response.status_code = 503
        return Health(status="failed" if state == "failed" else "ok", model=spec.name, worker=state)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        tags=["service"],
        responses={200: {"content": {"text/plain": {}}}, **_errors(401)},
    )
    def get_metrics(owner: str = Depends(caller)) -> PlainTextResponse:
        """Prometheus metrics: queue depth, jobs by status, generation seconds."""
        return PlainTextResponse(metrics.render(store.stats(), spec.name), media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, tags=["models"], responses=_errors(401))
    def list_models(owner: str = Depends(caller)) -> ModelList:
        """The served model and the videos it makes."""
        card = ModelCard(
            id=spec.name,
            sizes=list(spec.sizes),
            default_size=spec.native_size,
            num_frames=spec.num_frames,
            fps=spec.fps,
            max_seconds=spec.max_seconds,
            max_steps=settings.max_steps,
            num_inference_steps=default_steps(spec, settings),
            frame_step=spec.frame_step,
            guidance_scale=spec.guidance_scale,
            image_to_video=spec.image_to_video,
            riflex_max_seconds=spec.riflex_max_seconds,
            loras=list(spec.loras),
        )
        return ModelList(data=[card])

    # -------------------------------------------------------------------------------------------------
    # Videos

    @app.post(
        "/v1/videos",
        response_model=Video,
        tags=["videos"],
        responses=_errors(400, 401, 413, 415, 429),
        openapi_extra=_body_read_by_hand("VideoCreate", {IMAGE: _IMAGE_DOC, LAST: _LAST_DOC}),
    )
    async def create_video(request: Request, owner: str = Depends(caller)) -> Video:
        """Queue a video. The answer is the job, `queued`; poll `GET /v1/videos/{id}` for its progress."""

        async def read() -> tuple[dict, bool | None]:
            caps = {IMAGE: settings.max_upload_bytes, LAST: settings.max_upload_bytes}
            fields = await read_fields(request, settings.max_body_bytes, caps)
            create = _parse(VideoCreate, fields)
            upload, last = fields.files.get(IMAGE), fields.files.get(LAST)
            if upload is not None and not upload.data:
                raise ApiError(400, "invalid_request", f"{IMAGE}: the file is empty", IMAGE)
            kind = None if upload is None else "image" if inputs.is_picture(upload) else "video"
            params = _job_params(create, spec, settings, kind)
            if last is not None and kind != "image":
                raise ApiError(400, "invalid_request", f"{LAST}: a last frame goes with the first frame ({IMAGE}) "
                               "of an image-to-video model", LAST)  # fmt: skip
            if kind == "image":
                name = await run_in_threadpool(inputs.store_image, upload, settings.data_dir, IMAGE)
                params |= {"image": name, "input_name": upload.filename or "input_reference.png"}
                if last is not None:
                    try:
                        stored = await run_in_threadpool(inputs.store_image, last, settings.data_dir, LAST)
                    except BaseException:
                        inputs.remove_input(settings.data_dir, name)
                        raise
                    params |= {"last_image": stored, "last_name": last.filename or "last_frame.png"}
            elif kind == "video":
                name, available = await run_in_threadpool(
                    inputs.store_video, upload, settings.data_dir, params["fps"], params["num_frames"], IMAGE
                )
                params |= {"video_input": name, "input_name": upload.filename or "input_reference.mp4"}
                try:
                    params["num_frames"] = spec.video_frames(params["num_frames"], available, create.seconds)
                except InputError as e:
                    inputs.remove_input(settings.data_dir, name)
                    raise ApiError(400, "invalid_request", str(e), "seconds") from None
            return params, create.enhance_prompt

        return await enqueue(owner, read)

    @app.post(
        "/v1/videos/{video_id}/remix",
        response_model=Video,
        tags=["videos"],
        responses=_errors(400, 401, 404, 409, 413, 415, 429),
        openapi_extra=_body_read_by_hand("VideoRemix"),
    )
    async def remix_video(video_id: str, request: Request, owner: str = Depends(caller)) -> Video:
        """Queue a remix of a completed video: the video redrawn for a new prompt (video-to-video, the last
        `strength` of the schedule), at its size, length and frame rate. A new video, `queued`."""

        async def read() -> tuple[dict, bool | None]:
            if spec.image_to_video:
                raise ApiError(400, "invalid_request", f"{spec.name} is an image-to-video model, and a remix "
                               "redraws a video with a text-to-video model; create a new video instead")  # fmt: skip
            source, video = find_completed(video_id, owner)
            if not video.is_file():
                raise _file_gone(video_id)
            remix = _parse(VideoRemix, await read_fields(request, settings.max_body_bytes))
            return _remix_params(source, remix, settings, spec), remix.enhance_prompt

        return await enqueue(owner, read)

    async def enqueue(owner: str, read: Callable[[], Awaitable[tuple[dict, bool | None]]]) -> Video:
        """Queue the job whose parameters `read()` gives (with whether to enhance its prompt), within the
        caller's rate and queue limits."""
        wait = limiter.take(owner)
        if wait is not None:
            raise ApiError(
                429,
                "rate_limit_exceeded",
                f"more than {settings.rate_limit:g} videos a minute; try again in {wait:.0f} s",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        # The token is taken first, so that a flood is turned away before its bodies are read, and given
        # back when no video is queued: the limit counts videos, not mistakes.
        job, params = None, {}
        try:
            params, enhance = await read()
            if enhancer is not None and enhance is not False:
                # An image-to-video job's picture goes along, for chat models that see images.
                image = inputs.input_path(settings.data_dir, params["image"]) if "image" in params else None
                params["enhanced_prompt"] = await enhancer.aenhance(params["prompt"], image)
            limit = settings.max_active_per_key or None
            job = await run_in_threadpool(store.create, spec.name, owner, params, limit)
            if job is None:
                raise ApiError(
                    429,
                    "queue_full",
                    f"you have {limit} videos queued or running; wait for some to finish or delete them",
                    headers={"Retry-After": "10"},
                )
        finally:
            if job is None:
                limiter.give_back(owner)
                for stored in _stored_inputs(params):
                    inputs.remove_input(settings.data_dir, stored)
        if worker is not None:
            worker.wake()
        return show(job)

    @app.get("/v1/videos", response_model=VideoList, tags=["videos"], responses=_errors(400, 401, 404))
    def list_videos(
        owner: str = Depends(caller),
        limit: int = Query(20, ge=1, le=100, description="Videos per page."),
        after: str | None = Query(None, description="The last id of the previous page."),
        order: Literal["asc", "desc"] = Query("desc", description="By creation time; newest first by default."),
    ) -> VideoList:
        """The videos, newest first, a page at a time (with keys: the key's own videos)."""
        if after is not None:
            find(after, owner, param="after")
        jobs, has_more = store.page(limit, after, newest_first=order == "desc", owner=tenant(owner))
        data = [show(j) for j in jobs]
        return VideoList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )

    @app.get("/v1/videos/{video_id}", response_model=Video, tags=["videos"], responses=_errors(401, 404))
    def get_video(video_id: str, owner: str = Depends(caller)) -> Video:
        """A job: its status, progress (percent), timings once done, error if it failed."""
        return show(find(video_id, owner))

    content_route = dict(
        response_class=FileResponse,
        tags=["videos"],
        responses={
            200: {
                "content": {media: {} for _, media in assets.VARIANTS.values()},
                "description": "The MP4, or the asset `variant` names.",
            },
            206: {"content": {"video/mp4": {}}, "description": "A byte range of the file (Range header)."},
            304: {"description": "Not modified: If-None-Match names the file's ETag."},
            **_errors(400, 401, 404, 409, 416),
        },
    )

    @app.get("/v1/videos/{video_id}/content", **content_route)
    def get_video_content(
        request: Request,
        video_id: str,
        variant: Literal[tuple(assets.VARIANTS)] = Query(  # type: ignore[valid-type]
            "video",
            description="video: the MP4; thumbnail: its first frame (WebP); spritesheet: every frame in a "
            "grid, 160 pixels across each (JPEG); gif: an animated GIF (ours, not OpenAI's)",
        ),
        owner: str = Depends(caller),
    ) -> FileResponse:
        """The MP4 of a completed video, or an asset made from it (on the first request, then kept);
        honours `Range` so players can seek (an invalid Range is ignored and the whole file sent; a Range
        past the end is a 416)."""
        job, video = find_completed(video_id, owner)
        try:
            path = assets.make_asset(video, variant, fps=job.params["fps"])
            stat = path.stat()
        except (FileNotFoundError, InputError) as e:
            if not video.exists():  # the MP4 went (deleted meanwhile), or never was
                raise _file_gone(video_id) from None
            # The MP4 is there: the server's folder (read-only, say) or file failed it; the log says which.
            log.error("cannot make the %s of video %s: %s", variant, video_id, e)
            raise ApiError(500, "internal_error", f"the server could not make the {variant} of this video; its "
                           "operator has the details") from None  # fmt: skip
        if path != video and not video.exists():  # deleted while the asset was made: no orphan left
            path.unlink(missing_ok=True)
            raise _file_gone(video_id)
        media_type = assets.VARIANTS[variant][1]
        response = RangedFile(
            path, media_type=media_type, filename=path.name, content_disposition_type="inline", stat_result=stat
        )
        return file_response(request, response, stat.st_size)

    # Players and download tools ask for the size and type first. A route of its own, so that its operation
    # has an id of its own: OpenAPI requires them unique, and client generators key their methods by them.
    app.head("/v1/videos/{video_id}/content", operation_id="head_video_content", **content_route)(get_video_content)

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, tags=["videos"], responses=_errors(401, 404))
    def delete_video(video_id: str, owner: str = Depends(caller)) -> VideoDeleted:
        """Cancel a queued or running video; delete a finished one and its file."""
        job = find(video_id, owner)
        if job.status in ACTIVE and store.cancel(job.id):
            return VideoDeleted(id=job.id, deleted=False, status="cancelled")
        if not store.delete(job.id):  # it finished, or went, in the meantime
            find(video_id, owner)
            raise ApiError(404, "video_not_found", f"video {video_id} changed while deleting; try again")
        delete_files(settings.data_dir, job)
        return VideoDeleted(id=job.id, deleted=True, status="deleted")

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_schema(owner: str = Depends(caller)) -> dict:
        return app.openapi()

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs() -> HTMLResponse:
        """Swagger UI (its scripts come from a CDN, so the browser needs the internet), on an open server
        only: the UI fetches the schema without a key, so with keys it could show nothing. Then a 404 that
        says where the schema is."""
        if keys.required:
            raise ApiError(
                404,
                "not_found",
                "/docs is off on a server with API keys (Swagger UI cannot send one): "
                "GET /openapi.json with Authorization: Bearer KEY",
            )
        return get_swagger_ui_html(openapi_url="/openapi.json", title="CogVideoX API")

    # -------------------------------------------------------------------------------------------------
    # The web page: static files, no data in them, so no key needed to load it (its requests send one).

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.openapi = lambda: _openapi(app, keys.required, spec, settings.max_steps)
    return app


def delete_files(data_dir: Path, job: Job) -> None:
    """A deleted job's files: its MP4, the assets made from it, its input."""
    video = video_path(data_dir, job.id)
    for path in (video, *assets.derived_paths(video)):
        path.unlink(missing_ok=True)
    for stored in _stored_inputs(job.params):
        inputs.remove_input(data_dir, stored)


def _stored_inputs(params: dict) -> tuple[str | None, ...]:
    """The names of the files a job's request brought, kept until its video is deleted."""
    return params.get("image"), params.get("last_image"), params.get("video_input")


def expire_videos(store: JobStore, data_dir: Path, expire_after: float, now: float | None = None) -> int:
    """Delete the videos that finished more than `expire_after` seconds before `now`; how many."""
    before = (time.time() if now is None else now) - expire_after
    count = 0
    while jobs := store.expire(before):
        for job in jobs:
            delete_files(data_dir, job)
        count += len(jobs)
    return count


SWEEP_MIN_S = 1.0


async def _sweep(store: JobStore, settings: Settings) -> None:
    """`expire_videos` now and then (every tenth of the retention, from a second to a minute apart: a
    retention of moments does not make the sweep run without pause), for the server's life; a failure
    (the database away) is logged and tried again at the next round."""
    interval = min(60.0, max(SWEEP_MIN_S, settings.expire_after / 10))
    while True:
        try:
            count = await run_in_threadpool(expire_videos, store, settings.data_dir, settings.expire_after)
            if count:
                log.info("deleted %d expired video%s", count, "" if count == 1 else "s")
        except Exception as e:
            log.warning("deleting expired videos failed: %s", e)
        await asyncio.sleep(interval)


def _file_gone(video_id: str) -> ApiError:
    return ApiError(404, "video_not_found", f"the file of video {video_id} is gone", "video_id")


def _check_steps(steps: int, settings: Settings) -> None:
    """ApiError 400 for a step count over the server's --max-steps."""
    if steps > settings.max_steps:
        raise ApiError(
            400, "invalid_request", f"num_inference_steps: at most {settings.max_steps}", "num_inference_steps"
        )


def _body_read_by_hand(schema: str, files: dict[str, str] | None = None) -> dict:
    """The request body of a route that reads it itself (`read_fields`: JSON or a form), for the schema;
    `files`: the file fields a multipart form may add, with what each is."""
    forms = ("multipart/form-data", "application/x-www-form-urlencoded")
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    content |= {kind: {"schema": {"$ref": f"#/components/schemas/{schema}Form"}} for kind in forms}
    if files:
        uploads = {name: {"type": "string", "format": "binary", "description": what} for name, what in files.items()}
        content["multipart/form-data"]["schema"] = {
            "allOf": [content["multipart/form-data"]["schema"], {"type": "object", "properties": uploads}]
        }
    return {"requestBody": {"required": True, "content": content}}


def _fit_to_server(body: dict, spec: ModelSpec, max_steps: int) -> None:
    """A body's schema narrowed to what this server takes: the server's step cap, lower than the model's
    (MAX_STEPS); its model's name, its sizes, and the LoRAs it serves (none: no `lora` entry at all)."""
    properties = body["properties"]
    body.pop("$defs", None)  # LoraChoice, inlined below with the served names

    def members(name: str, kind: str) -> list[dict]:
        field = properties.get(name, {})
        return [member for member in field.get("anyOf", [field]) if member.get("type") == kind]

    for member in members("num_inference_steps", "integer"):
        member["maximum"] = min(member["maximum"], max_steps)
    for member in members("model", "string"):
        member["enum"] = [spec.name]
    for member in members("size", "string"):
        member["enum"] = list(spec.sizes)
    for member in members("lora", "array"):
        choice = LoraChoice.model_json_schema()
        if spec.loras:
            choice["properties"]["name"]["enum"] = list(spec.loras)
        else:
            member["maxItems"] = 0
        member["items"] = choice


def _form_schema(body: dict, loras: tuple[str, ...]) -> dict:
    """A JSON body's schema as a form carries it: every value is text, so no field is null (a form leaves
    it out instead), and `lora` is its text ("style:0.8,motion"), as a form has no list of objects. The
    JSON body lists the server's `loras` by name; the text names them in its description, as a pattern
    true to what the text takes (spaces, empty parts, any float's spelling) would be hard to read."""
    form = {key: value for key, value in body.items() if key != "$defs"}
    form["title"] = body["title"] + "Form"
    form["properties"] = {}
    for name, given in body["properties"].items():
        prop = dict(given)
        if "anyOf" in prop:
            members = [member for member in prop.pop("anyOf") if member.get("type") != "null"]
            prop |= members[0] if len(members) == 1 else {"anyOf": members}
        if prop.get("default", "") is None:
            del prop["default"]
        form["properties"][name] = prop
    lora = form["properties"]["lora"]
    served = f"This server's: {', '.join(loras)}." if loras else "This server has none: leave it out."
    form["properties"]["lora"] = {"type": "string", "title": lora["title"],
                                  "description": f"{lora['description']} {served}"}
    return form


def _parse(model: type[BaseModel], fields: Fields):
    """A request body checked field by field; ApiError 400 naming the first bad field. JSON is checked
    strictly (`true` or `"3"` is not a step count); a form, all text, is converted."""
    try:
        return model.model_validate(fields.values, strict=fields.typed)
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise ApiError(400, "invalid_request", message, param) from None


def _remix_params(source: Job, remix: VideoRemix, settings: Settings, spec: ModelSpec) -> dict:
    """A remix's generation parameters: the source video's, with the remix's prompt and settings; ApiError
    400 when its steps are over the cap or its strength runs no step."""
    p = source.params
    steps = remix.num_inference_steps if remix.num_inference_steps is not None else p["num_inference_steps"]
    _check_steps(steps, settings)
    try:
        check_strength(remix.strength, steps)
    except InputError as e:
        raise ApiError(400, "invalid_request", str(e), "strength") from None
    kept = ("width", "height", "num_frames", "fps", "riflex")
    # The video's own LoRAs by default, checked again: the server may have been restarted without them.
    choices = remix.lora if remix.lora is not None else [LoraChoice(name=n, scale=v) for n, v in p.get("lora", [])]
    loras = _lora_params(choices, spec)
    return {key: p[key] for key in kept if key in p} | ({"lora": loras} if loras else {}) | {
        "prompt": remix.prompt,
        "negative_prompt": remix.negative_prompt if remix.negative_prompt is not None else p["negative_prompt"],
        "num_inference_steps": steps,
        "guidance_scale": remix.guidance_scale if remix.guidance_scale is not None else p["guidance_scale"],
        "seed": remix.seed if remix.seed is not None else p["seed"],
        "strength": remix.strength,
        "remix_of": source.id,
    }


def _lora_params(choices, spec: ModelSpec) -> list[list]:
    """A request's LoRAs as [[name, scale], ...], checked against the served ones; ApiError 400 otherwise."""
    if not choices:
        return []
    names = [choice.name for choice in choices]
    if not spec.loras:
        raise ApiError(400, "invalid_request", f"lora: {spec.name} is served without LoRAs", "lora")
    unknown = [name for name in names if name not in spec.loras]
    if unknown:
        raise ApiError(400, "invalid_request", f"lora: no LoRA named {unknown[0]!r}; this server has "
                       f"{', '.join(spec.loras)}", "lora")  # fmt: skip
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ApiError(400, "invalid_request", f"lora: {twice[0]!r} is named twice", "lora")
    return [[choice.name, choice.scale] for choice in choices]


def default_steps(spec: ModelSpec, settings: Settings) -> int:
    """The step count of a request that gives none: the model's, capped at --max-steps, so a server with a
    low cap still takes requests from clients that never send the field (OpenAI's)."""
    return min(spec.num_inference_steps, settings.max_steps)


def _job_params(create: VideoCreate, spec: ModelSpec, settings: Settings, given: str | None = None) -> dict:
    """A checked request as the generation parameters a worker needs; ApiError 400 when the model cannot.
    given: what the request's `input_reference` is, "image" or "video", or None without one."""
    if create.model is not None and create.model != spec.name:
        raise ApiError(
            400, "model_not_found", f"unknown model {create.model!r}; this server has {spec.name!r}", "model"
        )
    if spec.image_to_video and given != "image":
        raise ApiError(400, "invalid_request", f"{spec.name} makes a video from a first frame: send the picture "
                       f"as {IMAGE} in a multipart form (curl -F {IMAGE}=@photo.png)", IMAGE)  # fmt: skip
    if given == "image" and not spec.image_to_video:
        raise ApiError(400, "invalid_request", f"{spec.name} is a text-to-video model and takes no picture as "
                       f"{IMAGE} (a video it redraws); serve an image-to-video model (such as "
                       "THUDM/CogVideoX-5b-I2V) to start from a picture", IMAGE)  # fmt: skip
    if create.strength is not None and given != "video":
        raise ApiError(400, "invalid_request", f"strength applies to a video sent as {IMAGE} (video-to-video)",
                       "strength")  # fmt: skip
    if create.riflex and not spec.riflex:
        raise ApiError(400, "invalid_request", f"{spec.name} has no rotary positions (or a learned position "
                       "table) for RIFLEx to stretch; leave riflex off", "riflex")  # fmt: skip
    size = create.size or spec.native_size
    if size not in spec.sizes:
        raise ApiError(400, "invalid_size", f"size {size} is not one of {', '.join(spec.sizes)}", "size")
    width, height = parse_size(size)
    steps = create.num_inference_steps if create.num_inference_steps is not None else default_steps(spec, settings)
    _check_steps(steps, settings)
    fps = create.fps or spec.fps
    try:
        num_frames = spec.frames_for(create.seconds, fps, riflex=create.riflex)
    except InputError as e:
        raise ApiError(400, "invalid_request", str(e), "seconds") from None
    extras = {"riflex": True} if create.riflex else {}
    loras = _lora_params(create.lora, spec)
    if loras:
        extras["lora"] = loras
    if given is not None:
        extras["resize"] = create.resize
    if given == "video":
        extras["strength"] = create.strength if create.strength is not None else DEFAULT_STRENGTH
        try:
            check_strength(extras["strength"], steps)
        except InputError as e:
            raise ApiError(400, "invalid_request", str(e), "strength") from None
    return extras | {
        "prompt": create.prompt,
        "negative_prompt": create.negative_prompt,
        "width": width,
        "height": height,
        "num_frames": num_frames,
        "fps": fps,
        "num_inference_steps": steps,
        "guidance_scale": create.guidance_scale if create.guidance_scale is not None else spec.guidance_scale,
        # Drawn now, not by the worker: a job re-run after a crash makes the same video.
        "seed": create.seed if create.seed is not None else secrets.randbelow(2**32),
    }


def _openapi(app: FastAPI, keyed: bool, spec: ModelSpec, max_steps: int) -> dict:
    """FastAPI's schema, plus the create body (read by hand, to take forms too), minus the 422 answers
    FastAPI documents by default: this API answers a bad request with 400. keyed: whether the server has
    API keys; without them no operation asks for one (the schema would call the key required, and clients
    generated from it would demand one). The bodies are narrowed to `spec`'s model and --max-steps."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for body in (VideoCreate, VideoRemix):
            components[body.__name__] = body.model_json_schema(ref_template="#/components/schemas/{model}")
            _fit_to_server(components[body.__name__], spec, max_steps)
            components[body.__name__ + "Form"] = _form_schema(components[body.__name__], spec.loras)
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                for response in operation.get("responses", {}).values():
                    # An error is JSON whatever the route's success is: FastAPI files it under the route's
                    # media type (text/plain for /metrics).
                    if error["application/json"] in response.get("content", {}).values():
                        response["content"] = error
                if not keyed:
                    operation.pop("security", None)
                    operation.get("responses", {}).pop("401", None)
        if not keyed:
            schema["components"].pop("securitySchemes", None)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema

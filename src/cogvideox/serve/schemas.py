"""Request and response bodies of the HTTP API: OpenAI's video objects, plus our generation options.

Fields OpenAI's video API has keep its names and meanings (`prompt`, `model`, `size` as "WIDTHxHEIGHT",
`seconds` as a string, `status`, `progress`), so its clients work against this service with a base URL
change; everything CogVideoX adds is an optional extra field.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cogvideox.serve.jobs import Job

MAX_PROMPT_CHARS = 2000  # T5 reads 226 tokens, roughly a thousand characters of English; allow some slack
MAX_STEPS = 1000  # the schedulers' training steps; the server's --max-steps usually caps lower
MAX_GUIDANCE = 50.0
MAX_FPS = 120.0

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]


class VideoCreate(BaseModel):
    """`POST /v1/videos`, as JSON or as a form (OpenAI's client sends multipart/form-data)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the video should show.")
    model: str | None = Field(None, description="The served model's name (GET /v1/models); default: that model.")
    size: str | None = Field(
        None,
        pattern=r"^\d{1,5}x\d{1,5}$",
        description="WIDTHxHEIGHT, one of the model's sizes; default its native one.",
    )
    seconds: str | float | None = Field(
        None, description="Clip length; rounded to a frame count the model makes. Default: the model's own length."
    )
    # Our extensions.
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="What the video should not show.")
    seed: int | None = Field(None, ge=0, lt=2**32, description="Noise seed; default: random (reported back).")
    num_inference_steps: int = Field(50, ge=1, le=MAX_STEPS, description="Denoising steps.")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE,
        description="Classifier-free guidance scale; default: the model's recommendation (6 for the released models).",
    )
    fps: float | None = Field(None, gt=0, le=MAX_FPS, description="Frame rate of the MP4; default: the model's.")
    enhance_prompt: bool | None = Field(
        None, description="Rewrite the prompt with the server's prompt enhancer (default: on when it has one)."
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is blank; say what the video should show")
        return value

    @field_validator("seconds")
    @classmethod
    def _seconds(cls, value):
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"seconds must be a number, got {value!r}") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds must be a positive number, got {value!r}")
        return seconds

    @field_validator("guidance_scale", "fps")
    @classmethod
    def _finite(cls, value):
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """A video job, in the shape of OpenAI's `video` object."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Status
    progress: int = Field(ge=0, le=100, description="Percent done.")
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str
    seconds: str = Field(description="Length of the clip: frames / fps.")
    size: str
    error: VideoError | None = None
    # Our extensions.
    enhanced_prompt: str | None = Field(None, description="The prompt generated from, when the enhancer rewrote it.")
    negative_prompt: str = ""
    seed: int
    num_frames: int
    fps: float
    num_inference_steps: int
    guidance_scale: float
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage, once completed.")

    @classmethod
    def from_job(cls, job: Job) -> Video:
        p = job.params
        return cls(
            id=job.id,
            model=job.model,
            status=job.status,
            progress=job.progress,
            created_at=int(job.created_at),
            completed_at=int(job.completed_at) if job.completed_at is not None else None,
            prompt=p["prompt"],
            seconds=f"{p['num_frames'] / p['fps']:g}",
            size=f"{p['width']}x{p['height']}",
            error=job.error,
            enhanced_prompt=p.get("enhanced_prompt"),
            negative_prompt=p["negative_prompt"],
            seed=p["seed"],
            num_frames=p["num_frames"],
            fps=p["fps"],
            num_inference_steps=p["num_inference_steps"],
            guidance_scale=p["guidance_scale"],
            timings=job.timings,
        )


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class VideoDeleted(BaseModel):
    """`DELETE /v1/videos/{id}`: a finished video is deleted; a queued or running one is cancelled."""

    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = Field(description="True when the job and its file are gone.")
    status: Literal["deleted", "cancelled"]


class ModelCard(BaseModel):
    """`GET /v1/models`: OpenAI's model object, plus what the model makes."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str = "cogvideox"
    sizes: list[str]
    default_size: str
    num_frames: int
    fps: float
    max_seconds: float
    max_steps: int
    frame_step: int
    guidance_scale: float = Field(description="The guidance scale a request without one gets: the model's recommendation.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: OpenAI's error shape."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    worker: str = Field(description='"off" (separate workers), "loading", "ready" or "failed".')

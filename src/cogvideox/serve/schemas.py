"""Request and response bodies of the HTTP API: OpenAI's video objects, plus our generation options.

Fields OpenAI's video API has keep its names and meanings (`prompt`, `model`, `size` as "WIDTHxHEIGHT",
`seconds` as a string, `status`, `progress`), so its clients work against this service with a base URL
change; everything CogVideoX adds is an optional extra field.

A JSON request is checked strictly (`VideoCreate.model_validate(..., strict=True)`): a number field takes a
JSON number, not `true` or `"3"`. `seconds` stays a string-or-number, as OpenAI's API takes it. A form's
values are all text, so a form is converted (lax).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cogvideox.serve.jobs import Job

MAX_PROMPT_CHARS = 2000  # T5 reads 226 tokens, roughly a thousand characters of English; allow some slack
MAX_STEPS = 1000  # the schedulers' training steps; the server's --max-steps usually caps lower
MAX_GUIDANCE = 50.0
# At 1 fps the longest clip (161 frames, 1.5 with RIFLEx) lasts 161 s. Lower rates broke downloads: an MP4
# takes no rate under 1/1001, and a GIF no frame over 655.35 s (a still video's frames merge into one).
MIN_FPS = 1.0
MAX_FPS = 120.0
MAX_LORA_SCALE = 10.0
MAX_LORAS = 8

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]

# What a float field must be, said when it is NaN or infinite (the range check alone would call NaN too big).
_FLOAT_RANGES = {
    "guidance_scale": f"from 0 to {MAX_GUIDANCE:g}",
    "fps": f"from {MIN_FPS:g} to {MAX_FPS:g}",
    "strength": "above 0 and at most 1",
    "scale": f"from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}",
}


class _Request(BaseModel):
    """The checks creating and remixing share: a prompt that says something, and finite numbers."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is blank; say what the video should show")
        return value

    @field_validator("lora", mode="before", check_fields=False)
    @classmethod
    def _lora_text(cls, value):
        return lora_choices(value)

    @field_validator("seed", "num_inference_steps", mode="before", check_fields=False)
    @classmethod
    def _whole(cls, value):
        """A JSON number with no fraction (`7.0`, `1e3`) is an integer, as JSON Schema's "integer" (the
        OpenAPI document's) says, and some JSON writers send every number so; strict checking alone would
        refuse it. `7.5` still goes on to be refused."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("guidance_scale", "fps", "strength", mode="before", check_fields=False)
    @classmethod
    def _finite(cls, value, info: ValidationInfo):
        """Refuse NaN and infinities (JSON's NaN, Infinity, 1e400; a form's "nan") before the range check,
        whose "less than or equal to 50" would be wrong for NaN; other values go on to the type check."""
        if not _is_finite(value):
            raise ValueError(f"must be a finite number {_FLOAT_RANGES[info.field_name]}")
        return value


class LoraChoice(BaseModel):
    """One of the server's LoRAs (GET /v1/models lists them) and the scale it runs at."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="A LoRA the server serves (its --lora NAME).")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, description="Its strength; default 1.")

    @field_validator("scale", mode="before")
    @classmethod
    def _finite(cls, value, info: ValidationInfo):
        if not _is_finite(value):
            raise ValueError(f"must be a finite number {_FLOAT_RANGES[info.field_name]}")
        return value


def lora_choices(value):
    """`lora` as text ("style", "style:0.8,motion:0.5": what a form sends, and a JSON shorthand) -> the
    list of {name, scale} the field holds; anything else goes on to the type check."""
    if not isinstance(value, str):
        return value
    choices = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, colon, scale = (text.strip() for text in part.partition(":"))
        entry = {"name": name}
        if colon:
            try:
                entry["scale"] = float(scale)
            except ValueError:
                raise ValueError(f"the scale of LoRA {name!r} must be a number, got {scale!r}") from None
        choices.append(entry)
    return choices


_LORA_DOC = ("LoRAs to run, from the server's (GET /v1/models): a list of {name, scale}, or as text \"style\" or "
             "\"style:0.8,motion:0.5\" (a form's way).")


class VideoCreate(_Request):
    """`POST /v1/videos`, as JSON or as a form (OpenAI's client sends multipart/form-data)."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the video should show.")
    model: str | None = Field(None, description="The served model's name (GET /v1/models); default: that model.")
    size: str | None = Field(
        None,
        pattern=r"^\d{1,5}x\d{1,5}$",
        description="WIDTHxHEIGHT, one of the model's sizes; default its native one.",
    )
    seconds: str | float | None = Field(
        None,
        description="Clip length; rounded to a frame count the model makes. Default: the model's own length.",
        json_schema_extra=lambda schema: _positive_seconds(schema),
    )
    # Our extensions.
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="What the video should not show.")
    seed: int | None = Field(None, ge=0, lt=2**32, description="Noise seed; default: random (reported back).")
    num_inference_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS,
        description="Denoising steps; default: the model's (50), capped at the server's --max-steps (GET /v1/models).",
    )
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE,
        description="Classifier-free guidance scale; default: the model's recommendation (6 for the released models).",
    )
    fps: float | None = Field(
        None, ge=MIN_FPS, le=MAX_FPS, description="Frame rate of the MP4; default: the model's."
    )
    enhance_prompt: bool | None = Field(
        None, description="Rewrite the prompt with the server's prompt enhancer (default: on when it has one)."
    )
    riflex: bool = Field(
        False,
        description="RIFLEx, for a clip longer than the model was trained on (up to twice; models with rotary "
        "positions only, see riflex_max_seconds in GET /v1/models).",
    )
    resize: Literal["stretch", "crop"] = Field(
        "stretch",
        description="How input_reference reaches the video size: stretch (the reference's rule) or crop (keep "
        "its aspect ratio, cut the centred region).",
    )
    strength: float | None = Field(
        None, gt=0.0, le=1.0,
        description="With a video as input_reference (video-to-video): the fraction of the denoising schedule "
        "that runs; lower stays closer to the video. Default 0.8.",
    )  # fmt: skip
    lora: list[LoraChoice] | None = Field(None, max_length=MAX_LORAS, description=_LORA_DOC + " Default: none.")

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds(cls, value):
        """OpenAI sends a string ("4"); a number is taken too. Checked before the string-or-number type, so a
        bad value gets one message about `seconds` rather than one per member of the union."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            # ValueError, not TypeError: pydantic turns only the former into a validation error (a 400).
            raise ValueError(f"must be a number of seconds, not {type(value).__name__}")  # noqa: TRY004
        try:
            seconds = float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer beyond any float
            raise ValueError(f"seconds must be a number, got {value!r}") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds must be a positive number, got {value!r}")
        return seconds


class VideoRemix(_Request):
    """`POST /v1/videos/{id}/remix`: a completed video redrawn for a new prompt (video-to-video). Its size,
    length and frame rate stay; the other settings default to the video's own."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the remix should show.")
    # Our extensions.
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="Default: the video's.")
    seed: int | None = Field(None, ge=0, lt=2**32, description="Noise seed; default: the video's.")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Default: the video's.")
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, description="Default: the video's.")
    strength: float = Field(
        0.8, gt=0.0, le=1.0,
        description="Fraction of the denoising schedule that runs; lower stays closer to the video.",
    )  # fmt: skip
    enhance_prompt: bool | None = Field(
        None, description="Rewrite the prompt with the server's prompt enhancer (default: on when it has one)."
    )
    lora: list[LoraChoice] | None = Field(
        None, max_length=MAX_LORAS, description=_LORA_DOC + " Default: the video's; [] or \"\" for none."
    )


# A positive decimal number as text ("4", "4.5", "1e1"): some digit of the mantissa is not a zero.
_POSITIVE_NUMBER = r"^\s*\+?(?=[^eE]*[1-9])(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"


def _positive_seconds(schema: dict) -> None:
    """`seconds` in the schema as the check reads it (`VideoCreate._seconds`): a positive number, or text
    that is one, rather than any string or number."""
    for member in schema["anyOf"]:
        if member.get("type") == "string":
            member["pattern"] = _POSITIVE_NUMBER
        elif member.get("type") == "number":
            member["exclusiveMinimum"] = 0


def _is_finite(value) -> bool:
    """False for a number, or a form's text, that is NaN, infinite or beyond any float (a 400-digit JSON
    integer); True for everything else, which the type and range checks then judge."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return True
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
    except ValueError:
        return True  # not a number at all: the type check says so


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
    expires_at: int | None = Field(None, description="When a finished video is deleted (a server with --expire-after).")
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
    remixed_from_video_id: str | None = Field(None, description="The video a remix redraws (OpenAI's field).")
    strength: float | None = Field(None, description="The share of the schedule that ran (a remix, a redrawn video).")
    input_reference: str | None = Field(
        None, description="The file name of the picture it started from, or of the video it redrew."
    )
    resize: str | None = Field(None, description="How that input reached the video size.")
    last_frame: str | None = Field(None, description="The file name of the last frame it was drawn towards.")
    riflex: bool = False
    lora: list[LoraChoice] | None = Field(None, description="The LoRAs it ran with.")

    @classmethod
    def from_job(cls, job: Job, expire_after: float | None = None) -> Video:
        """The job as the API shows it; `expire_after`: the server's retention (seconds), for `expires_at`."""
        p = job.params
        expires = job.completed_at + expire_after if expire_after and job.completed_at is not None else None
        return cls(
            id=job.id,
            model=job.model,
            status=job.status,
            progress=job.progress,
            created_at=int(job.created_at),
            completed_at=int(job.completed_at) if job.completed_at is not None else None,
            expires_at=int(expires) if expires is not None else None,
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
            remixed_from_video_id=p.get("remix_of"),
            strength=p.get("strength"),
            input_reference=p.get("input_name"),
            resize=p.get("resize"),
            last_frame=p.get("last_name"),
            riflex=p.get("riflex", False),
            lora=[LoraChoice(name=n, scale=v) for n, v in p["lora"]] if p.get("lora") else None,
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
    num_inference_steps: int = Field(
        description="The step count a request without one gets: the model's default, capped at max_steps."
    )
    frame_step: int
    guidance_scale: float = Field(description="The guidance scale a request without one gets: the model's recommendation.")
    image_to_video: bool = Field(
        False, description="Every video starts from a first frame: send it as input_reference in a multipart form."
    )
    riflex_max_seconds: float | None = Field(
        None, description="The longest clip a request with riflex: true gets at the model's fps; None: no RIFLEx."
    )
    loras: list[str] = Field(default_factory=list, description="The LoRAs a request may name in lora.")


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
    status: Literal["ok", "failed"] = Field("ok", description='"failed" (a 503) once the worker failed to load.')
    model: str
    worker: str = Field(description='"off" (separate workers), "loading", "ready" or "failed".')

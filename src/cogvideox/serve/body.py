"""Reading a create request's body: JSON, or a form (OpenAI's client posts multipart/form-data), with a
size cap enforced while reading, so an oversized body is refused before it is held in memory. A form may
carry the files a route names (`input_reference`, the first frame of an image-to-video model), each within
a cap of its own."""

from __future__ import annotations

import json
from email.message import Message
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from cogvideox.serve.errors import ApiError


@dataclass(frozen=True)
class Fields:
    """A create request's fields, and whether they arrived typed.

    typed: True for JSON, whose numbers, booleans and strings are told apart, so a field's type is checked
        strictly (`"num_inference_steps": true` is refused, not read as 1); False for a form, whose values
        are all text and are converted ("3" -> 3).
    """

    values: dict[str, Any]
    typed: bool
    files: dict[str, Upload] = field(default_factory=dict)


@dataclass(frozen=True)
class Upload:
    """A file a form carried: the name the client gave it, its declared type, its bytes."""

    filename: str
    content_type: str
    data: bytes


async def read_fields(request: Request, max_bytes: int, files: dict[str, int] | None = None) -> Fields:
    """The request's fields; ApiError 413 / 415 / 400 for a body we will not read.

    files: the file fields a multipart form may carry, each with its most bytes (the body may then be that
        much larger than `max_bytes`); a file in any other field is refused, naming it.
    """
    files = files or {}
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    limit = max_bytes + (sum(files.values()) if media_type == "multipart/form-data" else 0)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:  # the client went (an upload cancelled): its doing, not a traceback in our log
        raise ApiError(400, "client_disconnected", "the connection closed before the request body was whole") from None
    body = b"".join(chunks)

    if media_type == "application/json" or media_type.endswith("+json"):
        values = _json_object(body)
        clash = sorted(files.keys() & values.keys())
        if clash:
            name = clash[0]
            raise ApiError(400, "invalid_request", f"{name}: send the file in a multipart/form-data request "
                           f"(curl -F {name}=@photo.png), not in JSON", name)  # fmt: skip
        return Fields(values, typed=True)
    if media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _form(request, body, media_type, files)
    raise ApiError(415, "unsupported_media_type", f"send the request as application/json or a form, not {media_type}")


def _json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; ApiError 400 for anything else, including JSON Python will not parse
    (nesting deeper than its recursion limit, integers longer than its 4300 digits): a client's mistake,
    never a 500."""
    if not body.strip():
        raise ApiError(400, "invalid_json", "the request body is empty: send a JSON object with a prompt")
    try:
        data = json.loads(body, object_pairs_hook=_once_each)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {e}") from None
    except ValueError:  # Python's limit on the digits of an int it will convert
        raise ApiError(400, "invalid_json", "the request body has a number with too many digits") from None
    except RecursionError:  # the parser recurses per level of nesting; "[[[[..." exhausts the stack
        raise ApiError(400, "invalid_json", "the request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, a name given twice refused: JSON leaves it to the reader which one counts,
    and taking one silently would run a request other than the one the client meant."""
    data: dict[str, Any] = {}
    for name, value in pairs:
        if name in data:
            raise _given_twice(name)
        data[name] = value
    return data


def _given_twice(name: str) -> ApiError:
    return ApiError(400, "invalid_request", f"{name}: given twice; send each field once", name)


def _closed(headers, body: bytes) -> bool:
    """Whether a multipart body holds its closing boundary ("--BOUNDARY--"): without it, the body was cut
    short (its last field lost, or all of them), though the parser reads what came without a word."""
    header = Message()
    header["content-type"] = headers.get("content-type", "")
    boundary = (header.get_param("boundary") or "").encode("latin-1", "replace")
    close = b"--" + boundary + b"--"
    return body.startswith(close) or b"\r\n" + close in body


async def _form(request: Request, body: bytes, media_type: str, files: dict[str, int]) -> Fields:
    async def replay():
        yield body
        yield b""

    parser_class = MultiPartParser if media_type == "multipart/form-data" else FormParser
    try:
        form = await parser_class(request.headers, replay()).parse()
    except Exception as e:  # the parsers raise their own error types for malformed bodies
        raise ApiError(400, "invalid_form", f"the form could not be read: {e}") from None
    if parser_class is MultiPartParser and not _closed(request.headers, body):
        raise ApiError(400, "invalid_form", "the form is cut short: it lacks its closing boundary; send it whole")
    fields: dict[str, Any] = {}
    uploads: dict[str, Upload] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in files:
                names = " and ".join(files)
                what = f"only {names} {'take' if len(files) > 1 else 'takes'} a" if files else "this request takes no"
                raise ApiError(400, "unsupported_parameter", f"{name}: {what} file", name)
            data = await value.read()
            await value.close()
            if len(data) > files[name]:
                raise ApiError(413, "request_too_large", f"{name}: the file is over {files[name]} bytes", name)
            if name in uploads:
                raise ApiError(400, "invalid_request", f"{name}: send one file, not several", name)
            uploads[name] = Upload(value.filename or "", value.content_type or "", data)
        elif name in files:
            raise ApiError(400, "invalid_request", f"{name}: send a file, not text", name)
        elif name in fields:
            raise _given_twice(name)
        else:
            fields[name] = value
    return Fields(fields, typed=False, files=uploads)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "request_too_large", f"the request body is over {max_bytes} bytes")

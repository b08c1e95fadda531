"""Errors as HTTP answers: every 4xx/5xx body is OpenAI's `{"error": {"message", "type", "code", "param"}}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from cogvideox.errors import InputError

# OpenAI's error types for the statuses that have their own; any other 4xx is the client's mistake
# (`invalid_request_error`), a 5xx is ours (`server_error`).
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """OpenAI's `type` for an answer with `status`: clients branch on it, so a 4xx must never read as ours."""
    if status in _TYPES:
        return _TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


class ApiError(Exception):
    """An answer other than success, with what was wrong and, where one is to blame, the field."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None, headers=None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, param: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type(status), "code": code, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(errors) -> tuple[str, str | None]:
    """pydantic's first error as one sentence, and the field it is about."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    elif first.get("type") == "missing":
        message = "this field is required"
    return (f"{param}: {message}" if param else message), param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error_response(error.status, error.code, error.message, error.param, error.headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, error: InputError):
        return error_response(400, "invalid_request", str(error))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        message, param = validation_message(error.errors())
        return error_response(400, "invalid_request", message, param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        headers = dict(getattr(error, "headers", None) or {})
        if error.status_code == 405:
            headers["Allow"] = _allowed(request)
        return error_response(error.status_code, code, str(error.detail), headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        # A bug of ours: still OpenAI's shape, so clients parse it; the traceback goes to the log
        # (Starlette re-raises after answering).
        return error_response(500, "server_error", "the server failed to answer this request; see its log")


def _allowed(request: Request) -> str:
    """The methods the request's path takes, for a 405's Allow header (RFC 9110 asks for all of them):
    Starlette names only those of the first route on the path, and a path's methods may be several routes
    (GET and POST /v1/videos)."""
    methods = set()
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))

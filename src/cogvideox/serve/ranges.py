"""`Range` requests on the MP4s, judged here by RFC 9110 (section 14) before Starlette's `FileResponse`
serves them, so that every answer but the file itself is the API's JSON error shape.

- A header that is not a valid `bytes=` range set (`bytes=abc`, `bytes=9-3`, another unit, more than
  `MAX_RANGES` ranges, a position over 18 digits) is ignored and the whole file served, 200: RFC 9110 lets
  a server ignore Range (and requires it for a unit it does not know), and a player still gets its video.
- A valid set of which no range starts inside the file (`bytes=99999-` on a smaller file, `bytes=-0`) is a
  416 with `Content-Range: bytes */SIZE`, in the JSON error shape.
- Otherwise the satisfiable ranges, and only those, are handed to `FileResponse` (206).
- With `If-Range` naming another version of the file, the range is ignored (200), as the RFC says.
- With `If-None-Match` naming the file's ETag, the answer is 304 Not Modified (no body).
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.types import Receive, Scope, Send

from cogvideox.serve.errors import ApiError

MAX_RANGES = 100  # more is a broken client or an attack; ignored (as Starlette does)

# first-last, first- (to the end), -suffix (the last bytes); 18 digits exceed any file, and keep int() cheap.
_RANGE_SPEC = re.compile(r"(\d{1,18})-(\d{0,18})|-(\d{1,18})")


def satisfiable_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """The ranges of a `Range` header that lie in a file of `size` bytes, as (first, last) byte positions,
    last included; None when the header is not a valid bytes range set (to be ignored); [] when it is valid
    but no range is satisfiable (a 416)."""
    unit, _, range_set = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    specs = [part.strip() for part in range_set.split(",")]
    if not 1 <= len(specs) <= MAX_RANGES:
        return None
    ranges = []
    for spec in specs:
        match = _RANGE_SPEC.fullmatch(spec)
        if match is None:
            return None
        first, last, suffix = match.groups()
        if suffix is not None:  # the last `suffix` bytes
            if int(suffix) > 0 and size > 0:
                ranges.append((max(0, size - int(suffix)), size - 1))
            continue
        if last and int(last) < int(first):
            return None  # invalid per RFC 9110 14.1.1, not unsatisfiable
        if int(first) < size:
            ranges.append((int(first), min(int(last), size - 1) if last else size - 1))
    return ranges


class RangedFile(FileResponse):
    """A `FileResponse` that serves `range_header` (already judged: see `file_response`) in place of the
    request's own `Range`; the whole file when it is None."""

    range_header: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(name, value) for name, value in scope["headers"] if name not in (b"range", b"if-range")]
        if self.range_header is not None:
            headers.append((b"range", self.range_header.encode("latin-1")))
        await super().__call__({**scope, "headers": headers}, receive, send)


def file_response(request: Request, response: RangedFile, size: int) -> Response:
    """`response` (built with the file's `stat_result`, so it carries its ETag) set to answer `request`'s
    Range; a 304 when `If-None-Match` names the file's current ETag (the client has it); ApiError 416 when
    no range the client asked for lies in the file's `size` bytes."""
    if _none_match_fails(request.headers.get("if-none-match"), response.headers.get("etag")):
        keep = ("etag", "last-modified", "cache-control")
        return Response(status_code=304, headers={k: v for k, v in response.headers.items() if k in keep})
    header = request.headers.get("range")
    if header is None or not _if_range_holds(request.headers.get("if-range"), response):
        return response
    ranges = satisfiable_ranges(header, size)
    if ranges is None:
        return response
    if not ranges:
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"Range {header!r}: no range of it lies within the video's {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    response.range_header = "bytes=" + ",".join(f"{first}-{last}" for first, last in ranges)
    return response


def _none_match_fails(if_none_match: str | None, etag: str | None) -> bool:
    """Whether `If-None-Match` names the current ETag (or is `*`): RFC 9110 13.1.2, weak comparison."""
    if if_none_match is None or etag is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag.removeprefix("W/") in tags


def _if_range_holds(if_range: str | None, response: FileResponse) -> bool:
    """Whether the Range applies: no `If-Range`, or one naming this file's current ETag or date (a weak
    ETag never matches, RFC 9110 13.1.5)."""
    if if_range is None:
        return True
    if if_range.startswith("W/"):
        return False
    return if_range in (response.headers.get("etag"), response.headers.get("last-modified"))

"""Every error the server returns is JSON: `{"error": "...", "status": N, ...}`, never aiohttp's HTML."""
from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def json_error(status: int, message: str, headers: dict[str, str] | None = None,
               **extra: Any) -> web.Response:
    return web.json_response({"error": message, "status": status, **extra}, status=status,
                             headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return json_error(exc.status, exc.message, exc.headers, **exc.extra)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_error(413, f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return json_error(exc.status, exc.reason, headers)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal server error")


DEFAULT_JSON_LIMIT = 16 * 1024
BODY_LIMIT = web.RequestKey("body_limit", int)  # the route's body cap, set by the access middleware


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, read in chunks and refused (413) as soon as it passes `limit` bytes, whatever the
    Content-Length said (a chunked body has none)."""
    data = bytearray()
    while chunk := await request.content.read(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"request body over this route's {limit} byte limit", limit_bytes=limit)
    return bytes(data)


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it. The body is
    capped (413) before it is parsed: the route's cap set by the access middleware, else 16 KB."""
    limit = request.get(BODY_LIMIT, DEFAULT_JSON_LIMIT)
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object")
    return body


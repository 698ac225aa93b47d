"""Every error the server returns is JSON: `{"error": "...", "status": N, ...}`, never aiohttp's HTML."""
from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import ClientPayloadError, web

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
    except (ConnectionResetError, ClientPayloadError) as exc:
        if not _client_gone(request):
            log.exception("%s %s failed", request.method, request.path)
            return json_error(500, "internal server error")
        # The client went away mid-request (a body aborted mid-read): nothing to answer and nothing
        # wrong here, so no ERROR and no traceback that a stranger could repeat to fill the log.
        log.debug("%s %s: client gone (%s)", request.method, request.path, type(exc).__name__)
        return json_error(400, "the request was aborted by the client")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal server error")


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


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


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it. The body is
    capped (413) before it is parsed: the route's cap set by the access middleware, else 16 KB."""
    limit = request.get(BODY_LIMIT, DEFAULT_JSON_LIMIT)
    return parse_json_object(await read_body(request, limit))


def parse_json_object(raw: bytes | str) -> dict[str, Any]:
    """`raw` as a JSON object, or ApiError(400) naming the problem: the one parser of client JSON (HTTP
    bodies and WebSocket commands). Nesting deeper than Python's recursion limit (a body of 2 000 `[`)
    raises RecursionError inside the json module: that is malformed input too, not a server error."""
    try:
        body = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object")
    return body


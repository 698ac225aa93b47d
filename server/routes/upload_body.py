"""Reading an upload's body: whole, capped, in time and at a minimum rate, before any slot is taken.

Every upload route (`POST /sessions/{id}/audio` raw PCM, media file or multipart form, and
`POST /avatars`) reads its body through `receive`, so:
- every byte counts against the cap (`--max-upload-mb`), a multipart form's boundaries, headers and
  non-file fields included; a chunked body with no Content-Length is counted as it arrives (413);
- the whole body must arrive within `--upload-timeout` (408);
- after a short grace it must keep up `--min-upload-rate` on average (408): a sender that declares a
  large body, sends a header and stalls is dropped in seconds, not at the deadline;
- only then does the handler take a decode slot (server/access/limits.py), so a slow sender holds a
  connection and the bytes it actually sent, never a slot that other sessions need.
A multipart form is parsed from the bytes received (`form_parts`): a small, bounded parser (parts,
header sizes) instead of aiohttp's streaming reader, whose skipped parts were read outside the cap.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from email.message import Message
from typing import Callable, Protocol

from aiohttp import web
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from server.errors import BODY_LIMIT, ApiError
from server.state import state_of

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
GRACE_S = 5.0  # TCP slow start, a client that computes before it sends: the rate counts after this
MAX_PARTS = 16  # a form with more parts than this is not one of ours
MAX_PART_HEADERS = 8 * 1024
KB = 1024


@dataclass(frozen=True)
class BodyPolicy:
    """The rules one upload's body is read under."""

    limit_bytes: int
    deadline_s: float  # the whole body
    min_rate_bps: float  # average bytes per second after GRACE_S
    grace_s: float = GRACE_S

    def wait_until(self, start: float, received: int) -> float:
        """The loop time by which the next byte must have arrived."""
        by_rate = start + self.grace_s + (received + 1) / self.min_rate_bps
        return min(start + self.deadline_s, by_rate)


def upload_policy(request: web.Request) -> BodyPolicy:
    """The rules of every upload route: the route's cap (the access middleware sets it from
    --max-upload-mb), --upload-timeout for the whole body, --min-upload-rate after the grace."""
    config = state_of(request).config
    return BodyPolicy(request.get(BODY_LIMIT, config.max_upload_bytes), config.upload_timeout_s,
                      config.min_upload_rate_kb * KB)


async def receive(request: web.Request, policy: BodyPolicy, sink: Callable[[bytes], object]) -> int:
    """Feed the body to `sink` chunk by chunk under `policy`; returns its size. 413 past the cap, 408
    when it is too slow or late, 400 when the client cut it off."""
    if request.content_length is not None and request.content_length > policy.limit_bytes:
        raise _too_large(request.content_length, policy.limit_bytes)
    loop = asyncio.get_running_loop()
    start = loop.time()
    received = 0
    while True:
        try:
            async with asyncio.timeout_at(policy.wait_until(start, received)):
                chunk = await request.content.read(CHUNK)
        except TimeoutError:
            raise _too_slow(policy, received, loop.time() - start) from None
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise ApiError(400, f"the upload was cut off after {received} bytes ({type(exc).__name__})") from None
        if not chunk:
            return received
        received += len(chunk)
        if received > policy.limit_bytes:
            raise _too_large(received, policy.limit_bytes)
        sink(chunk)


async def read_all(request: web.Request, policy: BodyPolicy) -> bytes:
    data = bytearray()
    await receive(request, policy, data.extend)
    return bytes(data)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"upload larger than {limit / KB / KB:g} MB ({size} bytes or more; the limit is "
                         f"{limit} bytes)", limit_bytes=limit)


def _too_slow(policy: BodyPolicy, received: int, elapsed: float) -> ApiError:
    if elapsed >= policy.deadline_s - 0.05:
        message = f"the upload did not arrive within {policy.deadline_s:g} s ({received} bytes came)"
    else:
        message = (f"the upload arrived slower than {policy.min_rate_bps / KB:g} KB/s ({received} bytes "
                   f"in {elapsed:.1f} s)")
    return ApiError(408, message, received_bytes=received)


# -- multipart/form-data ---------------------------------------------------------------------------


class Buffer(Protocol):
    """bytes, or an mmap of a body spooled to a file."""

    def find(self, sub: bytes, start: int = ..., end: int = ...) -> int: ...

    def __getitem__(self, index: slice) -> bytes: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class FormPart:
    name: str | None
    filename: str | None
    start: int  # the content's offsets in the body
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def boundary_of(content_type: str) -> str:
    """The boundary of a multipart Content-Type header; 400 when it has none."""
    message = Message()
    message["Content-Type"] = content_type
    boundary = message.get_boundary()
    if not boundary or len(boundary) > 70:  # RFC 2046: 1..70 characters
        raise ApiError(400, "multipart body without a valid boundary parameter")
    return boundary


def form_parts(body: Buffer, content_type: str) -> list[FormPart]:
    """The parts of a multipart/form-data body, as offsets into it (nothing is copied). 400 when it
    is malformed, has more than MAX_PARTS parts or a part's headers over MAX_PART_HEADERS bytes."""
    delimiter = b"--" + boundary_of(content_type).encode("latin-1")
    first = body.find(delimiter)
    if first < 0 or (first > 0 and body[first - 2:first] != b"\r\n"):
        raise ApiError(400, "malformed multipart body: no opening boundary")
    parts: list[FormPart] = []
    pos = first + len(delimiter)
    while True:
        if body[pos:pos + 2] == b"--":
            return parts
        if body[pos:pos + 2] != b"\r\n":
            raise ApiError(400, "malformed multipart body: a boundary is not followed by a line break")
        if len(parts) >= MAX_PARTS:
            raise ApiError(400, f"multipart body with more than {MAX_PARTS} parts")
        head_end = body.find(b"\r\n\r\n", pos + 2, pos + 2 + MAX_PART_HEADERS)
        if head_end < 0:
            raise ApiError(400, f"malformed multipart body: a part's headers are missing or over "
                                f"{MAX_PART_HEADERS} bytes")
        headers = body[pos + 2:head_end]
        start = head_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise ApiError(400, "malformed multipart body: no closing boundary")
        name, filename = _disposition(headers)
        parts.append(FormPart(name, filename, start, end))
        pos = end + 2 + len(delimiter)


def _disposition(headers: bytes) -> tuple[str | None, str | None]:
    """(name, filename) from a part's Content-Disposition; (None, None) without one."""
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        _kind, params = parse_content_disposition(value.decode("utf-8", errors="replace").strip())
        return params.get("name"), content_disposition_filename(params, "filename")
    return None, None

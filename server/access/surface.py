"""What every public answer may show: response headers against framing and sniffing, and no absolute
paths or versions in bodies.

- `add_security_headers` (on_response_prepare, so it covers the page, static files, JSON, errors and
  WebSocket upgrades): the page cannot be framed (`Content-Security-Policy: frame-ancestors 'none'` and
  `X-Frame-Options: DENY`, against clickjacking the Start / microphone button), loads nothing but its
  own scripts, styles and images and connects only to its own origin (a full CSP: the page has no
  inline script or style), no MIME sniffing, no Referer with a session path beyond this origin, and a
  `Server` header without the Python and aiohttp versions (aiohttp only sets its own when none is set;
  `hide_server_version` covers the answers aiohttp makes itself).
- `public_text`: a message with every absolute path reduced to its last part (an avatar file's error
  in GET /avatars, an engine fact in /healthz): where the server keeps its files is nobody's business.
"""
from __future__ import annotations

import re
from typing import Mapping

from aiohttp import web, web_response

SERVER_NAME = "lipsync"
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "media-src 'self' blob: mediastream:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Server": SERVER_NAME,
}


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value


def hide_server_version() -> None:
    """Answers no handler made (aiohttp's own 400 for a request line it cannot parse) bypass
    on_response_prepare and get aiohttp's default `Server: Python/3.x aiohttp/3.y`; that default is a
    module constant read per response, and the only place to change it. Process-wide and idempotent
    (tests/test_public_surface.py checks it still takes effect)."""
    web_response.SERVER_SOFTWARE = SERVER_NAME


# An absolute POSIX path (a run of /segment, at least two) or a Windows one (C:\...), not inside a URL.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:\\|/)(?:[^\s/\\'\"]+[/\\])+([^\s/\\'\"]*)")


def public_text(text: str) -> str:
    """`text` with each absolute path replaced by its last part ('/srv/avatars/x.mp4' -> 'x.mp4')."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "...", text)

"""Who may call what: the server's one access policy, applied by one aiohttp middleware.

Every route falls in one of three classes, decided here from the route's template alone, so a route a
later change adds is covered without touching its handler:

- PUBLIC: the page, its static files, `/healthz`, `/config`, `POST /offer`, `GET /avatars[/{id}]` and
  `GET /avatars/{id}/poster.jpg`.
- SESSION: any route under `/sessions/{id}/...` (and `/sessions/{id}` itself). It needs that
  session's `session_token` (handed out once, in the /offer answer) or the operator token, as
  `Authorization: Bearer TOKEN`. The WebSocket and EventSource routes (QUERY_TOKEN_ROUTES: browsers
  cannot set headers there) may pass the session's token as `?token=`; no other route reads `?token=`,
  and the operator token is never read from a URL (URLs end up in proxy logs and scrape configs).
  No credential: 401. Another session's token: 403.
- OPERATOR: everything else (`GET /sessions`, `/metrics`, `POST /avatars`, `DELETE /avatars/{id}`,
  and, by default, any route not listed): the operator token (`--api-token`). Bound to loopback
  without one, or with `--no-auth`, operator routes are open.

The same middleware also enforces the cross-site rules and per-route body caps (before the handler
parses anything): a foreign `Origin` gets 403 unless listed in `--allowed-origin`; on a loopback bind a
`Host` other than localhost / 127.0.0.1 / [::1] gets 403 (DNS rebinding), and wherever operator routes
are open without a token (`--no-auth` on any bind) a `Host` that is neither an IP address, a loopback
name nor the host of an `--allowed-origin` gets 403 (a rebound name would reach them); JSON routes need
`Content-Type: application/json` (415) and bodies over the route's cap get 413.

To add a route: a session's route needs nothing (its template starts with `/sessions/{id}`); a public
one gets a row in PUBLIC_ROUTES; a JSON body gets a row in BODY_RULES (the default cap is 16 KB).
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import secrets
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware

from server.config import ServerConfig
from server.errors import BODY_LIMIT, ApiError, Handler
from server.ice import is_loopback

log = logging.getLogger(__name__)

KB = 1024


class Access(Enum):
    PUBLIC = "public"
    SESSION = "session"
    OPERATOR = "operator"


class Body(Enum):
    NONE = "none"  # no body expected: capped at the JSON cap, any content type
    JSON = "json"  # application/json, parsed by read_json within the cap
    UPLOAD = "upload"  # media; the handler streams it within --max-upload-mb


@dataclass(frozen=True)
class BodyRule:
    kind: Body
    max_bytes: int | None  # None: the server's --max-upload-mb


JSON_CAP = 16 * KB
SESSION_PREFIX = "/sessions/{id}"

# (method, route template) -> PUBLIC. HEAD follows GET. Anything else not under SESSION_PREFIX is
# OPERATOR: a forgotten route fails closed.
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/"),
    ("GET", "/static"),  # the page's files (one prefix resource)
    ("GET", "/healthz"),
    ("GET", "/config"),
    ("POST", "/offer"),
    ("GET", "/avatars"),
    ("GET", "/avatars/{id}"),
    ("GET", "/avatars/{id}/poster.jpg"),  # the page's avatar picker shows these to every visitor
})

BODY_RULES: dict[tuple[str, str], BodyRule] = {
    ("POST", "/offer"): BodyRule(Body.JSON, 64 * KB),
    ("POST", "/sessions/{id}/say"): BodyRule(Body.JSON, JSON_CAP),
    ("POST", "/sessions/{id}/audio"): BodyRule(Body.UPLOAD, None),
    ("POST", "/avatars"): BodyRule(Body.UPLOAD, None),
}
DEFAULT_BODY = BodyRule(Body.NONE, JSON_CAP)

# Browsers cannot set headers on a WebSocket or an EventSource: these routes alone take ?token=.
QUERY_TOKEN_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/sessions/{id}/stream"),
    ("GET", "/sessions/{id}/events"),
})

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
PREFLIGHT_HEADERS = {"Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                     "Access-Control-Allow-Headers": "Authorization, Content-Type",
                     "Access-Control-Max-Age": "600"}


def _hostname(host: str) -> str:
    """The name part of a Host header ('[::1]:8080' -> '::1'); '' when it does not parse."""
    try:
        return (urlsplit("//" + host).hostname or "").lower()
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return ""


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def access_for(method: str, template: str) -> Access:
    """The access class of a route, from its method and template (e.g. '/sessions/{id}/audio')."""
    method = "GET" if method == "HEAD" else method
    if template == SESSION_PREFIX or template.startswith(SESSION_PREFIX + "/"):
        return Access.SESSION
    if (method, template) in PUBLIC_ROUTES:
        return Access.PUBLIC
    return Access.OPERATOR


def body_rule(method: str, template: str) -> BodyRule:
    return BODY_RULES.get((method, template), DEFAULT_BODY)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same_secret(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; a missing side never matches."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class OperatorAuth:
    """The operator token in force. token None: operator routes are open (loopback or --no-auth)."""

    token: str | None
    generated: bool = False  # made at start because none was given: print it once

    @classmethod
    def from_config(cls, config: ServerConfig) -> "OperatorAuth":
        if config.api_token:
            return cls(config.api_token)
        if config.no_auth:
            log.warning("--no-auth: GET /sessions, /metrics and every session's routes with the "
                        "operator's rights are open to anyone who can reach %s", config.host)
            return cls(None)
        if is_loopback(config.host):
            return cls(None)
        return cls(new_token(), generated=True)


@dataclass(frozen=True)
class Credential:
    token: str | None
    in_query: bool = False  # from ?token=: only ever a session's token

    @classmethod
    def of(cls, request: web.Request, template: str) -> "Credential":
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return cls(value.strip())
        if (request.method, template) in QUERY_TOKEN_ROUTES and request.query.get("token"):
            return cls(request.query["token"], in_query=True)
        return cls(None)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, {"WWW-Authenticate": 'Bearer realm="lipsync"'})


class Guard:
    """The checks of one server, from its config; `middleware` applies them to every request."""

    def __init__(self, config: ServerConfig, operator: OperatorAuth, session_token_of) -> None:
        self.config = config
        self.operator = operator
        self._session_token_of = session_token_of  # session id -> its token, or None if unknown
        self._loopback = is_loopback(config.host)
        self._origins = frozenset(config.allowed_origins)
        self._origin_hosts = frozenset(_hostname(origin.partition("://")[2]) for origin in self._origins)

    # -- cross-site ---------------------------------------------------------------------------------

    def check_host(self, request: web.Request) -> None:
        """DNS rebinding: a loopback server answers only to loopback names."""
        if not self._loopback:
            self.check_open_operator_host(request)
            return
        if _hostname(request.host) not in LOOPBACK_HOSTS:
            raise ApiError(403, "this server is bound to loopback and answers only to localhost, "
                                "127.0.0.1 or [::1]")

    def check_open_operator_host(self, request: web.Request) -> None:
        """DNS rebinding beyond loopback: while operator routes are open without a token (--no-auth),
        a page of `evil.example`, rebound to this server's address, would be same-origin with them. It
        cannot make the browser send an IP address or one of our names as Host: only those pass."""
        if self.operator.token is not None:
            return
        host = _hostname(request.host)
        if host in LOOPBACK_HOSTS or host in self._origin_hosts or _is_ip_literal(host):
            return
        raise ApiError(403, "operator routes are open without a token (--no-auth): this server answers "
                            "only to an IP address or a name listed with --allowed-origin "
                            "http(s)://NAME[:PORT], not to Host " + repr(host[:80]))

    def check_origin(self, request: web.Request) -> None:
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser's cross-site request (curl, a backend, same-origin GET)
            return
        origin = origin.rstrip("/").lower()
        if origin in self._origins:
            return
        scheme, _, netloc = origin.partition("://")
        if scheme in ("http", "https") and netloc == request.host.lower():
            return
        raise ApiError(403, "cross-origin request refused: start the server with --allowed-origin "
                            "ORIGIN to let that site's pages call it")

    def _listed_origin(self, request: web.Request) -> str | None:
        origin = request.headers.get("Origin", "").rstrip("/").lower()
        return origin if origin in self._origins else None

    async def add_cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: pages of an --allowed-origin site may read the responses (no cookies
        are involved: credentials are bearer tokens the page holds)."""
        origin = self._listed_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    # -- credentials --------------------------------------------------------------------------------

    def check_access(self, request: web.Request, template: str) -> None:
        access = access_for(request.method, template)
        if access is Access.PUBLIC:
            return
        credential = Credential.of(request, template)
        is_operator = not credential.in_query and same_secret(credential.token, self.operator.token)
        if access is Access.OPERATOR:
            if self.operator.token is None or is_operator:
                return
            if credential.token is None:
                raise _unauthorized("this route needs the operator token: Authorization: Bearer TOKEN "
                                    "(never ?token=, which ends up in logs)")
            raise ApiError(403, "wrong operator token")
        if is_operator:
            return
        if credential.token is None:
            raise _unauthorized("this session's routes need its session_token (from the /offer "
                                "answer): Authorization: Bearer TOKEN, or ?token= on its /stream "
                                "WebSocket and /events EventSource only")
        expected = self._session_token_of(request.match_info.get("id", ""))
        if expected is None:
            raise ApiError(404, f"no session {request.match_info.get('id', '')!r}")
        if not same_secret(credential.token, expected):
            raise ApiError(403, "this token does not belong to this session")

    # -- bodies -------------------------------------------------------------------------------------

    def check_body(self, request: web.Request, template: str) -> None:
        rule = body_rule(request.method, template)
        cap = self.config.max_upload_bytes if rule.max_bytes is None else rule.max_bytes
        request[BODY_LIMIT] = cap
        length = request.content_length
        if length is not None and length > cap:
            raise ApiError(413, f"request body of {length} bytes is over this route's {cap} byte limit",
                           limit_bytes=cap)
        if rule.kind is Body.JSON and request.content_type != "application/json":
            raise ApiError(415, "this route takes Content-Type: application/json")

    # -- the middleware -----------------------------------------------------------------------------

    @property
    def middleware(self) -> Middleware:
        @web.middleware
        async def access_policy(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self.apply(request, handler)

        return access_policy

    async def apply(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.check_host(request)
        self.check_origin(request)
        if request.method == "OPTIONS" and self._listed_origin(request):
            return web.Response(status=204, headers=PREFLIGHT_HEADERS)  # CORS preflight of a listed site
        match = request.match_info
        if match.http_exception is not None:  # no such route / method: the handler answers 404 / 405
            return await handler(request)
        template = match.route.resource.canonical if match.route.resource is not None else request.path
        self.check_access(request, template)
        self.check_body(request, template)
        return await handler(request)


_TOKEN_IN_QUERY = re.compile(r"(^|&)(token=)[^&]*", re.IGNORECASE)


def redact_query(query_string: str) -> str:
    """A query string with every `token=` value replaced, for logs."""
    return _TOKEN_IN_QUERY.sub(r"\1\2REDACTED", query_string)


class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp's access log line without secrets: `?token=` values are redacted, headers never logged."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        target = request.path
        if request.query_string:
            target += "?" + redact_query(request.query_string)
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %s %.3fs', request.remote, request.method, target,
                         request.version.major, request.version.minor, response.status,
                         response.body_length, time)

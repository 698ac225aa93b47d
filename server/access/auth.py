"""Who may call what: the server's one access policy, applied by one aiohttp middleware.

Every route falls in one of three classes, decided here from the route's template alone, so a route a
later change adds is covered without touching its handler:

- PUBLIC: the page, its static files, `/healthz`, `/config`, `/ice-servers`, `POST /offer`, `GET /avatars[/{id}]` and
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
from typing import Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware
from aiohttp_remotes import XForwardedFiltered
from aiohttp_remotes.exceptions import RemoteError
from multidict import MultiMapping

from server.config import ServerConfig
from server.errors import BODY_LIMIT, ApiError, Handler
from server.network.ice import is_loopback

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
    ("GET", "/ice-servers"),  # rate-limited per address with the offers (server/app.py)
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


# -- behind a proxy: the client's address and the public name ---------------------------------------

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
CLIENT_ADDRESS = web.RequestKey("client_address", str)
CLIENT_SCHEME = web.RequestKey("client_scheme", str)
DEFAULT_PORTS = {"http": 80, "https": 443}


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a forwarded `for=` value: '192.0.2.1', '192.0.2.1:4711', '[2001:db8::1]:4711'."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class ForwardedClients:
    """Who the client is when a reverse proxy stands between: `--trusted-proxy` addresses only.

    From a peer that is not a trusted proxy, every forwarded header is ignored: its own address is the
    client's. From a trusted proxy, X-Forwarded-For (parsed by aiohttp-remotes) or, when absent,
    RFC 7239 `Forwarded` (parsed by aiohttp) is read from the right, skipping trusted proxies: the
    right-most untrusted entry is the client (entries left of it were written by the client and prove
    nothing). Only the header the proxy itself sets can be believed, so the proxy must set X-Forwarded-For
    (nginx: `$proxy_add_x_forwarded_for`) and clear `Forwarded` (deploy/nginx.conf does both).
    """

    def __init__(self, trusted: Iterable[str]) -> None:
        self.trusted: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(t, strict=False) for t in trusted)
        self._xff = XForwardedFiltered(list(self.trusted))

    def is_trusted(self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        ip = _ip(address) if isinstance(address, str) else address
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.trusted)

    def resolve(self, request: web.Request) -> tuple[str, str]:
        """(client address, scheme the client used)."""
        peer = request.remote or ""
        if not self.trusted or not self.is_trusted(peer):
            return peer, request.scheme
        client = self._rightmost_untrusted(peer, self._forwarded_chain(request))
        proto = request.headers.get("X-Forwarded-Proto", "").partition(",")[0].strip().lower()
        if not proto and request.forwarded:
            proto = str(request.forwarded[0].get("proto", "")).lower()
        return client, proto if proto in ("http", "https") else request.scheme

    def client_of(self, peer: str, headers: MultiMapping[str]) -> str:
        """The client behind `peer` from X-Forwarded-For alone, for code that sees raw headers and no
        request (the worker supervisor, server/ops/workers.py). A malformed header, or a proxy that sent only
        `Forwarded`, leaves the peer: the proxy's address, one key for all its visitors (stricter, never
        looser, than what the worker will decide)."""
        if not self.trusted or not self.is_trusted(peer):
            return peer
        try:
            chain = list(self._xff.get_forwarded_for(headers))
        except (RemoteError, web.HTTPBadRequest):
            return peer
        return self._rightmost_untrusted(peer, chain)

    def _rightmost_untrusted(self, peer: str, chain: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str:
        client = peer
        for ip in reversed(chain):
            client = str(ip)
            if not self.is_trusted(ip):
                break
        return client

    def _forwarded_chain(self, request: web.Request) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        try:
            xff = self._xff.get_forwarded_for(request.headers)
        except (RemoteError, web.HTTPBadRequest):
            raise ApiError(400, "malformed X-Forwarded-For from the proxy") from None
        if xff:
            return list(xff)
        chain: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for element in request.forwarded:
            ip = _ip(str(element.get("for", "")))
            if ip is None:  # 'unknown' or an obfuscated name: nothing to the left can be attributed
                chain = []
                continue
            chain.append(ip)
        return chain


def client_address(request: web.BaseRequest) -> str:
    """The address per-address limits, logs and metrics use: the peer, or, behind a trusted proxy, the
    client it names (set by `Guard.apply` before any handler runs)."""
    return request.get(CLIENT_ADDRESS) or request.remote or ""


def public_origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or URL, default port filled in; None when it does not parse."""
    try:
        parts = urlsplit(url.strip().rstrip("/").lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def _host_port(host: str, scheme: str) -> tuple[str, int] | None:
    """(name, port) of a Host header as seen by a client on `scheme`."""
    origin = public_origin(f"{scheme}://{host}")
    return None if origin is None else (origin[1], origin[2])


def reachable_beyond_loopback(config: ServerConfig) -> bool:
    """A loopback bind is no trust boundary behind a same-host proxy: with a public name or a trusted
    proxy the server is reachable from the internet, so operator routes need a token."""
    return not is_loopback(config.host) or bool(config.public_urls) or bool(config.trusted_proxies)


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
        if not reachable_beyond_loopback(config):
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

    def __init__(self, config: ServerConfig, operator: OperatorAuth,
                 session_token_of: Callable[[str], str | None]) -> None:
        self.config = config
        self.operator = operator
        self._session_token_of = session_token_of  # session id -> its token, or None if unknown
        self._loopback = is_loopback(config.host)
        self._origins = frozenset(config.allowed_origins)
        self._origin_hosts = frozenset(_hostname(origin.partition("://")[2]) for origin in self._origins)


        self._public = frozenset(o for o in map(public_origin, config.public_urls) if o is not None)
        self.clients = ForwardedClients(config.trusted_proxies)

    # -- cross-site ---------------------------------------------------------------------------------

    def check_host(self, request: web.Request) -> None:
        """DNS rebinding: a loopback server answers only to loopback names."""
        if not self._loopback:
            self.check_open_operator_host(request)
            return
        if _hostname(request.host) in LOOPBACK_HOSTS or self.is_public_host(request):
            return
        raise ApiError(403, "this server is bound to loopback and answers only to localhost, "
                            "127.0.0.1, [::1] or a --public-url name")

    def is_public_host(self, request: web.Request) -> bool:
        """The Host names a --public-url (name and port, the port defaulted from that URL's scheme)."""
        return any(_host_port(request.host, scheme) == (host, port) for scheme, host, port in self._public)

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
        if origin in self._origins or public_origin(origin) in self._public:
            return
        if self._public and self.is_public_host(request):
            raise ApiError(403, "cross-origin request refused: the Origin is not this server's --public-url")
        scheme, _, netloc = origin.partition("://")
        # Same origin. Behind a trusted proxy that says which scheme the client used, it must match too.
        forwarded_scheme = request.get(CLIENT_SCHEME, request.scheme)
        if scheme in ("http", "https") and netloc == request.host.lower() and (
                forwarded_scheme == request.scheme or scheme == forwarded_scheme):
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
        request[CLIENT_ADDRESS], request[CLIENT_SCHEME] = self.clients.resolve(request)
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
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %s %.3fs', client_address(request), request.method, target,
                         request.version.major, request.version.minor, response.status,
                         response.body_length, time)

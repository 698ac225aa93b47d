"""ICE settings: the RTCConfiguration every peer connection gets, and which host addresses aioice offers.

aiortc falls back to a public STUN server when a configuration names none; we always pass our own list
(empty by default), so a server never talks to a third party unless told to with `--ice-server`.

aioice gathers host candidates from `aioice.ice.get_host_addresses`, which skips loopback. A local
server (or a test inside a loopback-only network namespace) needs 127.0.0.1 offered, and a deployment
may want to offer only some interfaces; `use_host_addresses` installs that policy process-wide.

TURN without giving a password away: with `--turn-secret` and `--turn-url`, `GET /ice-servers` (which
the page calls just before its offer, under the same per-address rate limit as offers) hands out
credentials in the TURN REST scheme that coturn checks with `use-auth-secret` / `static-auth-secret`:
username `<unix expiry>:<ticket>`, credential base64(HMAC-SHA1(secret, username)). They stop working at
the expiry (`--turn-ttl`, 10 minutes by default; coturn checks it at allocation and at every refresh),
so a visitor cannot hand out a lasting relay. The ticket is random and logged with the client address
it went to, so a relay in coturn's log can be tied to a client and blocked. The server's own peer
connections take no TURN allocation (server/routes/signaling.py says why).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from typing import Any, Callable, Iterable

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from server.config import IceServer, ServerConfig

log = logging.getLogger(__name__)

_system_host_addresses = aioice.ice.get_host_addresses


def rtc_configuration(servers: Iterable[IceServer]) -> RTCConfiguration:
    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=s.url, username=s.username, credential=s.credential) for s in servers
    ])


def turn_rest_credentials(secret: str, ttl_s: float, ticket: str,
                          now: float | None = None) -> tuple[str, str]:
    """(username, credential) valid until now + ttl_s, as coturn's use-auth-secret expects."""
    if not ticket or ":" in ticket:
        raise ValueError(f"TURN ticket {ticket!r}: non-empty, without ':'")
    expiry = int((time.time() if now is None else now) + ttl_s)
    username = f"{expiry}:{ticket}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def new_ticket() -> str:
    return secrets.token_hex(6)


def ice_servers(config: ServerConfig, ticket: str | None = None) -> list[IceServer]:
    """The STUN/TURN servers for one peer connection: --ice-server entries plus, with --turn-secret and a
    ticket, the --turn-url servers with fresh short-lived credentials issued under that ticket."""
    servers = list(config.ice_servers)
    if config.turn_secret and config.turn_urls and ticket is not None:
        username, credential = turn_rest_credentials(config.turn_secret, config.turn_ttl_s, ticket)
        servers += [IceServer(url=url, username=username, credential=credential) for url in config.turn_urls]
    return servers


def client_ice_servers(config: ServerConfig, ticket: str | None = None) -> list[dict[str, Any]]:
    """The browser's RTCIceServer list: for /config without a ticket (no TURN credentials), for
    /ice-servers with one."""
    return [server.to_json() for server in ice_servers(config, ticket)]


def use_host_addresses(addresses: Iterable[str], *, add_loopback: bool = False) -> Callable[[], None]:
    """Make aioice offer exactly `addresses` (or, if empty, every interface plus loopback when
    `add_loopback`). Returns a function that restores aioice's own behaviour."""
    fixed = [str(ipaddress.ip_address(a)) for a in addresses]

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        found = list(fixed) if fixed else _system_host_addresses(use_ipv4, use_ipv6)
        if not fixed and (add_loopback or not found):
            found.append("127.0.0.1")
        return [a for a in found if (use_ipv4 if ipaddress.ip_address(a).version == 4 else use_ipv6)]

    previous = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = host_addresses

    def restore() -> None:
        aioice.ice.get_host_addresses = previous

    return restore


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

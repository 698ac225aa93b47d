"""ICE settings: the RTCConfiguration every peer connection gets, and which host addresses aioice offers.

aiortc falls back to a public STUN server when a configuration names none; we always pass our own list
(empty by default), so a server never talks to a third party unless told to with `--ice-server`.

aioice gathers host candidates from `aioice.ice.get_host_addresses`, which skips loopback. A local
server (or a test inside a loopback-only network namespace) needs 127.0.0.1 offered, and a deployment
may want to offer only some interfaces; `use_host_addresses` installs that policy process-wide.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Callable, Iterable

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from server.config import IceServer

log = logging.getLogger(__name__)

_system_host_addresses = aioice.ice.get_host_addresses


def rtc_configuration(servers: Iterable[IceServer]) -> RTCConfiguration:
    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=s.url, username=s.username, credential=s.credential) for s in servers
    ])


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

"""The server's event loop: uvloop (the default) or asyncio's own, with the UDP port range mixed in.

Every session's media runs on the loop: each RTP packet's datagram send, each track's pacing timer, each
encode's hop to the executor and back (`call_soon_threadsafe`), DTLS and ICE reads. asyncio's selector
loop does that bookkeeping in Python (`_run_once`, the selector, the datagram transport's `sendto`);
uvloop does it in libuv and Cython, on the same asyncio API, so aiortc, aioice and aiohttp run on it
unchanged. What it saves per session is in bench/RESULTS.md "Event loop".

`--event-loop asyncio` keeps the standard library's loop: for a platform without uvloop (Windows), or
to rule the loop out when chasing a problem. The tests run the servers they start on the loop this
module makes (tests/conftest.py), so what passes there is what serves.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from server.network.udp_ports import PortRange

LOOPS = ("uvloop", "asyncio")
DEFAULT_LOOP = LOOPS[0]


def _loop_class(kind: str) -> type[asyncio.AbstractEventLoop]:
    if kind == "asyncio":
        return asyncio.SelectorEventLoop
    if kind == "uvloop":
        import uvloop  # not on Windows: ServerConfig.validate says so before anything starts

        return uvloop.Loop
    raise ValueError(f"--event-loop {kind!r}: expected one of {', '.join(LOOPS)}")


def loop_factory(kind: str = DEFAULT_LOOP, ports: tuple[int, int] | None = None
                 ) -> Callable[[], asyncio.AbstractEventLoop]:
    """What `asyncio.Runner(loop_factory=...)` needs for the server's loop of `kind` ("uvloop" or
    "asyncio"); with `ports`, "any port" UDP endpoints (ICE host candidates) bind inside that range."""
    base = _loop_class(kind)
    if ports is None:
        return base
    cls = type(f"PortRange{base.__name__}", (PortRange, base), {})
    span = ports

    def make() -> asyncio.AbstractEventLoop:
        loop = cls()
        assert isinstance(loop, PortRange)
        loop.ports = span
        return loop

    return make


def available(kind: str) -> bool:
    """Whether the loop `kind` can be made here (uvloop is not built for Windows)."""
    try:
        _loop_class(kind)
    except ImportError:
        return False
    return True

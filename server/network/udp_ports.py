"""A fixed UDP port range for WebRTC media (`--udp-ports 40000-40099`), for firewalls and NAT rules.

aioice binds each ICE host candidate with `loop.create_datagram_endpoint(local_addr=(address, 0))`.
The server's event loop (server/ops/event_loop.py) mixes in `PortRange` when a range is set: it hands
those "any port" requests a free port from the range instead, and leaves every other endpoint (TURN
clients, explicit ports) alone.
"""
from __future__ import annotations

import asyncio
import errno
import random
from typing import Any, Callable


def parse_port_range(text: str) -> tuple[int, int]:
    """'40000-40099' -> (40000, 40099); ValueError names the problem."""
    lo_text, sep, hi_text = text.strip().partition("-")
    try:
        lo, hi = int(lo_text), int(hi_text if sep else lo_text)
    except ValueError:
        raise ValueError(f"--udp-ports {text!r}: expected FIRST-LAST, e.g. 40000-40099") from None
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"--udp-ports {text!r}: ports must satisfy 1024 <= FIRST <= LAST <= 65535")
    return lo, hi


class PortRange(asyncio.AbstractEventLoop):
    """Mixed into an event loop class (asyncio's or uvloop's, server/ops/event_loop.py): "any port" datagram
    endpoints get a free port of `ports`. Set `ports` right after making the loop, before it runs."""

    ports: tuple[int, int]

    async def create_datagram_endpoint(
            self, protocol_factory: Callable[[], Any], local_addr: tuple[str, int] | str | None = None,
            remote_addr: tuple[str, int] | str | None = None, **kwargs: Any,
    ) -> tuple[asyncio.DatagramTransport, Any]:
        if not isinstance(local_addr, tuple) or local_addr[1] != 0:
            return await super().create_datagram_endpoint(protocol_factory, local_addr, remote_addr,
                                                          **kwargs)
        lo, hi = self.ports
        count = hi - lo + 1
        first = random.randrange(count)  # spread sessions over the range; fewer collisions on reuse
        for i in range(count):
            port = lo + (first + i) % count
            try:
                return await super().create_datagram_endpoint(
                    protocol_factory, (local_addr[0], port, *local_addr[2:]), remote_addr, **kwargs)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, f"no free UDP port in {lo}-{hi} on {local_addr[0]}")

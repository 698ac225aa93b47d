"""A user-space network impairment: a UDP relay that drops, delays, reorders and rate-limits datagrams.

This machine's kernel has no `netem`, so links are impaired here, between two UDP sockets on loopback.
It lives in `bench/` because both the network bench (`bench/network.py`) and the tests
(tests/test_netimpair.py, tests/test_network.py) use it; it imports nothing of the server.

Each direction of the relay is a `Link`: a pure function of (arrival time, datagram size, its seeded
random generator) to a delivery time or a drop, so the impairment is reproducible and testable in
simulated time. A link applies, in order:
- an outage window (`Link.outage(start, seconds)`): everything is dropped;
- random loss (`loss`, Bernoulli) and burst loss (`burst`: a Gilbert-Elliott chain, good/bad states);
- a rate limit (`rate_kbps`): a token bucket of `burst_bytes` feeding a FIFO whose queue is capped at
  `queue_ms` of transmission time (tail drop beyond it, as a router's buffer);
- a propagation delay `delay_ms` plus jitter (normal, `jitter_ms` standard deviation, clipped at
  +-2.5 sigma, never below 0). By default the link keeps order (a jittered packet never overtakes the
  one before it, as on a real path where jitter comes from queues); `reorder` is the probability that a
  packet is held back `reorder_ms` more, letting later ones overtake it.

`Relay` puts a link in each direction between two loopback sockets: `client_address` is what the client
is told is the server, `server_address` what the server is told is the client (bench/network.py
rewrites the ICE candidates of both SDPs to these, so every packet crosses the relay: neither side
knows the other's real port). The client's address is learned from its first datagram (datagrams from
any other source, a browser's other host candidates, are dropped, so ICE settles on one path); the
server's is given. Delivery is scheduled with `loop.call_at`: constant work per datagram, no queue scan.
An order-keeping link delivers through a FIFO per direction (one timer for its head): the event loop's
timer heap does not keep the order of timers due at the same instant, and an order-keeping link gives
a packet that a faster one follows the same delivery time, so scheduling each datagram on its own
reordered such runs (about every other video packet and a fifth of the audio at 30 +- 15 ms jitter).
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state burst loss: in the good state packets are lost with `loss_good`, in the bad state with
    `loss_bad`; each packet the chain moves good -> bad with `p_enter` and bad -> good with `p_leave`.
    Mean burst length 1 / p_leave packets; stationary share of bad packets p_enter / (p_enter + p_leave)."""

    p_enter: float
    p_leave: float
    loss_bad: float = 1.0
    loss_good: float = 0.0

    @property
    def mean_loss(self) -> float:
        bad = self.p_enter / (self.p_enter + self.p_leave)
        return bad * self.loss_bad + (1 - bad) * self.loss_good

    @staticmethod
    def for_loss(mean_loss: float, mean_burst: float) -> "GilbertElliott":
        """A chain losing every packet in the bad state, with the given mean loss and burst length."""
        p_leave = 1.0 / mean_burst
        return GilbertElliott(p_enter=p_leave * mean_loss / (1.0 - mean_loss), p_leave=p_leave)


@dataclass(frozen=True)
class Impairment:
    """What one direction of a link does to datagrams (all off by default: a clean link)."""

    loss: float = 0.0
    burst: GilbertElliott | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: float = 0.0
    reorder_ms: float = 20.0
    rate_kbps: float | None = None
    burst_bytes: int = 15000
    queue_ms: float = 200.0

    def __post_init__(self) -> None:
        for name in ("loss", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if min(self.delay_ms, self.jitter_ms, self.reorder_ms, self.queue_ms) < 0 or self.burst_bytes < 0:
            raise ValueError("delays, queue and burst sizes must be >= 0")
        if self.rate_kbps is not None and self.rate_kbps <= 0:
            raise ValueError("rate_kbps must be positive")


@dataclass
class LinkStats:
    received: int = 0
    bytes_received: int = 0
    forwarded: int = 0
    bytes_forwarded: int = 0
    dropped_outage: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    reordered: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_outage + self.dropped_loss + self.dropped_queue


class Link:
    """One direction: `admit(now, size)` -> the delivery time, or None when the datagram is dropped."""

    def __init__(self, impairment: Impairment | None = None, seed: int = 0) -> None:
        self.impairment = impairment or Impairment()
        self._rng = random.Random(seed)
        self._bad = False                 # Gilbert-Elliott state
        self._link_free_at = -math.inf    # when the rate-limited link has sent everything queued
        self._last_delivery = -math.inf   # keeps order under jitter
        self._outages: list[tuple[float, float]] = []
        self.stats = LinkStats()

    def set(self, impairment: Impairment) -> None:
        """Change the impairment from now on (the queue and burst state carry over)."""
        self.impairment = impairment

    def outage(self, start: float, seconds: float) -> None:
        """Drop everything arriving in [start, start + seconds) (same clock as `admit`'s `now`)."""
        self._outages = [o for o in self._outages if o[1] > start] + [(start, start + seconds)]

    def in_outage(self, now: float) -> bool:
        return any(a <= now < b for a, b in self._outages)

    def _lost(self) -> bool:
        imp = self.impairment
        if imp.burst is not None:
            ge = imp.burst
            self._bad = (self._rng.random() >= ge.p_leave) if self._bad else (self._rng.random() < ge.p_enter)
            if self._rng.random() < (ge.loss_bad if self._bad else ge.loss_good):
                return True
        return imp.loss > 0 and self._rng.random() < imp.loss

    def admit(self, now: float, size: int) -> float | None:
        imp = self.impairment
        self.stats.received += 1
        self.stats.bytes_received += size
        if self.in_outage(now):
            self.stats.dropped_outage += 1
            return None
        if self._lost():
            self.stats.dropped_loss += 1
            return None
        sent = now
        if imp.rate_kbps is not None:
            rate = imp.rate_kbps * 1000.0 / 8.0  # bytes per second
            # Token bucket: an idle link has saved up to burst_bytes of credit.
            start = max(self._link_free_at, now - imp.burst_bytes / rate)
            done = start + size / rate
            if done - now > imp.queue_ms / 1000.0:
                self.stats.dropped_queue += 1
                return None
            self._link_free_at = done
            sent = max(now, done)
        delay = imp.delay_ms / 1000.0
        if imp.jitter_ms > 0:
            sigma = imp.jitter_ms / 1000.0
            delay += max(-2.5 * sigma, min(2.5 * sigma, self._rng.gauss(0.0, sigma)))
        delivery = max(sent + max(delay, 0.0), sent)
        if imp.reorder > 0 and self._rng.random() < imp.reorder:
            self.stats.reordered += 1
            delivery += imp.reorder_ms / 1000.0   # held back; later packets may overtake it
        else:
            delivery = max(delivery, self._last_delivery)
            self._last_delivery = delivery
        self.stats.forwarded += 1
        self.stats.bytes_forwarded += size
        return delivery


Address = tuple[str, int]


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, relay: "Relay", side: str) -> None:
        self.relay, self.side = relay, side
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's transport

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._received(self.side, data, addr)


@dataclass
class RtpCounts:
    """RTP seen forwarded in one direction, by payload type (headers are clear under SRTP)."""

    packets: dict[int, int] = field(default_factory=dict)
    bytes: dict[int, int] = field(default_factory=dict)
    dropped: dict[int, int] = field(default_factory=dict)


def rtp_payload_type(data: bytes) -> int | None:
    """The payload type of an RTP datagram; None for RTCP, STUN, DTLS and anything else."""
    if len(data) < 12 or data[0] >> 6 != 2:
        return None
    pt = data[1] & 0x7F
    if 64 <= pt <= 95:  # RTCP packet types 192-223 with the marker bit (RFC 5761)
        return None
    return pt


class Relay:
    """Two loopback sockets and a `Link` each way. Directions: "up" (client -> server), "down"."""

    def __init__(self, server: Address | None = None, up: Impairment | None = None,
                 down: Impairment | None = None, seed: int = 0) -> None:
        self.server = server
        self.client: Address | None = None
        self.links = {"up": Link(up, seed), "down": Link(down, seed + 1)}
        self.rtp = {"up": RtpCounts(), "down": RtpCounts()}
        # Per direction, a test's own drop rule applied before the link (True: drop the datagram).
        self.filters: dict[str, Callable[[bytes], bool]] = {}
        self._client_side: _Endpoint | None = None
        self._server_side: _Endpoint | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Per direction, datagrams of an order-keeping link not yet delivered: (time, transport, data, to).
        self._fifo: dict[str, deque[tuple[float, asyncio.DatagramTransport, bytes, Address]]] = {
            "up": deque(), "down": deque()}

    async def start(self, host: str = "127.0.0.1") -> "Relay":
        self._loop = asyncio.get_running_loop()
        _, self._client_side = await self._loop.create_datagram_endpoint(
            lambda: _Endpoint(self, "client"), local_addr=(host, 0))
        _, self._server_side = await self._loop.create_datagram_endpoint(
            lambda: _Endpoint(self, "server"), local_addr=(host, 0))
        return self

    def close(self) -> None:
        for side in (self._client_side, self._server_side):
            if side is not None and side.transport is not None:
                side.transport.close()

    @property
    def client_address(self) -> Address:
        """Where the client sends (it takes this for the server)."""
        assert self._client_side is not None and self._client_side.transport is not None
        return self._client_side.transport.get_extra_info("sockname")[:2]

    @property
    def server_address(self) -> Address:
        """Where the server sends (it takes this for the client)."""
        assert self._server_side is not None and self._server_side.transport is not None
        return self._server_side.transport.get_extra_info("sockname")[:2]

    def set(self, direction: str, impairment: Impairment) -> None:
        self.links[direction].set(impairment)

    def set_both(self, impairment: Impairment) -> None:
        for link in self.links.values():
            link.set(impairment)

    def outage(self, seconds: float, directions: tuple[str, ...] = ("up", "down")) -> None:
        """Drop everything from now for `seconds` in the given directions."""
        assert self._loop is not None
        now = self._loop.time()
        for d in directions:
            self.links[d].outage(now, seconds)

    def _received(self, side: str, data: bytes, addr: Address) -> None:
        assert self._loop is not None
        if side == "client":
            if self.client is None:
                self.client = addr   # the first source only: one path, as a NAT would pin it
            elif addr != self.client:
                return               # a browser's other host candidates get no answer
            direction, out, to = "up", self._server_side, self.server
        else:
            direction, out, to = "down", self._client_side, self.client
        if to is None or out is None or out.transport is None:
            return
        now = self._loop.time()
        pt = rtp_payload_type(data)
        counts = self.rtp[direction]
        rule = self.filters.get(direction)
        link = self.links[direction]
        held_back = link.stats.reordered
        at = None if rule is not None and rule(data) else link.admit(now, len(data))
        if at is None:
            if pt is not None:
                counts.dropped[pt] = counts.dropped.get(pt, 0) + 1
            return
        if pt is not None:
            counts.packets[pt] = counts.packets.get(pt, 0) + 1
            counts.bytes[pt] = counts.bytes.get(pt, 0) + len(data)
        transport = out.transport
        if link.stats.reordered != held_back:   # held back on purpose: later datagrams may overtake it
            self._loop.call_at(at, _send, transport, data, to)
            return
        fifo = self._fifo[direction]
        if not fifo and at <= now:
            transport.sendto(data, to)
            return
        fifo.append((at, transport, data, to))
        if len(fifo) == 1:
            self._loop.call_at(at, self._drain, direction)

    def _drain(self, direction: str) -> None:
        """Deliver the head of a direction's FIFO and every datagram due with it, in arrival order."""
        assert self._loop is not None
        fifo = self._fifo[direction]
        now = self._loop.time()
        while fifo and fifo[0][0] <= now:
            _, transport, data, to = fifo.popleft()
            _send(transport, data, to)
        if fifo:
            self._loop.call_at(fifo[0][0], self._drain, direction)


def _send(transport: asyncio.DatagramTransport, data: bytes, to: Address) -> None:
    if not transport.is_closing():
        transport.sendto(data, to)


_CANDIDATE = re.compile(r"^a=candidate:(\S+) (\d+) (udp|UDP) (\d+) (\S+) (\d+) typ (\S+)(.*)$")


def rewrite_candidates(sdp: str, address: Address) -> tuple[str, Address | None]:
    """The SDP with every UDP candidate's address replaced by `address` (one per m-section: under BUNDLE
    the first section's transport carries everything) and TCP candidates removed; returns it and the
    first UDP candidate's real address."""
    lines: list[str] = []
    real: Address | None = None
    sections_done: set[int] = set()
    section = -1
    for line in sdp.splitlines():
        if line.startswith("m="):
            section += 1
        if line.startswith("a=candidate:"):
            m = _CANDIDATE.match(line)
            if m is None or section in sections_done:
                continue
            if real is None:
                real = (m.group(5), int(m.group(6)))
            sections_done.add(section)
            line = f"a=candidate:{m.group(1)} {m.group(2)} udp {m.group(4)} {address[0]} {address[1]} typ host"
        lines.append(line)
    return "\r\n".join(lines) + "\r\n", real


async def negotiate_through(relay: Relay, pc: RTCPeerConnection,
                            post_offer: Callable[[str], Awaitable[str]]) -> None:
    """Offer from `pc` (already given its transceivers), answered by `post_offer(sdp) -> answer sdp`, with
    both sides' candidates rewritten so every packet crosses `relay`."""
    await pc.setLocalDescription(await pc.createOffer())
    offer, _ = rewrite_candidates(pc.localDescription.sdp, relay.server_address)
    answer, server = rewrite_candidates(await post_offer(offer), relay.client_address)
    if server is None:
        raise ValueError("the answer has no UDP candidate")
    relay.server = server
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))


class MarkerJitterBuffer(JitterBuffer):
    """A client's video receive buffer that completes a frame at its last packet (the RTP marker bit), as
    a browser does. aiortc's own buffer completes a frame only when the next frame's first packet arrives,
    one frame period (40 ms) later, which no browser adds; a missing packet still holds the frame, and a
    frame whose marker was lost completes at the next timestamp as in aiortc."""

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        if self._origin is None:
            return None
        packets: list[RtpPacket] = []
        for count in range(self._capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                return None
            if packets and packet.timestamp != packets[0].timestamp:
                return self._take(packets, count)
            packets.append(packet)
            if packet.marker:
                return self._take(packets, count + 1)
        return None

    def _take(self, packets: list[RtpPacket], count: int) -> JitterFrame:
        self.remove(count)
        return JitterFrame(data=b"".join(p._data for p in packets),  # type: ignore[attr-defined]
                           timestamp=packets[0].timestamp)


class PerPacketAudioBuffer(JitterBuffer):
    """A client's audio receive buffer that hands each RTP packet (a whole Opus frame) on as it arrives, as
    a browser's NetEq plays it on a clean loopback. aiortc's own buffer, even with prefetch=1, completes a
    frame only when the *next* packet arrives (a packet with another timestamp), which delays every
    returned sound by one packet (20 ms) against the video. A missing packet holds the ones behind it."""

    def __init__(self, capacity: int = 16) -> None:
        super().__init__(capacity=capacity)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packet = None if self._origin is None else self._packets[self._origin % self._capacity]
        if packet is None:
            return None
        self.remove(1)
        return JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]


class GiveUpJitterBuffer(MarkerJitterBuffer):
    """The client's video receive buffer, as a browser's behaves (for the aiortc client of the tests and
    the bench): a frame is complete at its marker bit; a hole is waited for (NACK repairs it) for at
    most `give_up_s`; then the buffer gives up on it, drops what waits behind it (frames that need the
    missing data) and asks for a keyframe (PLI). aiortc's own buffer waits at a hole until 512 packets
    pile up behind it (seconds of frozen video after an outage) and only then asks."""

    def __init__(self, capacity: int = 512, give_up_s: float = 0.2) -> None:
        super().__init__(capacity=capacity, is_video=True)
        self.give_up_s = give_up_s
        self.gave_up = 0
        self._hole_since: float | None = None

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        pli, frame = super().add(packet)
        now = time.monotonic()
        if frame is not None or self._origin is None:
            self._hole_since = None
            return pli, frame
        # Packets keep coming but no frame completes: a hole holds them back.
        if self._hole_since is None:
            self._hole_since = now
            return pli, None
        if now - self._hole_since < self.give_up_s:
            return pli, None
        # Give up: everything before this packet goes; the keyframe asked for restarts the picture.
        self.remove(min((packet.sequence_number - self._origin) & 0xFFFF, self._capacity))
        self._hole_since = None
        self.gave_up += 1
        return True, None


def use_give_up_jitter_buffer(pc: RTCPeerConnection, give_up_s: float = 0.2) -> GiveUpJitterBuffer | None:
    """Give the video receiver of `pc` a `GiveUpJitterBuffer` (aiortc's private receiver buffer)."""
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "video":
            buffer = GiveUpJitterBuffer(give_up_s=give_up_s)
            transceiver.receiver._RTCRtpReceiver__jitter_buffer = buffer  # type: ignore[attr-defined]
            return buffer
    return None

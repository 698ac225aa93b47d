"""Video packets leave at a pace, so that a keyframe does not queue in front of the audio on a thin link.

aiortc's `RTCRtpSender._run_rtp` hands every RTP packet of an encoded frame to its transport
(`RTCDtlsTransport._send_rtp`) in one go, and `_retransmit` does the same for each NACKed packet: a
keyframe (5-10x a delta frame; libvpx's `max-intra-rate` bounds it to 3x only while the bitrate is capped)
is a burst of tens of packets within a millisecond. A link narrower than that burst queues it, and every
audio packet sent behind it waits its turn: on a 600 kbit/s link a 15 KB keyframe is 200 ms of queue,
which the receiver's audio jitter buffer conceals, and the frame behind it is late (docs/network.md
"Pacing").

`install(sender)` gives one video sender a `PacedTransport`: a stand-in for its DTLS transport that
takes the sender's RTP packets into a queue and sends them at `PACE_FACTOR` x the encoder's target
bitrate (what real-time stacks do: the encoder's average fits with room for its peaks, and a keyframe
is spread over a few frame times instead of landing at once), `PACE_FACTOR_CAPPED` x while the link is
known to be thin. Everything else the sender asks of its
transport (RTCP, stats, registration) goes straight through. Audio has its own sender on the real
transport: it never waits behind the video queue.

- Retransmissions (NACK answers, server/media/nack_policy.py) are paced too, ahead of new video: a
  packet the receiver is waiting for is worth more than one it is not yet missing.
- The queue is bounded in time: when what is queued would not have left at the pace rate before its
  oldest packet has waited `MAX_QUEUE_S`, the rate is raised so that it has (`PacerStats.rate_raised`). Nothing is
  dropped: a dropped packet costs a NACK round trip or a keyframe, a bigger burst than the one avoided.
- Up to `BURST_S` of the pace rate may leave back to back after an idle moment; while packets are
  queued the schedule is kept whatever the timers do, so a busy loop never slows the pace below the rate.
- The abs-send-time header extension (set by aiortc when the packet is made) is rewritten when the
  packet really leaves: the receiver's delay-based estimate (REMB) reads it, and a packet held in the
  queue would otherwise look delayed by the network.

Cost per packet is constant: two deques and a running byte count, no pass over the queue.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiortc import RTCDtlsTransport, RTCRtpSender
from aiortc.clock import current_ntp_time
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import is_rtcp

from server.media.encoders import RealtimeVideoEncoder
from server.media.link_quality import sender_encoder

log = logging.getLogger(__name__)

PACE_FACTOR = 2.5
"""The pace rate over the encoder's target bitrate (libwebrtc's default pacing factor): room for the
encoder's peaks while nothing says the link is the limit (a clean link is barely touched)."""
PACE_FACTOR_CAPPED = 1.5
"""The same while the loss/delay control caps the bitrate (server/media/link_quality.py): the link is
then known to be about what the target is (the cap follows its loss and queueing), and a pace well above
the link only moves the keyframe's queue from our queue, which audio bypasses, into the link's, which
it cannot: 600 kbit/s link, 17.6 KB keyframe at 400 kbit/s target: the audio behind it waited 135 ms at
2.5x, 46 ms at 1.5x, 180 ms (and video dropped at the link's queue) unpaced (tests/test_pacer.py's
scenario)."""
MAX_QUEUE_S = 0.25
"""The longest the queue may take to drain; above it the pace rate is raised to drain it within this.
A video frame held longer than this is late for a live avatar however it leaves."""
BURST_S = 0.01
"""The credit of an idle moment: a frame after a pause may send this much of the pace rate back to
back. While packets are queued the pacer keeps its schedule instead of the clock: what a late timer
(a busy event loop) held back leaves at once when it fires, so the pace never falls below the rate."""
TIMER_SLACK_S = 0.001
"""A packet due within this leaves now: no sleep shorter than the loop's own timer resolution."""
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


@dataclass
class PacerStats:
    paced: int = 0          # packets sent through the queue
    retransmissions: int = 0
    rate_raised: int = 0    # packets sent above the pace rate because the queue hit MAX_QUEUE_S
    restamped: int = 0      # packets whose abs-send-time was set when they left
    max_wait_s: float = 0.0  # the longest a packet waited in the queue


def abs_send_time(ntp: int) -> int:
    """The 24-bit abs-send-time value of an NTP time (6.18 fixed point seconds), as aiortc writes it."""
    return (ntp >> 14) & 0x00FFFFFF


def restamp(data: bytes, ext_id: int, value: int) -> bytes:
    """`data` (an RTP packet in the clear) with its abs-send-time extension (id `ext_id`) set to
    `value`; unchanged when it has none. One- and two-byte header extensions (RFC 8285)."""
    if len(data) < 12 or not data[0] & 0x10:
        return data
    pos = 12 + 4 * (data[0] & 0x0F)
    if len(data) < pos + 4:
        return data
    profile = int.from_bytes(data[pos:pos + 2], "big")
    i = pos + 4
    end = min(len(data), i + 4 * int.from_bytes(data[pos + 2:pos + 4], "big"))
    one_byte = profile == 0xBEDE
    if not one_byte and profile & 0xFFF0 != 0x1000:
        return data
    while i < end:
        if data[i] == 0:        # padding
            i += 1
            continue
        if one_byte:
            xid, length, start = data[i] >> 4, (data[i] & 0x0F) + 1, i + 1
            if xid == 15:
                break
        else:
            if i + 1 >= end:
                break
            xid, length, start = data[i], data[i + 1], i + 2
        if xid == ext_id and length == 3 and start + 3 <= end:
            out = bytearray(data)
            out[start:start + 3] = value.to_bytes(3, "big")
            return bytes(out)
        i = start + length
    return data


class PacedTransport:
    """A video sender's transport: RTP into the pacing queue, everything else to `inner` (the
    session's `RTCDtlsTransport`). `rate_bps()` is the pace rate now (None: not paced, sent at once)."""

    def __init__(self, inner: RTCDtlsTransport, rate_bps: Callable[[], float | None],
                 rtx_ssrc: int | None = None) -> None:
        self._inner = inner
        self._rate_bps = rate_bps
        self._rtx_ssrc = rtx_ssrc
        self._retransmissions: deque[tuple[bytes, float]] = deque()
        self._video: deque[tuple[bytes, float]] = deque()
        self._queued_bytes = 0
        self._next_at = -float("inf")
        self._highest_seq: int | None = None
        self._abs_send_time_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.stats = PacerStats()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def _register_rtp_sender(self, sender: Any, parameters: RTCRtpSendParameters) -> None:
        """aiortc's sender registers with its transport when it starts: the negotiated header
        extensions say which id abs-send-time has."""
        for ext in parameters.headerExtensions:
            if ext.uri == ABS_SEND_TIME_URI:
                self._abs_send_time_id = ext.id
        self._inner._register_rtp_sender(sender, parameters)

    async def _send_rtp(self, data: bytes) -> None:
        """What the sender calls for every packet (and its RTCP): RTCP leaves at once, RTP is queued."""
        if is_rtcp(data):
            await self._inner._send_rtp(data)
            return
        if self._inner.state != "connected":
            raise ConnectionError("Cannot send encrypted RTP, not connected")  # as the inner transport would
        loop = asyncio.get_running_loop()
        if self._is_retransmission(data):
            self._retransmissions.append((data, loop.time()))
            self.stats.retransmissions += 1
        else:
            self._video.append((data, loop.time()))
        self._queued_bytes += len(data)
        if self._task is None:
            self._task = loop.create_task(self._drain())

    def _is_retransmission(self, data: bytes) -> bool:
        """An RTX packet, or (without RTX) a packet of the media stream that is not newer than the
        newest one seen."""
        if len(data) < 12:
            return False
        if self._rtx_ssrc is not None and int.from_bytes(data[8:12], "big") == self._rtx_ssrc:
            return True
        seq = int.from_bytes(data[2:4], "big")
        if self._highest_seq is None or 0 < (seq - self._highest_seq) & 0xFFFF < 0x8000:
            self._highest_seq = seq
            return False
        return True

    async def _drain(self) -> None:
        """Send what is queued, retransmissions first, one packet per pace interval; ends when the queue
        is empty (the next packet starts a new task)."""
        loop = asyncio.get_running_loop()
        self._next_at = max(self._next_at, loop.time() - BURST_S)   # an idle moment's credit
        try:
            while self._retransmissions or self._video:
                now = loop.time()
                if self._next_at > now + TIMER_SLACK_S:
                    await asyncio.sleep(self._next_at - now)
                    continue   # a retransmission may have come in meanwhile
                data, queued_at = (self._retransmissions or self._video).popleft()
                self._queued_bytes -= len(data)
                self.stats.max_wait_s = max(self.stats.max_wait_s, now - queued_at)
                # The schedule, not the clock: a timer that fired late is caught up at once, so a busy
                # loop does not slow the pace below the rate.
                self._next_at += self._interval(len(data), now, queued_at)
                await self._inner._send_rtp(self._stamped(data))
                self.stats.paced += 1
        except ConnectionError:   # the transport closed under the queue: nothing more can leave
            self._retransmissions.clear()
            self._video.clear()
            self._queued_bytes = 0
        finally:
            self._task = None

    def _interval(self, size: int, now: float, queued_at: float) -> float:
        """Seconds this packet takes at the pace rate, raised where needed so that what is queued
        leaves before its oldest packet has waited MAX_QUEUE_S."""
        rate = self._rate_bps()
        if rate is None or rate <= 0:
            return 0.0
        oldest = min([queued_at] + [q[0][1] for q in (self._retransmissions, self._video) if q])
        left = MAX_QUEUE_S - (now - oldest)
        if left <= 0:
            self.stats.rate_raised += 1
            return 0.0
        drain = 8.0 * self._queued_bytes / left
        if drain > rate:
            rate = drain
            self.stats.rate_raised += 1
        return 8.0 * size / rate

    def _stamped(self, data: bytes) -> bytes:
        if self._abs_send_time_id is None:
            return data
        out = restamp(data, self._abs_send_time_id, abs_send_time(current_ntp_time()))
        if out is not data:
            self.stats.restamped += 1
        return out


def pace_bps(encoder: object) -> float | None:
    """The pace rate for a sender's encoder: PACE_FACTOR (PACE_FACTOR_CAPPED while capped) x its target
    bitrate (REMB within the loss/delay cap); None (not paced) before the sender has made its encoder
    (on its first frame) or for an encoder that is not ours."""
    if not isinstance(encoder, RealtimeVideoEncoder):
        return None
    return (PACE_FACTOR_CAPPED if encoder.capped else PACE_FACTOR) * encoder.target_bitrate


def install(sender: RTCRtpSender) -> PacedTransport:
    """Pace `sender`'s packets. Call it once the remote description is applied (aiortc's BUNDLE
    handling replaces a sender's transport there) and before the sender starts (its start registers the
    header extensions through the transport)."""
    paced = PacedTransport(sender.transport, lambda: pace_bps(sender_encoder(sender)), rtx_ssrc=sender._rtx_ssrc)
    sender.setTransport(cast(RTCDtlsTransport, paced))
    return paced


__all__ = ["BURST_S", "MAX_QUEUE_S", "PACE_FACTOR", "PACE_FACTOR_CAPPED", "PacedTransport", "PacerStats",
           "install", "pace_bps", "restamp"]

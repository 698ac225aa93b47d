"""Which NACKed video packets the server resends, and when it sends a keyframe instead.

aiortc's `RTCRtpSender._retransmit` resends any NACKed packet still in its 128-packet history, however
old, over RTX when negotiated. After a drop-out of a few seconds the receiver NACKs everything it missed
that is still in that history: the server resent seconds-old frames and the receiver decoded and showed
them in a burst (measured through bench/netimpair.py: 75 stale frames within 50 ms after a 3 s outage of
the small test avatar), or, when the missing packets were no longer in the history, it got nothing and
stayed frozen until its own buffer overflowed (aiortc: 512 packets) or it asked for a keyframe.

For a live avatar a frame older than `NACK_MAX_AGE_S` is worth nothing: a keyframe repairs the picture
in one frame. So `apply(sender)` wraps the sender's `_retransmit`:
- a NACKed packet sent less than `NACK_MAX_AGE_S` ago (by its RTP timestamp against the newest one
  sent: the media clock is the wall clock here) is resent as aiortc does;
- one that is older or gone from the history is not. If a keyframe was asked for after it was sent (the
  receiver's PLI or FIR, or an earlier refusal), that keyframe already repairs it: it is skipped and
  nothing else changes. Otherwise the next frame becomes a keyframe (through the encoder's rate limit,
  server/media/encoders.py), and every NACKed packet up to that moment is skipped, since the keyframe
  supersedes them (after a drop-out: no burst of stale frames). A fresh packet sent before the
  receiver's own PLI is still resent: a receiver that keeps packets in order (aiortc's) cannot reach the
  keyframe past a hole.

The first case matters on a lossy link: a receiver NACKs every packet it still misses with each new gap
(aiortc's `NackGenerator` keeps a missing packet for 128 packets, about a second, even after it gave up
on it and asked for a keyframe). Such a stale entry used to count as a fresh refusal: an extra keyframe
that spent the keyframe rate limit, so the receiver's next PLI waited for it, and the fresh losses NACKed
alongside were skipped as superseded, leaving the receiver a hole it could only give up on (measured
through bench/netimpair.py at 2 % loss, 30 +- 15 ms jitter: a 300 ms freeze).

A packet is also not resent again within one round-trip time (at least `RESEND_MIN_INTERVAL_S`) of its
last resend, as libwebrtc does: the first copy cannot have reached the receiver yet. aiortc's own
receiver NACKs every still-missing packet again on each new gap, and a browser re-asks on its own timer;
on a thin link, where the first copy waits in the link's queue, each repeat was another copy in front of
the audio (bench/network.py link600k: up to 255 kbit/s of RTX on a 600 kbit/s link).

It replaces two methods on one sender instance (aiortc's private `_retransmit` and `_send_keyframe`, its
history, last RTP timestamp and smoothed RTT; aiortc < 2, guarded by tests/test_network.py,
tests/test_nack_policy.py and tests/test_pacer.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from aiortc import RTCRtpSender
from aiortc.rtp import RTP_HISTORY_SIZE

log = logging.getLogger(__name__)

NACK_MAX_AGE_S = 0.5
RESEND_MIN_INTERVAL_S = 0.05
VIDEO_CLOCK_RATE = 90000


@dataclass
class NackStats:
    resent: int = 0
    refused: int = 0      # too old or gone: a keyframe was asked for instead
    superseded: int = 0   # older than a keyframe already asked for
    repeated: int = 0     # asked again within a round trip of its last resend: not resent


def _age(latest: int, timestamp: int) -> float:
    return ((latest - timestamp) & 0xFFFFFFFF) / VIDEO_CLOCK_RATE


@dataclass
class _LastAsk:
    """The last keyframe ask: the RTP timestamp of the newest packet sent then, and whether it was ours
    (a refusal: a drop-out's NACKs) or the receiver's (PLI, FIR)."""

    timestamp: int | None = None
    ours: bool = False

    def after(self, timestamp: int) -> bool:
        """Whether a packet of RTP timestamp `timestamp` was sent before the ask."""
        return self.timestamp is not None and _age(self.timestamp, timestamp) < 2 ** 31 / VIDEO_CLOCK_RATE


def apply(sender: RTCRtpSender, max_age_s: float = NACK_MAX_AGE_S) -> NackStats:
    """Give a video sender the policy above; returns its counters."""
    stats = NackStats()
    resend = sender._retransmit
    ask_keyframe = sender._send_keyframe
    last = _LastAsk()

    def latest() -> int:
        return sender._RTCRtpSender__rtp_timestamp  # type: ignore[attr-defined, no-any-return]

    def send_keyframe(ours: bool = False) -> None:
        """Every keyframe ask: the receiver's PLI or FIR (aiortc's `_handle_rtcp_packet`) or a refusal."""
        last.timestamp, last.ours = latest(), ours
        ask_keyframe()

    resent_at: dict[int, tuple[int, float]] = {}   # seq % history size -> (seq, when last resent)

    def _resent_recently(sequence_number: int) -> bool:
        rtt: float | None = sender._RTCRtpSender__rtt  # type: ignore[attr-defined]
        now = time.monotonic()
        slot = sequence_number % RTP_HISTORY_SIZE
        previous = resent_at.get(slot)
        if previous is not None and previous[0] == sequence_number \
                and now - previous[1] < max(RESEND_MIN_INTERVAL_S, rtt or 0.0):
            return True
        resent_at[slot] = (sequence_number, now)
        return False

    async def retransmit(sequence_number: int) -> None:
        history: dict[Any, Any] = sender._RTCRtpSender__rtp_history  # type: ignore[attr-defined]
        packet = history.get(sequence_number % RTP_HISTORY_SIZE)
        if packet is not None and packet.sequence_number == sequence_number:
            fresh = _age(latest(), packet.timestamp) <= max_age_s
            if last.after(packet.timestamp) and (last.ours or not fresh):
                stats.superseded += 1
                return
            if fresh:
                if _resent_recently(sequence_number):
                    stats.repeated += 1
                    return
                stats.resent += 1
                await resend(sequence_number)
                return
        stats.refused += 1
        send_keyframe(ours=True)

    sender._retransmit = retransmit  # type: ignore[method-assign]
    sender._send_keyframe = send_keyframe  # type: ignore[method-assign]
    return stats


__all__ = ["NACK_MAX_AGE_S", "RESEND_MIN_INTERVAL_S", "NackStats", "apply"]

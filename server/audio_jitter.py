"""The microphone's receive jitter buffer: packets in order, on arrival, without aiortc's latency creep.

aiortc's audio `JitterBuffer(capacity=16, prefetch=4)` holds every packet until 4 more wait behind it
(80 ms), hands out at most one frame per arriving packet, and stops at a missing packet until 16 packets
have piled up behind it. One lost or reordered packet (a loaded machine drops UDP datagrams) therefore
adds up to 15 x 20 ms = 300 ms to every later microphone frame, and the delay never comes back down.
Measured with bench/browser_latency.py (headless Chromium, built-in renderer, shared 2-core machine): the
first mic -> returned audio trial took 168 ms, the next ones 412-552 ms, in steps, never recovering.

A count of packets is not a jitter buffer: packet k leaves when packet k + 4 arrives, so a late packet
delays the ones before it as much as without the hold, and only the 80 ms are added. Timing jitter is the
engine's to absorb (its input jitter allowance and stall threshold, realtime/session.py), on the arrival
times it is given. So `GapSkippingJitterBuffer` releases an in-order packet as soon as it arrives
(prefetch 0), holds later packets only while one before them is missing (reordering), and gives the
missing packet up once `skip_after` packets wait behind it. After a loss it stays at most
`skip_after - 1` packets (80 ms) behind, one frame per arriving packet as in aiortc, and never further:
further losses do not add up (tests/test_audio_jitter.py). Catching that up would mean dropping or
time-compressing microphone audio; not done.

`install` replaces the buffer of a peer connection's audio receivers; it relies on aiortc's private
`RTCRtpReceiver.__jitter_buffer` and `JitterBuffer` internals (aiortc < 2, guarded by
tests/test_audio_jitter.py).
"""
from __future__ import annotations

import logging

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame

log = logging.getLogger(__name__)

_RECEIVER_BUFFER = "_RTCRtpReceiver__jitter_buffer"


class GapSkippingJitterBuffer(JitterBuffer):
    """aiortc's audio jitter buffer (same capacity; audio: one packet per frame) that releases the oldest
    packet once `prefetch` packets wait behind it (0: on arrival), whether or not all of them are
    consecutive, and gives a missing oldest packet up once `skip_after` packets wait behind it."""

    def __init__(self, capacity: int = 16, prefetch: int = 0, skip_after: int = 5) -> None:
        super().__init__(capacity=capacity, prefetch=prefetch)
        self.skip_after = skip_after
        self.skipped = 0

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        if self._origin is None:
            return None
        present = [count for count in range(self._capacity)
                   if self._packets[(self._origin + count) % self._capacity] is not None]
        if not present or len(present) - 1 < self._prefetch:
            return None
        first = present[0]
        if first > 0 and len(present) < self.skip_after:
            return None  # the packet before it may still come (reordered)
        packet = self._packets[(self._origin + first) % self._capacity]
        assert packet is not None
        frame = JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]
        self.skipped += first
        self.remove(first + 1)
        return frame


def install(pc: RTCPeerConnection) -> int:
    """Give every audio receiver of `pc` a gap-skipping jitter buffer (before media flows); returns how
    many were replaced. Does nothing (and logs once) if aiortc's internals have moved."""
    replaced = 0
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind != "audio" or not isinstance(getattr(receiver, _RECEIVER_BUFFER, None), JitterBuffer):
            continue
        setattr(receiver, _RECEIVER_BUFFER, GapSkippingJitterBuffer())
        replaced += 1
    return replaced


__all__ = ["GapSkippingJitterBuffer", "install"]

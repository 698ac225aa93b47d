"""The microphone's receive jitter buffer: packets in order, on arrival, without aiortc's latency creep.

aiortc's audio `JitterBuffer(capacity=16, prefetch=4)` holds every packet until 4 more wait behind it
(80 ms), hands out at most one frame per arriving packet, and stops at a missing packet until 16 packets
have piled up behind it. One lost or reordered packet (a loaded machine drops UDP datagrams) therefore
adds up to 15 x 20 ms = 300 ms to every later microphone frame, and the delay never comes back down.
Measured with bench/browser_latency.py (headless Chromium, built-in renderer, shared 2-core machine): the
first mic -> returned audio trial took 168 ms, the next ones 412-552 ms, in steps, never recovering.

A count of packets is not a jitter buffer: packet k leaves when packet k + 4 arrives, so a late packet
delays the ones before it as much as without the hold, and only the 80 ms are added. Timing jitter is the
engine's to absorb (its input jitter allowance and stall threshold, realtime/timeline/session.py), on the arrival
times it is given. So `GapSkippingJitterBuffer` releases an in-order packet as soon as it arrives
(prefetch 0) and holds later packets only while one before them is missing (reordering).

Two rules keep a loss from costing delay for good:
- **Everything ready leaves at once.** aiortc's `RTCRtpReceiver._handle_rtp_packet` calls `add()` once
  per arriving packet and queues at most the one frame it returns for the decoder thread. A buffer that
  released one packet per call stayed as far behind after a hole as the packets that had queued behind
  it (up to 80 ms), forever. Here `add()` returns every in-order packet that is ready as one frame, a
  `JitterBatch` when there are several, which the decoder installed by server/media/opus_fec.py decodes part by
  part (FEC for a frame lost just before a part, concealment for others, no more than real time allows).
  So once a hole is given up the buffer is empty again: back to the minimal delay at the next arrival.
- **The reordering window is as short as the link needs.** Every hold is a delay the engine keeps: a
  hold longer than its stall threshold (40 ms) closes the input segment, and the next one is placed where
  its first audio arrived, i.e. with the hold included, for the rest of the session. With FEC a frame
  given up is rebuilt from the next packet anyway, so the window starts at `skip_after` = 1 (a hole is
  given up when the next packet arrives, as a loss) and widens by one packet, up to `max_skip_after`
  (5: 80 ms), each time a packet that was given up arrives after all (the link does reorder); it narrows
  again by one after `narrow_after` released packets without such a late arrival (10 s of audio).
  Within the current window a reordered packet is put back in place.

`install` replaces the buffer of a peer connection's audio receivers; it relies on aiortc's private
`RTCRtpReceiver.__jitter_buffer` and `JitterBuffer` internals (aiortc < 2, guarded by
tests/test_audio_jitter.py), and on opus_fec's decoder (which decodes a `JitterBatch`) being installed. Its
frames are opus_fec's `MicrophoneFrame`s, so the microphone is decoded to the engine's 16 kHz mono.
"""
from __future__ import annotations

import logging
from collections import deque

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import MAX_MISORDER, JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

from server.media import opus_fec
from server.media.opus_fec import JitterBatch, MicrophoneFrame

log = logging.getLogger(__name__)

_RECEIVER_BUFFER = "_RTCRtpReceiver__jitter_buffer"


class GapSkippingJitterBuffer(JitterBuffer):
    """aiortc's audio jitter buffer (same capacity; audio: one packet per frame) that releases every
    in-order packet on arrival, all at once, and gives a missing packet up once `skip_after` packets wait
    behind it; the window adapts between `skip_after` and `max_skip_after` to the reordering seen."""

    def __init__(self, capacity: int = 16, skip_after: int = 1, max_skip_after: int = 5,
                 narrow_after: int = 500) -> None:
        if not 1 <= skip_after <= max_skip_after < capacity:
            raise ValueError("need 1 <= skip_after <= max_skip_after < capacity")
        super().__init__(capacity=capacity, prefetch=0)
        self.min_skip_after = skip_after
        self.skip_after = skip_after
        self.max_skip_after = max_skip_after
        self.narrow_after = narrow_after
        self.skipped = 0        # packets given up (a hole at the head)
        self.late = 0           # given-up packets that arrived after all (reordered past the window)
        self.batches = 0        # releases of more than one packet
        self._given_up: deque[int] = deque(maxlen=capacity)   # recent given-up sequence numbers
        self._since_late = 0

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        if self._origin is not None:
            behind = uint16_add(self._origin, -packet.sequence_number)
            if 0 < behind < MAX_MISORDER:   # older than the head: aiortc drops it (returns no frame)
                if packet.sequence_number in self._given_up:
                    self._given_up.remove(packet.sequence_number)
                    self.late += 1
                    self._since_late = 0
                    if self.skip_after < self.max_skip_after:
                        self.skip_after += 1
                        log.debug("audio packet %d arrived after it was given up: reorder window %d packets",
                                  packet.sequence_number, self.skip_after)
                return False, None
        return super().add(packet)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        """Called by `add` after storing a packet: every packet that can leave now, in order."""
        if self._origin is None:
            return None
        parts: list[tuple[bytes, int]] = []
        while True:
            present = [count for count in range(self._capacity)
                       if self._packets[(self._origin + count) % self._capacity] is not None]
            if not present:
                break
            first = present[0]
            if first > 0:
                if len(present) < self.skip_after:
                    break   # the packet before them may still come (reordered)
                for count in range(first):
                    self._given_up.append(uint16_add(self._origin, count))
                self.skipped += first
                self.remove(first)
            run = 0
            while run < self._capacity and self._packets[(self._origin + run) % self._capacity] is not None:
                packet = self._packets[(self._origin + run) % self._capacity]
                assert packet is not None
                parts.append((packet._data, packet.timestamp))  # type: ignore[attr-defined]
                run += 1
            self.remove(run)
        if not parts:
            return None
        self._since_late += len(parts)
        if self._since_late >= self.narrow_after and self.skip_after > self.min_skip_after:
            self.skip_after -= 1
            self._since_late = 0
        if len(parts) == 1:
            return MicrophoneFrame(data=parts[0][0], timestamp=parts[0][1])
        self.batches += 1
        base = parts[0][1]
        return JitterBatch([(data, (timestamp - base) % (1 << 32)) for data, timestamp in parts], base)


def install(pc: RTCPeerConnection) -> int:
    """Give every audio receiver of `pc` a gap-skipping jitter buffer (before media flows); returns how
    many were replaced. Does nothing (and logs once) if aiortc's internals have moved. Needs
    opus_fec's decoder (`opus_fec.install_decoder()`): the buffer hands it several packets at once."""
    if not opus_fec.decoder_installed():
        raise RuntimeError("audio_jitter.install needs opus_fec.install_decoder() first (it decodes batches)")
    replaced = 0
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind != "audio" or not isinstance(getattr(receiver, _RECEIVER_BUFFER, None), JitterBuffer):
            continue
        setattr(receiver, _RECEIVER_BUFFER, GapSkippingJitterBuffer())
        replaced += 1
    return replaced


__all__ = ["GapSkippingJitterBuffer", "install"]

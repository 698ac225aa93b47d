"""server/media/nack_policy.py on a stand-in for aiortc's video sender (the private attributes the policy
reads and the two methods it wraps): which NACKed packets are resent, which ask for a keyframe, which are
skipped."""
from __future__ import annotations

from aiortc.rtp import RtpPacket

from server.media import nack_policy

FRAME_TS = 3600   # 40 ms at 90 kHz: one packet per frame here


class FakeSender:
    """The parts of aiortc's RTCRtpSender that the policy uses: the send history, the newest RTP timestamp
    sent, its smoothed round-trip time (none measured yet), `_retransmit` (records what was resent) and
    `_send_keyframe` (counts asks)."""

    def __init__(self) -> None:
        self._RTCRtpSender__rtp_history: dict[int, RtpPacket] = {}
        self._RTCRtpSender__rtp_timestamp = 0
        self._RTCRtpSender__rtt: float | None = None
        self.resent: list[int] = []
        self.keyframe_asks = 0
        self.seq = 1000

    def send(self, frames: int = 1) -> int:
        """Send `frames` one-packet frames; returns the last sequence number."""
        for _ in range(frames):
            self.seq += 1
            self._RTCRtpSender__rtp_timestamp += FRAME_TS
            packet = RtpPacket(sequence_number=self.seq, timestamp=self._RTCRtpSender__rtp_timestamp)
            self._RTCRtpSender__rtp_history[self.seq % 128] = packet
        return self.seq

    async def _retransmit(self, sequence_number: int) -> None:
        self.resent.append(sequence_number)

    def _send_keyframe(self) -> None:
        self.keyframe_asks += 1


async def nack(sender: FakeSender, *lost: int) -> None:
    """As aiortc's `_handle_rtcp_packet` handles a NACK: `_retransmit` for each lost packet, in order."""
    for seq in lost:
        await sender._retransmit(seq)


async def test_a_stale_nack_after_a_pli_is_skipped_and_the_fresh_losses_beside_it_are_resent():
    """A receiver gave up on a packet (its retransmission was lost), asked for a keyframe (PLI), and NACKs
    the packet again with each new gap; the keyframe already repairs it: no second keyframe, and a fresh
    loss in the same NACK is resent (the receiver's buffer needs it to reach the next frames)."""
    sender = FakeSender()
    stats = nack_policy.apply(sender)   # type: ignore[arg-type]
    stale = sender.send(5)
    sender.send(5)                      # 0.2 s later: the receiver gives up, PLI
    sender._send_keyframe()             # what aiortc's sender does on a PLI
    sender.send(8)
    fresh = sender.send(1)              # 0.36 s after the PLI: `stale` is 0.56 s old
    sender.send(2)
    await nack(sender, stale, fresh)
    assert sender.resent == [fresh]
    assert sender.keyframe_asks == 1    # the PLI's only
    assert (stats.resent, stats.refused, stats.superseded) == (1, 0, 1)


async def test_a_fresh_packet_sent_before_a_pli_is_still_resent():
    sender = FakeSender()
    nack_policy.apply(sender)   # type: ignore[arg-type]
    lost = sender.send(10)
    sender._send_keyframe()
    sender.send(2)
    await nack(sender, lost)
    assert sender.resent == [lost]


async def test_a_drop_out_asks_one_keyframe_and_resends_nothing_it_supersedes():
    """After a drop-out the receiver NACKs everything it missed: the stale packets ask for one keyframe, the
    fresher ones are not resent (no burst of old frames), and the same NACK again asks for nothing."""
    sender = FakeSender()
    stats = nack_policy.apply(sender)   # type: ignore[arg-type]
    first = sender.send(1)
    last = sender.send(40)              # 1.6 s of frames the receiver missed
    missed = list(range(first, last + 1))
    await nack(sender, *missed)
    assert sender.resent == []
    assert sender.keyframe_asks == 1
    await nack(sender, *missed)
    assert sender.keyframe_asks == 1
    assert stats.refused == 1 and stats.superseded == 2 * len(missed) - 1
    after = sender.send(3)              # a loss after the keyframe ask is resent as usual
    await nack(sender, after)
    assert sender.resent == [after]


async def test_a_packet_gone_from_the_history_asks_for_a_keyframe():
    sender = FakeSender()
    stats = nack_policy.apply(sender)   # type: ignore[arg-type]
    gone = sender.send(1)
    sender.send(200)
    await nack(sender, gone)
    assert sender.resent == [] and sender.keyframe_asks == 1 and stats.refused == 1

"""What the receiver reports about the link, read once a second, and what the server does with it.

aiortc's RTCRtpSender keeps the last RTCP receiver report of each stream as a "remote-inbound-rtp" stat
(fraction lost, cumulative packets lost, jitter, and a smoothed round-trip time) but acts on none of it:
the Opus encoder never hears of the loss and the video bitrate moves only on REMB (docs/network.md).
`watch_link` (a task each session owns) reads those stats and:
- tells the session's Opus encoder the audio loss, so it adds in-band FEC (server/opus_fec.py);
- keeps `LinkQuality` (loss and rtt per kind) for GET /sessions/{id}, so the page can show the link.

The encoder is aiortc's private `RTCRtpSender.__encoder` (created on the first frame; aiortc < 2,
guarded by tests/test_network.py); reading it is the only way to reach the encoder of a sender.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiortc import RTCPeerConnection, RTCRtpSender

from server.opus_encoder import RealtimeOpusEncoder

log = logging.getLogger(__name__)

PERIOD_S = 1.0
_SENDER_ENCODER = "_RTCRtpSender__encoder"


@dataclass
class StreamReport:
    loss: float = 0.0          # fraction lost in the last report interval (0..1)
    packets_lost: int = 0      # cumulative
    rtt_ms: float | None = None
    jitter: int = 0            # RTP clock units, as reported


@dataclass
class LinkQuality:
    audio: StreamReport = field(default_factory=StreamReport)
    video: StreamReport = field(default_factory=StreamReport)

    def describe(self) -> dict:
        rtts = [r.rtt_ms for r in (self.audio, self.video) if r.rtt_ms is not None]
        return {
            "loss_pct": round(100.0 * max(self.audio.loss, self.video.loss), 2),
            "rtt_ms": None if not rtts else round(min(rtts), 1),
            "audio_loss_pct": round(100.0 * self.audio.loss, 2),
            "video_loss_pct": round(100.0 * self.video.loss, 2),
        }


def sender_encoder(sender: RTCRtpSender) -> object | None:
    return getattr(sender, _SENDER_ENCODER, None)


async def read_reports(pc: RTCPeerConnection, quality: LinkQuality) -> None:
    """Update `quality` from each sender's last receiver report; tell the Opus encoder the audio loss."""
    for sender in pc.getSenders():
        if sender.kind not in ("audio", "video"):
            continue
        try:
            stats = await sender.getStats()
        except Exception:  # a closing transport: nothing to read
            return
        report = getattr(quality, sender.kind)
        for s in stats.values():
            if getattr(s, "type", None) != "remote-inbound-rtp":
                continue
            report.loss = (s.fractionLost or 0) / 256.0
            report.packets_lost = s.packetsLost or 0
            report.jitter = s.jitter or 0
            report.rtt_ms = None if s.roundTripTime is None else 1000.0 * s.roundTripTime
        encoder = sender_encoder(sender)
        if sender.kind == "audio" and isinstance(encoder, RealtimeOpusEncoder):
            encoder.set_expected_loss(report.loss)


async def watch_link(pc: RTCPeerConnection, quality: LinkQuality, period_s: float = PERIOD_S) -> None:
    while True:
        await asyncio.sleep(period_s)
        await read_reports(pc, quality)

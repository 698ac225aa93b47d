"""What the receiver reports about the link, read once a second, and what the server does with it.

aiortc's RTCRtpSender keeps the last RTCP receiver report of each stream as a "remote-inbound-rtp" stat
(fraction lost, cumulative packets lost, jitter, and a smoothed round-trip time) but acts on none of it:
the Opus encoder never hears of the loss and the video bitrate moves only on REMB (docs/network.md).
`watch_link` (a task each session owns) reads those stats and:
- tells the session's Opus encoder the audio loss, so it adds in-band FEC (server/media/opus_fec.py);
- caps the video bitrate (`VideoRateControl`, a loss- and delay-based control in the manner of
  Google Congestion Control's loss part): aiortc follows only REMB, which the browser computes from
  delay; on a link that drops rather than queues, or when REMB is absent, nothing slowed the video;
- keeps `LinkQuality` (loss and rtt per kind) for GET /sessions/{id}, so the page can show the link.

Audio is never reduced: it is a small, fixed share (Opus at 96 kb/s) that the mouth and the voice
depend on; the video gives way first.

The encoder is aiortc's private `RTCRtpSender.__encoder` (created on the first frame; aiortc < 2,
guarded by tests/test_network.py); reading it is the only way to reach the encoder of a sender.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiortc import RTCPeerConnection, RTCRtpSender

from server.media.encoders import RealtimeVideoEncoder
from server.media.opus_encoder import RealtimeOpusEncoder

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
    video_control: "VideoRateControl | None" = None

    def describe(self) -> dict:
        rtts = [r.rtt_ms for r in (self.audio, self.video) if r.rtt_ms is not None]
        return {
            "loss_pct": round(100.0 * max(self.audio.loss, self.video.loss), 2),
            "rtt_ms": None if not rtts else round(min(rtts), 1),
            "audio_loss_pct": round(100.0 * self.audio.loss, 2),
            "video_loss_pct": round(100.0 * self.video.loss, 2),
            "video_bitrate_cap_kbps": (None if self.video_control is None or self.video_control.cap is None
                                       else round(self.video_control.cap / 1000)),
        }


@dataclass
class VideoRateControl:
    """A cap on the video bitrate from the receiver reports, once a second. Loss above `HIGH_LOSS` or a
    round-trip time `QUEUE_MS` above the lowest seen (a queue building on the path) cuts the cap
    multiplicatively; loss below `LOW_LOSS` with no queue lets it grow by `GROWTH` a report, up to
    uncapped again. Between the two it holds. Starts uncapped, so a clean link is untouched."""

    HIGH_LOSS = 0.10
    LOW_LOSS = 0.02
    QUEUE_MS = 100.0
    GROWTH = 1.08
    QUEUE_CUT = 0.85
    ceiling: int = 1_500_000
    floor: int = 150_000
    cap: float | None = None
    base_rtt_ms: float | None = None
    steps_down: int = 0
    steps_up: int = 0

    def update(self, loss: float, rtt_ms: float | None, current_bps: int) -> int | None:
        """The new cap (None: uncapped) from one report; `current_bps` is what the encoder aims at now."""
        if rtt_ms is not None:
            self.base_rtt_ms = rtt_ms if self.base_rtt_ms is None else min(self.base_rtt_ms, rtt_ms)
        queued = (rtt_ms is not None and self.base_rtt_ms is not None
                  and rtt_ms > self.base_rtt_ms + self.QUEUE_MS)
        level = float(self.cap if self.cap is not None else current_bps)
        if loss > self.HIGH_LOSS or queued:
            factor = (1.0 - 0.5 * loss) if loss > self.HIGH_LOSS else 1.0
            if queued:
                factor = min(factor, self.QUEUE_CUT)
            self.cap = max(float(self.floor), min(level, current_bps) * factor)
            self.steps_down += 1
        elif loss < self.LOW_LOSS and self.cap is not None:
            self.cap = level * self.GROWTH
            self.steps_up += 1
            if self.cap >= self.ceiling:
                self.cap = None
        return None if self.cap is None else int(self.cap)


def sender_encoder(sender: RTCRtpSender) -> object | None:
    return getattr(sender, _SENDER_ENCODER, None)


async def read_reports(pc: RTCPeerConnection, quality: LinkQuality,
                       control: VideoRateControl | None = None) -> None:
    """Update `quality` from each sender's last receiver report; tell the Opus encoder the audio loss and
    the video encoder its bitrate cap."""
    for sender in pc.getSenders():
        if sender.kind not in ("audio", "video"):
            continue
        try:
            stats = await sender.getStats()
        except Exception:  # a closing transport: nothing to read
            return
        report = quality.audio if sender.kind == "audio" else quality.video
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
        if sender.kind == "video" and control is not None and isinstance(encoder, RealtimeVideoEncoder):
            encoder.set_bitrate_cap(control.update(report.loss, report.rtt_ms, encoder.target_bitrate))


async def watch_link(pc: RTCPeerConnection, quality: LinkQuality, period_s: float = PERIOD_S) -> None:
    control = VideoRateControl()
    quality.video_control = control
    while True:
        await asyncio.sleep(period_s)
        await read_reports(pc, quality, control)

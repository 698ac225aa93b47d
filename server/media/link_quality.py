"""What the receiver reports about the link, read once a second, and what the server does with it.

aiortc's RTCRtpSender keeps the last RTCP receiver report of each stream as a "remote-inbound-rtp" stat
(fraction lost, cumulative packets lost, jitter, and a smoothed round-trip time) but acts on none of it:
the Opus encoder never hears of the loss and the video bitrate moves only on REMB (docs/network.md).
`watch_link` (a task each session owns) reads those stats and:
- tells the session's Opus encoder the audio loss, so it adds in-band FEC (server/media/opus_fec.py);
- caps the video bitrate (`VideoRateControl`, a loss- and delay-based control in the manner of
  Google Congestion Control's loss part): aiortc follows only REMB, which the browser computes from
  delay; on a link that drops rather than queues, or when REMB is absent, nothing slowed the video;
- steps the video's size, then its frame rate, down when that budget is short for the size
  (`VideoLadder`, bits per pixel) and back up, with hysteresis, when the link widens;
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
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpSender

from server.media.encoders import RealtimeVideoEncoder
from server.media.opus_encoder import RealtimeOpusEncoder
from server.media.tracks import FULL, AvatarVideoTrack, VideoStep

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
    video_ladder: "VideoLadder | None" = None

    def describe(self) -> dict[str, Any]:
        rtts = [r.rtt_ms for r in (self.audio, self.video) if r.rtt_ms is not None]
        return {
            "loss_pct": round(100.0 * max(self.audio.loss, self.video.loss), 2),
            "rtt_ms": None if not rtts else round(min(rtts), 1),
            "audio_loss_pct": round(100.0 * self.audio.loss, 2),
            "video_loss_pct": round(100.0 * self.video.loss, 2),
            "video_bitrate_cap_kbps": (None if self.video_control is None or self.video_control.cap is None
                                       else round(self.video_control.cap / 1000)),
            "video_scale": None if self.video_ladder is None else self.video_ladder.step.scale,
            "video_fps_divisor": None if self.video_ladder is None else self.video_ladder.step.fps_divisor,
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


VIDEO_STEPS: tuple[VideoStep, ...] = (FULL, VideoStep(0.75), VideoStep(0.5), VideoStep(0.5, 2))
"""Size first (512 -> 384 -> 256 px for the default avatar: a smaller picture at the same bits per pixel
keeps the mouth sharper than a blocky full-size one), the frame rate last (a talking mouth at 12.5 fps
loses visemes)."""


@dataclass
class VideoLadder:
    """Which `VideoStep` the video is sent at, from the loss/delay cap once a second.

    A step needs `MIN_BITS_PER_PIXEL` x its pixels per second. When the cap falls below what the
    current step needs, the ladder steps down at once, as far as needed, in the same report that lowers
    the rate (the encoder reopens at the new size, so the step costs one keyframe, which a bitrate change
    costs anyway in aiortc's encoders). It steps back up one step at a time, only after the cap has held
    `UP_MARGIN` x what the step above needs for `UP_REPORTS` reports in a row (uncapped counts): a cap
    near a threshold does not flip the size.

    The budget is the cap alone, not the receiver's REMB: a REMB estimate follows what arrives (a
    browser's cannot exceed about 1.5 x the incoming rate), so a size chosen from it would keep the
    stream small and its estimate low, and browsers start it low and ramp it up on a clean link. REMB
    still sets the bitrate within the cap. The cap starts uncapped and returns to it on a clean link, so
    a clean link stays at full size from the first frame."""

    MIN_BITS_PER_PIXEL = 0.08
    """Below ~0.08 bit per pixel VP8 at real-time speed turns a talking face blocky; the figure is in
    line with libwebrtc's choice of start resolution by bitrate (VP8: at most 640x360 below 500 kbit/s)."""
    UP_MARGIN = 1.25
    UP_REPORTS = 3
    steps: tuple[VideoStep, ...] = VIDEO_STEPS
    index: int = 0
    steps_down: int = 0
    steps_up: int = 0
    _ample: int = 0

    @property
    def step(self) -> VideoStep:
        return self.steps[self.index]

    def need_bps(self, step: VideoStep, width: int, height: int, fps: float) -> float:
        sent_w, sent_h = step.size(width, height)
        return self.MIN_BITS_PER_PIXEL * sent_w * sent_h * fps / step.fps_divisor

    def update(self, budget_bps: float | None, width: int, height: int, fps: float) -> VideoStep:
        """The step for the next second, from one report's cap (None: uncapped)."""
        if budget_bps is not None:
            start = self.index
            while (self.index + 1 < len(self.steps)
                   and budget_bps < self.need_bps(self.step, width, height, fps)):
                self.index += 1
            if self.index != start:
                self.steps_down += 1
                self._ample = 0
                return self.step
        if self.index == 0:
            return self.step
        above = self.steps[self.index - 1]
        if budget_bps is None or budget_bps >= self.UP_MARGIN * self.need_bps(above, width, height, fps):
            self._ample += 1
        else:
            self._ample = 0
        if self._ample >= self.UP_REPORTS:
            self.index -= 1
            self.steps_up += 1
            self._ample = 0
        return self.step


def sender_encoder(sender: RTCRtpSender) -> object | None:
    return getattr(sender, _SENDER_ENCODER, None)


async def read_reports(pc: RTCPeerConnection, quality: LinkQuality,
                       control: VideoRateControl | None = None, ladder: VideoLadder | None = None,
                       video: AvatarVideoTrack | None = None) -> None:
    """Update `quality` from each sender's last receiver report; tell the Opus encoder the audio loss,
    the video encoder its bitrate cap, and the video track its step."""
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
            cap = control.update(report.loss, report.rtt_ms, encoder.target_bitrate)
            encoder.set_bitrate_cap(cap)
            if ladder is not None and video is not None and video.source_size is not None:
                width, height = video.source_size
                video.set_step(ladder.update(cap, width, height, video.fps))


async def watch_link(pc: RTCPeerConnection, quality: LinkQuality, video: AvatarVideoTrack | None = None,
                     period_s: float = PERIOD_S) -> None:
    control = VideoRateControl()
    quality.video_control = control
    ladder = VideoLadder() if video is not None else None
    quality.video_ladder = ladder
    while True:
        await asyncio.sleep(period_s)
        await read_reports(pc, quality, control, ladder, video)

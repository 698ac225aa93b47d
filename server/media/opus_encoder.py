"""`RealtimeOpusEncoder`: aiortc's Opus encoder, fed the server's 16 kHz mono frames directly.

aiortc's `OpusEncoder` resamples every frame to 48 kHz stereo with PyAV's `AudioResampler(frame_size=960)`;
for the server's 16 kHz frames the resampler completes each 960-sample frame only on the next call, so
every audio packet left 20 ms after its frame was handed over (measured: onset in frame j comes out of
frame j + 1's `encode`; tests/test_opus_encoder.py). libopus takes 16 kHz input itself (RFC 6716: 8, 12,
16, 24 or 48 kHz; the decoder outputs 48 kHz whatever the input was), so this encoder opens its own
libopus context at 16 kHz mono and hands it the server's 320-sample frames as they are: no resampler, no
upsampled copy, a third of the samples and one channel instead of two for the codec, and each packet
leaves in the call that got its frame. Mono is what a WebRTC receiver expects without `stereo=1`; a
stereo decoder plays it on both channels. The RTP clock stays 48 kHz (Opus in WebRTC, RFC 7587): the
timestamp is the packet's 16 kHz pts times 3, from frame.pts, so a skipped span keeps its gap
(tests/test_aiortc_internals.py). The rest is aiortc's settings (96 kb/s, "voip"). Frames of any other
shape go through aiortc's own path and codec unchanged.
"""
from __future__ import annotations

import fractions
from typing import Optional

from aiortc.codecs.opus import SAMPLE_RATE as RTP_RATE
from aiortc.codecs.opus import OpusEncoder
from av import AudioFrame, CodecContext
from av.audio.codeccontext import AudioCodecContext
from av.frame import Frame

from realtime.config import SAMPLE_RATE as IN_RATE

IN_TIME_BASE = fractions.Fraction(1, IN_RATE)
RTP_PER_SAMPLE = RTP_RATE // IN_RATE
"""RTP timestamp units (48 kHz) per input sample (16 kHz)."""
FEC_LOSS_STEPS = (0, 5, 10, 20, 30)
"""Expected-loss steps (percent) the codec is reopened at: a reported 0 % keeps aiortc's settings."""


def open_codec(bit_rate: int, loss_pct: int) -> AudioCodecContext:
    """A libopus encoder for 16 kHz mono s16 with aiortc's application, and in-band FEC sized for
    `loss_pct` when it is above 0."""
    codec = CodecContext.create("libopus", "w")
    assert isinstance(codec, AudioCodecContext)
    codec.bit_rate = bit_rate
    codec.format = "s16"
    codec.layout = "mono"
    codec.sample_rate = IN_RATE
    codec.time_base = IN_TIME_BASE
    options = {"application": "voip"}
    if loss_pct > 0:
        options.update({"fec": "1", "packet_loss": str(loss_pct)})
    codec.options = options
    return codec


class RealtimeOpusEncoder(OpusEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.loss_pct = 0                      # the expected loss the codec is set up for (0: no FEC)
        self._wanted_loss_pct = 0
        bit_rate = self.codec.bit_rate   # aiortc's (96 kb/s)
        assert bit_rate is not None
        self._bit_rate: int = bit_rate
        self._codec16 = open_codec(self._bit_rate, self.loss_pct)
        self._first_pts16: Optional[int] = None   # libopus' first packet pts (its look-ahead, negative)

    # -- in-band FEC (server/media/opus_fec.py) --------------------------------------------------------------

    def set_expected_loss(self, fraction: float) -> None:
        """The loss the receiver reports (RTCP fraction lost, 0..1): from the next frame on, the codec adds
        in-band FEC sized for it (libopus' packet_loss_perc), rounded up to a step of `FEC_LOSS_STEPS`;
        none on a clean link. Called from the loop; applied in `encode` (the encoder's thread)."""
        pct = 100.0 * max(0.0, min(1.0, fraction))
        self._wanted_loss_pct = next((step for step in FEC_LOSS_STEPS if pct <= step), FEC_LOSS_STEPS[-1])

    def _apply_expected_loss(self) -> None:
        """Reopen the codec when the loss step changed: FFmpeg's libopus wrapper reads `fec` and
        `packet_loss` only when it opens. Steps change rarely (a link that degrades or recovers); the
        new codec's timestamps continue (its first packet's pts offset is the same look-ahead)."""
        wanted = self._wanted_loss_pct
        if wanted != self.loss_pct:
            self._codec16 = open_codec(self._bit_rate, wanted)
            self.loss_pct = wanted

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        if not self._takes(frame):
            return super().encode(frame, force_keyframe)
        assert isinstance(frame, AudioFrame)
        self._apply_expected_loss()
        packets = self._codec16.encode(frame)
        if not packets:   # libopus holds nothing back at 20 ms frames; kept for the type's sake
            return [], None  # type: ignore[return-value]   # aiortc's contract: None when nothing left
        pts = packets[0].pts
        assert pts is not None
        if self._first_pts16 is None:
            self._first_pts16 = pts
        return [bytes(p) for p in packets], (pts - self._first_pts16) * RTP_PER_SAMPLE

    @staticmethod
    def _takes(frame: Frame) -> bool:
        """16 kHz mono s16 in whole 20 ms frames (the server's SyncedAudioTrack)."""
        return (isinstance(frame, AudioFrame) and frame.sample_rate == IN_RATE and frame.format.name == "s16"
                and frame.layout.name == "mono" and frame.samples == IN_RATE // 50 and frame.pts is not None)


__all__ = ["RealtimeOpusEncoder"]

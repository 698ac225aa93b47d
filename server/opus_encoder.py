"""`RealtimeOpusEncoder`: aiortc's Opus encoder without its one-frame hold-back.

aiortc's `OpusEncoder` resamples every frame to 48 kHz stereo with PyAV's `AudioResampler(frame_size=960)`;
for the server's 16 kHz frames the resampler completes each 960-sample frame only on the next call, so
every audio packet left 20 ms after its frame was handed over (measured: onset in frame j comes out of
frame j + 1's `encode`; tests/test_opus_encoder.py). This encoder upsamples 16 kHz mono s16 frames itself
(`server.audio_upsample.Upsampler3x`, no frame held) and hands aiortc's own `encode` 960-sample 48 kHz
stereo frames, which its resampler passes through, so they are encoded in the same call. Everything else
is aiortc's: the codec context and its settings (96 kb/s, "voip"), and the RTP timestamp, derived from
frame.pts (a skipped span keeps its gap: tests/test_aiortc_internals.py). Frames of any other shape go
through aiortc's own path unchanged.
"""
from __future__ import annotations

import fractions
from typing import Optional

import numpy as np
from aiortc.codecs.opus import OpusEncoder
from av import AudioFrame, CodecContext
from av.frame import Frame

from server.audio_upsample import FACTOR, IN_RATE, OUT_RATE, Upsampler3x

OUT_TIME_BASE = fractions.Fraction(1, OUT_RATE)
FEC_LOSS_STEPS = (0, 5, 10, 20, 30)
"""Expected-loss steps (percent) the codec is reopened at: a reported 0 % keeps aiortc's settings."""


class RealtimeOpusEncoder(OpusEncoder):
    def __init__(self) -> None:
        super().__init__()
        self._upsampler = Upsampler3x()
        self._next_pts: Optional[int] = None   # input pts that continues the last frame (16 kHz)
        self.loss_pct = 0                      # the expected loss the codec is set up for (0: no FEC)
        self._wanted_loss_pct = 0

    # -- in-band FEC (server/opus_fec.py) --------------------------------------------------------------

    def set_expected_loss(self, fraction: float) -> None:
        """The loss the receiver reports (RTCP fraction lost, 0..1): from the next frame on, the codec adds
        in-band FEC sized for it (libopus' packet_loss_perc), rounded up to a step of `FEC_LOSS_STEPS`;
        none on a clean link. Called from the loop; applied in `encode` (the encoder's thread)."""
        pct = 100.0 * max(0.0, min(1.0, fraction))
        self._wanted_loss_pct = next((step for step in FEC_LOSS_STEPS if pct <= step), FEC_LOSS_STEPS[-1])

    def _apply_expected_loss(self) -> None:
        """Reopen the codec when the loss step changed: FFmpeg's libopus wrapper reads `fec` and
        `packet_loss` only when it opens. Steps change rarely (a link that degrades or recovers); the
        new codec's timestamps continue (aiortc's `first_packet_pts` offset is the same for every
        libopus stream: its 312-sample look-ahead)."""
        wanted = self._wanted_loss_pct
        if wanted == self.loss_pct:
            return
        codec = CodecContext.create("libopus", "w")
        codec.bit_rate = self.codec.bit_rate
        codec.format = "s16"
        codec.layout = "stereo"
        codec.sample_rate = OUT_RATE
        codec.time_base = OUT_TIME_BASE
        options = {"application": "voip"}
        if wanted > 0:
            options.update({"fec": "1", "packet_loss": str(wanted)})
        codec.options = options
        self.codec = codec
        self.loss_pct = wanted

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        if not self._takes(frame):
            return super().encode(frame, force_keyframe)
        assert isinstance(frame, AudioFrame) and frame.pts is not None
        self._apply_expected_loss()
        pcm = frame.to_ndarray().reshape(-1)
        if frame.pts != self._next_pts:
            self._upsampler.reset()   # a skipped span: the filter must not smear old audio across it
        self._next_pts = frame.pts + len(pcm)
        up = np.clip(np.rint(self._upsampler.process(pcm)), -32768, 32767).astype(np.int16)
        out = AudioFrame.from_ndarray(np.repeat(up, 2).reshape(1, -1), format="s16", layout="stereo")
        out.sample_rate = OUT_RATE
        out.pts = frame.pts * FACTOR
        out.time_base = OUT_TIME_BASE
        # A 960-sample 48 kHz stereo frame is what aiortc's resampler emits itself: it passes it through,
        # and aiortc's own encode (codec, payloads, RTP timestamp from pts) sends it in this call.
        return super().encode(out, force_keyframe)

    @staticmethod
    def _takes(frame: Frame) -> bool:
        """16 kHz mono s16 in whole 20 ms frames (the server's SyncedAudioTrack)."""
        return (isinstance(frame, AudioFrame) and frame.sample_rate == IN_RATE and frame.format.name == "s16"
                and frame.layout.name == "mono" and frame.samples == IN_RATE // 50 and frame.pts is not None)


__all__ = ["RealtimeOpusEncoder"]

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
from av import AudioFrame
from av.frame import Frame

from server.audio_upsample import FACTOR, IN_RATE, OUT_RATE, Upsampler3x

OUT_TIME_BASE = fractions.Fraction(1, OUT_RATE)


class RealtimeOpusEncoder(OpusEncoder):
    def __init__(self) -> None:
        super().__init__()
        self._upsampler = Upsampler3x()
        self._next_pts: Optional[int] = None   # input pts that continues the last frame (16 kHz)

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        if not self._takes(frame):
            return super().encode(frame, force_keyframe)
        assert isinstance(frame, AudioFrame) and frame.pts is not None
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

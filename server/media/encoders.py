"""Real-time settings for the video encoders aiortc creates (one per session's RTCRtpSender).

aiortc's encoders are set up for one camera stream on a desktop: libx264 at its default preset
("medium") with as many slice threads as the machine has, libvpx with its camera denoiser
(noise-sensitivity 4). A server encodes many rendered avatars (no sensor noise) on a few cores, where
those settings cost CPU and buy nothing: on the default avatar, x264 "medium" with slice threads costs
about four times the CPU of "veryfast" on one thread for the same quality, and VP8's denoiser costs CPU
and loses quality (bench/RESULTS.md "Video encoder settings"; bench/encoded_sessions.py runs them live).

So only these change: H.264 preset superfast (`H264_OPTIONS`) and one thread per encoder (sessions give the parallelism;
slice threads of many encoders would oversubscribe the cores), VP8 without the denoiser and with a static
threshold that skips the still parts of the picture (`VP8_OPTIONS`). Everything else
(bitrates and their REMB updates, rate control, profile, keyframes on PLI, packetisation) stays aiortc's,
except that forced keyframes are rate-limited (`KEYFRAME_MIN_INTERVAL_S`) and the REMB target is capped by
the loss/delay control of server/media/link_quality.py, with lower floors (docs/network.md).

Audio: Opus frames leave through `server.media.opus_encoder.RealtimeOpusEncoder`, which hands libopus the
server's 16 kHz mono frames as they are (no resampler), so that no packet waits for the next frame (20 ms
less on every returned sound) and libopus encodes a third of the samples, once; G.711 and other codecs
are aiortc's.

`install()` makes aiortc's RTCRtpSender create these encoders: it replaces the `get_encoder` that
aiortc.rtcrtpsender looks up for each new sender.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, ClassVar

import aiortc.rtcrtpsender
import aiortc.rtp
import numpy as np
from aiortc.codecs import get_encoder as aiortc_get_encoder
from aiortc.codecs.base import Encoder
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av import AudioFrame

from server.media.opus_encoder import RealtimeOpusEncoder

log = logging.getLogger(__name__)

H264_OPTIONS = {"preset": "superfast"}
"""x264's "superfast" (diamond motion search, sub-pixel refinement 1, no 4x4 / 8x8 partitions) rather than
"veryfast": with aiortc's Baseline profile (no CABAC, no B-frames) at its bitrates, on one thread, it costs
about two thirds of the CPU and decodes to the same Y PSNR or better, on the default avatar and on detailed
drifting texture (bench/RESULTS.md "The per-frame media path"; tests/test_server_encoding.py
`test_h264_preset_keeps_the_picture`). "ultrafast" goes further and loses several dB on texture."""
H264_THREADS = 1
VP8_OPTIONS = {"noise-sensitivity": "0", "static-thresh": "600"}
"""aiortc's real-time speed (cpu-used -6) is kept: a faster one saves little on the default avatar
(-12: ~0.2 ms a frame for -0.6 dB) but costs ~5-6 dB Y PSNR on detailed moving content such as a
photographed avatar's hair (bench/RESULTS.md "Video encoder settings").

`static-thresh` 600 (aiortc: 1): a macroblock that differs from the reference by less than that sum of
absolute differences (about 2.3 levels a pixel) is coded as unchanged, without a motion search. An avatar
is mostly still (background, hair, forehead) with the motion at the mouth: on the default avatar this
takes about a sixth off the encode and the bits saved go to the mouth (Y PSNR of the whole frame the
same, of the lower centre +0.5 dB); on textured drifting content, fast or sub-pixel slow, nothing changes.
1 000 and above start to lose (-0.6 dB at 1 000, -1.5 dB at 1 500; bench/RESULTS.md "Each session
cheaper"; tests/test_server_encoding.py)."""


class TunedContext:
    """A codec context that merges fixed overrides into the `options` (and `thread_count`) its encoder
    sets before the codec opens; every other attribute is the context's own."""

    def __init__(self, context: Any, options: dict[str, str], thread_count: int | None = None) -> None:
        object.__setattr__(self, "_context", context)
        object.__setattr__(self, "_options", dict(options))
        object.__setattr__(self, "_thread_count", thread_count)
        if thread_count is not None:
            context.thread_count = thread_count

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "options":
            value = {**dict(value), **self._options}
        elif name == "thread_count" and self._thread_count is not None:
            value = self._thread_count
        setattr(self._context, name, value)


KEYFRAME_MIN_INTERVAL_S = 0.5
"""At most one forced keyframe per this interval. aiortc's sender forces a keyframe on every PLI or FIR
it receives; on a lossy link a receiver (and every receiver of a bundle) can ask several times while the
first keyframe is still in flight, and each keyframe is 5-10x a delta frame: a burst that causes more
loss. A request inside the interval is kept and served when it ends, never dropped."""


class _Tuned:
    """Mixin for an aiortc encoder that keeps its codec context in `self.codec` (created lazily on
    the first frame and again on a size or bitrate change): each new context gets the overrides.
    Keyframe requests are rate-limited (`_keyframe_due`)."""

    OPTIONS: ClassVar[dict[str, str]] = {}
    THREADS: ClassVar[int | None] = None
    DEFAULT_BPS: ClassVar[int] = 500_000
    MIN_BPS: ClassVar[int] = 150_000
    MAX_BPS: ClassVar[int] = 1_500_000

    # -- bitrate: REMB (aiortc sets target_bitrate) capped by the loss/delay control -----------------

    @property
    def target_bitrate(self) -> int:
        """What the encoder aims at: the receiver's REMB estimate (aiortc's sender sets it; the
        codec's default until one comes), capped by `bitrate_cap` (server/media/link_quality.py's loss and
        delay control), within [MIN_BPS, MAX_BPS]. aiortc reopens the codec when this moves by more
        than 10 %."""
        remb = self.__dict__.get("_remb_bps", self.DEFAULT_BPS)
        cap = self.__dict__.get("bitrate_cap")
        wanted = remb if cap is None else min(remb, cap)
        return int(max(self.MIN_BPS, min(self.MAX_BPS, wanted)))

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self.__dict__["_remb_bps"] = int(bitrate)

    def set_bitrate_cap(self, bps: int | None) -> None:
        self.__dict__["bitrate_cap"] = bps

    @property
    def capped(self) -> bool:
        """Whether the loss/delay control caps the bitrate now (a thin or lossy link)."""
        return self.__dict__.get("bitrate_cap") is not None

    def encode(self, frame: Any, force_keyframe: bool = False) -> Any:
        return super().encode(frame, self._keyframe_due(force_keyframe))  # type: ignore[misc]

    def _keyframe_due(self, requested: bool, now: float | None = None) -> bool:
        """Whether this frame is forced to a keyframe: a request (now or pending) is served once
        `KEYFRAME_MIN_INTERVAL_S` has passed since the last forced one."""
        now = time.monotonic() if now is None else now
        state = self.__dict__
        if requested:
            state["_keyframe_pending"] = True
        if not state.get("_keyframe_pending"):
            return False
        if now - state.get("_keyframe_last", -float("inf")) < KEYFRAME_MIN_INTERVAL_S:
            return False
        state["_keyframe_pending"] = False
        state["_keyframe_last"] = now
        state["keyframes_forced"] = state.get("keyframes_forced", 0) + 1
        return True

    @property
    def codec(self) -> Any:
        return self.__dict__.get("_tuned_codec")

    @codec.setter
    def codec(self, context: Any) -> None:
        if context is not None and not isinstance(context, TunedContext):
            context = TunedContext(context, {**self.OPTIONS, **(self.CAPPED_OPTIONS if self.capped else {})},
                                   self.THREADS)
        self.__dict__["_tuned_codec"] = context

    CAPPED_OPTIONS: ClassVar[dict[str, str]] = {}
    """Added when the codec (re)opens while the loss/delay control caps the bitrate (a thin or lossy
    link); a clean link never gets them."""


class RealtimeH264Encoder(_Tuned, H264Encoder):
    OPTIONS = H264_OPTIONS
    THREADS = H264_THREADS
    DEFAULT_BPS = 1_000_000   # aiortc's; its floor is 500 kb/s, too high for a thin link
    MIN_BPS = 200_000
    MAX_BPS = 3_000_000


KEYFRAME_MAX_PCT_CAPPED = 300
"""A keyframe at most 3x the average frame (libvpx `rc_max_intra_bitrate_pct`) while the bitrate is
capped. aiortc leaves it unlimited: a fresh codec's first keyframe (every size step and every >10 %
bitrate change reopens the codec) can be many times a delta frame, and on a 600 kbit/s link with a
200 ms queue a keyframe of more than ~15 KB overflows the queue by itself: the burst is lost, NACKed and
resent, the loss cuts the cap again. At 3x the keyframe drains in about three frame times; its quality
is made up by the following frames."""


VP8_CAPPED_OPTIONS = {"max-intra-rate": str(KEYFRAME_MAX_PCT_CAPPED)}


class RealtimeVp8Encoder(_Tuned, Vp8Encoder):
    OPTIONS = VP8_OPTIONS
    CAPPED_OPTIONS = VP8_CAPPED_OPTIONS


RealtimeVideoEncoder = _Tuned
"""The video encoders' common part (keyframe rate limit, bitrate cap), for server/media/link_quality.py."""


def get_encoder(codec: RTCRtpCodecParameters) -> Encoder:
    """aiortc's encoder for `codec`, with the real-time settings above for H.264, VP8 and Opus."""
    mime = codec.mimeType.lower()
    if mime == "video/h264":
        return RealtimeH264Encoder()
    if mime == "video/vp8":
        return RealtimeVp8Encoder()
    if mime == "audio/opus":
        return RealtimeOpusEncoder()
    return aiortc_get_encoder(codec)


MAX_SAMPLE_VALUE = 32767
MIN_AUDIO_LEVEL = -127
aiortc_audio_level_dbov = aiortc.rtp.compute_audio_level_dbov   # aiortc's own, before `install` replaces it


def audio_level_dbov(frame: AudioFrame) -> int:
    """aiortc's `rtp.compute_audio_level_dbov` (RFC 6465 Appendix A, the level in every audio packet's
    header extension), the same integer from the same samples, in numpy: aiortc's loops over the
    samples in Python on the event loop, ~0.03 ms per 20 ms frame, two per video frame per session."""
    x = np.frombuffer(memoryview(frame.planes[0]), dtype=np.int16).astype(np.float64)
    rms = math.sqrt(float(np.dot(x, x)) / (frame.samples * MAX_SAMPLE_VALUE * MAX_SAMPLE_VALUE))
    if rms <= 0:
        return MIN_AUDIO_LEVEL
    return round(min(0.0, max(float(MIN_AUDIO_LEVEL), 20 * math.log10(rms))))


def install() -> None:
    """Make every RTCRtpSender created from now on use `get_encoder`, and every sender's audio level
    `audio_level_dbov` (aiortc.rtcrtpsender calls `rtp.compute_audio_level_dbov` per frame) (idempotent)."""
    aiortc.rtp.compute_audio_level_dbov = audio_level_dbov
    if aiortc.rtcrtpsender.get_encoder is not get_encoder:
        aiortc.rtcrtpsender.get_encoder = get_encoder
        log.debug("aiortc encoders: H.264 %s, %d thread(s); VP8 %s; Opus from 16 kHz without the frame hold-back",
                  H264_OPTIONS, H264_THREADS, VP8_OPTIONS)

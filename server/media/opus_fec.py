"""Opus in-band FEC both ways: offered in the SDP, decoded from the microphone, encoded to the receiver's loss.

aiortc offers and answers Opus without an fmtp line, so a browser never sends in-band FEC (LBRR) to the
server and never expects it; aiortc's `OpusDecoder` decodes packets through FFmpeg's libopus wrapper,
which has no FEC and no packet-loss concealment call: a lost microphone packet was simply missing, so the
engine's input (the mel, the mouth and the returned audio) lost 20 ms and every later sample moved 20 ms
earlier. Here:

- `offer_inband_fec()` adds `useinbandfec=1` to aiortc's Opus codec parameters, so our offers and
  answers carry `a=fmtp:<pt> useinbandfec=1` (RFC 7587): a browser then adds FEC once our receiver
  reports loss (aiortc's receiver sends RTCP receiver reports with the fraction lost for every stream).
- `FecOpusDecoder` (installed for the microphone by `install_decoder()`) decodes with libopus itself
  (the copy PyAV ships, through ctypes) and fills a gap the timestamps show: the frame just before a
  packet that arrived is rebuilt from that packet's FEC data (`decode_fec=1`) when it carries some
  (`opus_packet_has_lbrr`), every other frame of the gap by libopus' concealment (PLC). So the engine
  gets whole, continuous audio; a gap longer than `MAX_CONCEALED_S` (an outage, or a sender that
  stopped) is not filled (costing at most that per packet), the stream goes on from the new packet.
- The microphone is decoded straight to 16 kHz mono (`MIC_RATE`, `MIC_CHANNELS`), the engine's input format:
  libopus decodes at any of its rates (RFC 6716 section 4: 8-48 kHz, 1 or 2 channels), so the 48 kHz stereo
  PCM that aiortc's decoder makes, which AudioIngest then averaged to mono and resampled back to 16 kHz per
  20 ms frame, is never made (tests/test_opus_fec.py: the same mel spectrogram). The decoder factory is
  process-wide (aiortc looks it up per receiver, by codec alone), so the stream tells it what it is: packets
  from the server's own receive buffer (server/media/audio_jitter.py) are `MicrophoneFrame`s and get 16 kHz mono;
  any other receiver in the process (a test's or a bench's aiortc client) keeps aiortc's 48 kHz stereo.
- A `JitterBatch` (several consecutive packets released at once by server/media/audio_jitter.py, so the
  receive buffer never stays behind after a hole) is decoded part by part; aiortc's own decoders for other
  audio codecs get the same (`_BatchDecoder`).
- The server's Opus encoder is told the loss the receiver reports (`RealtimeOpusEncoder.set_expected_loss`,
  fed by server/media/link_quality.py) and adds FEC when it is above zero.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fractions
import glob
import logging
import os
import time
from typing import Any, Callable

import aiortc.codecs
import aiortc.rtcrtpreceiver
import av
import numpy as np
from aiortc.codecs import get_decoder as aiortc_get_decoder
from aiortc.codecs.base import Decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av.frame import Frame

log = logging.getLogger(__name__)

RATE = 48000              # the RTP clock of Opus (RFC 7587), whatever the decoded rate
CHANNELS = 2
TIME_BASE = fractions.Fraction(1, RATE)
MIC_RATE = 16000          # what the server decodes the microphone to: the engine's input rate
MIC_CHANNELS = 1
MAX_FRAME = 5760          # 120 ms at 48 kHz: the longest Opus packet
MAX_CONCEALED_S = 0.2     # fill gaps up to this long (10 frames of 20 ms); longer ones stay gaps
MAX_CONCEALED_FRAMES = 10  # and never more than this many frames per packet (short-frame streams)
OPUS_OK = 0


def _load_libopus() -> Any:
    """libopus as PyAV bundles it (always there with our PyAV wheel), else the system's."""
    here = os.path.dirname(av.__file__)
    for path in sorted(glob.glob(os.path.join(here, os.pardir, "av.libs", "libopus*.so*"))):
        return ctypes.CDLL(path)
    name = ctypes.util.find_library("opus")
    if name is None:
        raise OSError("libopus not found (neither in PyAV's av.libs nor on the system)")
    return ctypes.CDLL(name)


_lib: Any = None


def libopus() -> Any:
    global _lib
    if _lib is None:
        lib = _load_libopus()
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_decode.restype = ctypes.c_int
        lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                    ctypes.POINTER(ctypes.c_int16), ctypes.c_int, ctypes.c_int]
        lib.opus_packet_get_nb_samples.restype = ctypes.c_int
        lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
        lib.opus_packet_has_lbrr.restype = ctypes.c_int      # libopus >= 1.5 (PyAV ships 1.6)
        lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
        _lib = lib
    return _lib


class MicrophoneFrame(JitterFrame):
    """A packet of the server's microphone stream, from its receive buffer (server/media/audio_jitter.py): the
    Opus decoder of `get_decoder` decodes such a stream to the engine's 16 kHz mono."""


class JitterBatch(MicrophoneFrame):
    """Consecutive audio packets handed to the decoder at once: `parts` are (payload, timestamp offset
    from this frame's `timestamp`, modulo 2**32). `data` is the first part's, and aiortc's receiver maps
    `timestamp` (the first part's) to its stream time as for any frame; the offsets stay valid."""

    def __init__(self, parts: list[tuple[bytes, int]], timestamp: int) -> None:
        if not parts or parts[0][1] != 0:
            raise ValueError("a batch starts with its own first packet (offset 0)")
        super().__init__(data=parts[0][0], timestamp=timestamp)
        self.parts = parts


class FecOpusDecoder(Decoder):
    """Decodes Opus packets (JitterFrames with a 48 kHz timestamp) to s16 AudioFrames at `rate` with
    `channels` (default 48 kHz stereo, as aiortc's OpusDecoder; the server's microphone: 16 kHz mono), and
    fills gaps in the timestamps with FEC (the last missing frame) and concealment (the ones before it).
    Frames keep aiortc's timing whatever the rate: pts is the packet's 48 kHz RTP timestamp, time base 1/48000."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, rate: int = RATE,
                 channels: int = CHANNELS) -> None:
        self._state: Any = None  # set before anything can raise, so __del__ always finds it
        if rate not in (8000, 12000, 16000, 24000, 48000) or channels not in (1, 2):
            raise ValueError(f"libopus decodes at 8, 12, 16, 24 or 48 kHz with 1 or 2 channels, not "
                             f"{rate} Hz x {channels}")
        self._clock = clock
        self.rate, self.channels = rate, channels
        self._per_rtp = RATE // rate          # RTP timestamp units per decoded sample
        self._layout = "stereo" if channels == 2 else "mono"
        self._lib = libopus()
        error = ctypes.c_int(0)
        self._state = self._lib.opus_decoder_create(rate, channels, ctypes.byref(error))
        if error.value != OPUS_OK or not self._state:
            raise RuntimeError(f"opus_decoder_create failed ({error.value})")
        self._pcm = np.zeros(MAX_FRAME * channels, dtype=np.int16)
        self._next: int | None = None   # the timestamp that continues the last decoded packet
        self._last_at = 0.0             # monotonic time of the last decoded packet
        self.frames = 0
        self.fec_frames = 0
        self.concealed_frames = 0
        self.late_packets = 0

    def __del__(self) -> None:
        if self._state:
            self._lib.opus_decoder_destroy(self._state)
            self._state = None

    def _decode(self, data: bytes | None, samples: int, fec: bool, pts: int) -> Frame | None:
        """One frame of `samples` (48 kHz units) decoded at this decoder's rate."""
        out = self._pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_int16))
        n = self._lib.opus_decode(self._state, data, len(data) if data else 0, out, samples // self._per_rtp,
                                  int(fec))
        if n <= 0:
            log.debug("opus_decode failed (%d)", n)
            return None
        frame = av.AudioFrame.from_ndarray(self._pcm[: n * self.channels].reshape(1, -1).copy(), format="s16",
                                           layout=self._layout)
        frame.sample_rate = self.rate
        frame.pts = pts
        frame.time_base = TIME_BASE
        return frame

    def decode(self, encoded_frame: JitterFrame) -> list[Frame]:
        if isinstance(encoded_frame, JitterBatch):
            frames: list[Frame] = []
            for data, offset in encoded_frame.parts:
                frames += self._decode_packet(bytes(data), encoded_frame.timestamp + offset)
            return frames
        return self._decode_packet(bytes(encoded_frame.data), encoded_frame.timestamp)

    def _decode_packet(self, data: bytes, timestamp: int) -> list[Frame]:
        samples = self._lib.opus_packet_get_nb_samples(data, len(data), RATE)
        if samples <= 0:
            return []
        frames: list[Frame] = []
        now = self._clock()
        if self._next is not None:
            gap = timestamp - self._next
            if gap < 0:
                self.late_packets += 1   # older than what was played (reordered past the jitter buffer)
                return []
            if 0 < gap <= MAX_CONCEALED_S * RATE:
                # Bounded per packet, and by the wall time since the last packet: a peer whose
                # timestamps jump without time passing gets no invented audio (no faster-than-real-
                # time input from concealment).
                elapsed_frames = int((now - self._last_at) * RATE / samples) + 2
                missing = min(gap // samples, MAX_CONCEALED_FRAMES, elapsed_frames)
                has_fec = self._lib.opus_packet_has_lbrr(data, len(data)) == 1
                for k in range(missing):
                    pts = self._next + k * samples
                    fec = has_fec and k == missing - 1
                    frame = self._decode(data if fec else None, samples, fec=fec, pts=pts)
                    if frame is not None:
                        frames.append(frame)
                        if fec:
                            self.fec_frames += 1
                        else:
                            self.concealed_frames += 1
        frame = self._decode(data, samples, fec=False, pts=timestamp)
        if frame is not None:
            frames.append(frame)
            self.frames += 1
        self._next = timestamp + samples
        self._last_at = now
        return frames


class _OpusByStream(Decoder):
    """The Opus decoder of one receiver, its output chosen by the first frame: the server's microphone
    (`MicrophoneFrame`) at 16 kHz mono, any other stream at aiortc's 48 kHz stereo. A receiver's frames all
    come from one jitter buffer, so the first frame speaks for the stream."""

    def __init__(self) -> None:
        self.inner: FecOpusDecoder | None = None

    def decode(self, encoded_frame: JitterFrame) -> list[Frame]:
        if self.inner is None:
            mic = isinstance(encoded_frame, MicrophoneFrame)
            self.inner = FecOpusDecoder(rate=MIC_RATE, channels=MIC_CHANNELS) if mic else FecOpusDecoder()
        return self.inner.decode(encoded_frame)


class _BatchDecoder(Decoder):
    """aiortc's decoder of another audio codec (G.711, G.722), fed a `JitterBatch` part by part."""

    def __init__(self, inner: Decoder) -> None:
        self._inner = inner

    def decode(self, encoded_frame: JitterFrame) -> list[Frame]:
        if not isinstance(encoded_frame, JitterBatch):
            return self._inner.decode(encoded_frame)
        frames: list[Frame] = []
        for data, offset in encoded_frame.parts:
            frames += self._inner.decode(JitterFrame(data=data, timestamp=encoded_frame.timestamp + offset))
        return frames


def get_decoder(codec: RTCRtpCodecParameters) -> Decoder:
    """aiortc's decoder for `codec`, with FEC and concealment for Opus (the server's microphone decoded to
    16 kHz mono); every audio decoder takes a `JitterBatch`."""
    mime = codec.mimeType.lower()
    if mime == "audio/opus":
        return _OpusByStream()
    if mime.startswith("audio/"):
        return _BatchDecoder(aiortc_get_decoder(codec))
    return aiortc_get_decoder(codec)


_decoder_installed = False


def install_decoder(factory: Callable[[RTCRtpCodecParameters], Decoder] = get_decoder) -> None:
    """Make every RTCRtpReceiver decode with `factory` (`get_decoder`, or a wrapper of it that returns
    its decoders, e.g. to count them): Opus with `FecOpusDecoder`, and audio batches decoded (idempotent)."""
    global _decoder_installed
    if aiortc.rtcrtpreceiver.get_decoder is not factory:
        libopus()  # fail here, at start-up, if libopus cannot be loaded
        aiortc.rtcrtpreceiver.get_decoder = factory  # type: ignore[assignment]
    _decoder_installed = True


def decoder_installed() -> bool:
    """Whether `install_decoder` ran: server/media/audio_jitter.py's buffer hands audio decoders batches."""
    return _decoder_installed


def offer_inband_fec() -> None:
    """Put `useinbandfec=1` in aiortc's Opus codec parameters, so every offer and answer carries it."""
    for codec in aiortc.codecs.CODECS["audio"]:
        if codec.mimeType.lower() == "audio/opus":
            codec.parameters["useinbandfec"] = 1


def install() -> None:
    offer_inband_fec()
    install_decoder()


__all__ = ["MIC_CHANNELS", "MIC_RATE", "FecOpusDecoder", "JitterBatch", "MicrophoneFrame", "decoder_installed",
           "install", "install_decoder", "offer_inband_fec"]

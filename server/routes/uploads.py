"""Decoding an uploaded audio file with bounded time and memory.

An upload is attacker-controlled input to ffmpeg, so:
- only audio/video *container* formats are opened, chosen by their magic bytes and named to PyAV
  explicitly: no format probing, so no playlist or script demuxer (hls, concat, ...) that would open
  other URLs or local files; nested opens are refused anyway (`protocol_whitelist` names no protocol);
- the stream's header is checked before decoding: < 8 kHz, > 192 kHz or > 8 channels -> 415 (a 30 MB
  wav at 1 kHz would otherwise expand to 15000 s of 16 kHz float32, ~1 GB, twice over);
- decoding stops as soon as the decoded audio is longer than the session's remaining queue room (413),
  so memory stays within that room (16 kHz float32: 64 KB per second) plus one packet.
Decoded in full, a 30 MB wav at 1 kHz took seconds and gigabytes before its 413; refused by its header it
costs the body and a fraction of a second (bench/abuse.py; the numbers: bench/RESULTS.md "Abuse").
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import av
import numpy as np

from realtime.config import SAMPLE_RATE
from server.errors import ApiError

log = logging.getLogger(__name__)

TARGET_RATE = SAMPLE_RATE
MIN_RATE = 8000
MAX_RATE = 192000
MAX_CHANNELS = 8
CONTAINERS = "wav, mp3, ogg/opus, flac, m4a/mp4/mov, webm/mkv, aac, aiff, caf, amr"


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 mono at TARGET_RATE
    source_rate: int
    source_channels: int


def sniff_container(head: bytes) -> str | None:
    """The PyAV format name of a supported container, from its first bytes; None if unsupported."""
    if len(head) < 12:
        return None
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "matroska"
    if head[4:8] == b"ftyp":
        return "mov"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"caff":
        return "caf"
    if head[:6] == b"#!AMR\n":
        return "amr"
    if head[:3] == b"ID3":
        return "mp3"
    if head[0] == 0xFF and head[1] & 0xF6 == 0xF0:  # ADTS sync word, layer 0
        return "aac"
    if head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
        return "mp3"
    return None


def _refuse(status: int, message: str) -> ApiError:
    return ApiError(status, message)


def decode_upload(data: bytes, max_seconds: float) -> DecodedAudio:
    """Decode the first audio stream to 16 kHz mono float32, refusing (ApiError) anything unsafe or
    longer than `max_seconds`. Runs on the WorkPool, never on the event loop."""
    fmt = sniff_container(data[:16])
    if fmt is None:
        raise _refuse(415, f"not a media file in a supported audio container ({CONTAINERS})")
    try:
        container = av.open(io.BytesIO(data), mode="r", format=fmt, metadata_errors="ignore",
                            options={"protocol_whitelist": "none"})
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise _refuse(415, f"not a media file ffmpeg can read as {fmt} ({exc})") from None
    with container:
        if not container.streams.audio:
            raise _refuse(415, "contains no audio stream")
        stream = container.streams.audio[0]
        rate, channels = _checked_header(stream)
        samples = _decode_within(container, stream, max_seconds)
    return DecodedAudio(samples, rate, channels)


def _checked_header(stream: av.audio.stream.AudioStream) -> tuple[int, int]:
    rate = int(stream.codec_context.sample_rate or 0)
    channels = int(stream.codec_context.channels or 0)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise _refuse(415, f"sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise _refuse(415, f"{channels} channels: at most {MAX_CHANNELS}")
    return rate, channels


def _decode_within(container: av.container.InputContainer, stream: av.audio.stream.AudioStream,
                   max_seconds: float) -> np.ndarray:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=TARGET_RATE)
    limit = int(max_seconds * TARGET_RATE)
    parts: list[np.ndarray] = []
    total = 0
    try:
        for frame in container.decode(stream):
            if not MIN_RATE <= frame.sample_rate <= MAX_RATE or len(frame.layout.channels) > MAX_CHANNELS:
                raise _refuse(415, "the audio changes to an unsupported rate or layout midway")
            for out in resampler.resample(frame):
                part = out.to_ndarray().reshape(-1)
                total += part.shape[0]
                if total > limit:
                    raise _too_long(max_seconds)
                parts.append(part)
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as exc:
        raise _refuse(415, f"the audio cannot be decoded ({exc})") from None
    if not parts:
        raise _refuse(415, "the audio stream holds no samples")
    samples = np.concatenate(parts).astype(np.float32, copy=False)
    if samples.shape[0] > limit:
        raise _too_long(max_seconds)
    return samples


def _too_long(max_seconds: float) -> ApiError:
    return ApiError(413, f"the audio is longer than the {max_seconds:.1f} s this session can still queue; "
                         "interrupt or wait", room_s=round(max_seconds, 3))

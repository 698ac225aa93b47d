"""Audio in: any rate, layout, sample format and chunk size -> 16 kHz mono float32, stamped with sample time.

`AudioIngest.convert` is a streaming converter: channels are averaged to mono (exact and predictable),
then PyAV's AudioResampler (libswresample) brings the rate to 16 kHz, keeping its filter state between
chunks so chunk boundaries leave no clicks. 16 kHz input passes through untouched, sample for sample.
A change of input rate mid-stream flushes the old resampler and starts a new one.

`AudioRing` stores the converted samples under their index on the session's input timeline together with
their arrival time. It is sparse: gaps between pushes (an input stall) cost no memory and read back as
silence.
"""
from __future__ import annotations

import bisect
import logging

import av
import numpy as np

from realtime.config import SAMPLE_RATE
from realtime.rate_limited_log import RateLimitedLog

log = logging.getLogger(__name__)

TARGET_RATE = SAMPLE_RATE


def to_float_mono(samples: np.ndarray, channels: int = 1) -> np.ndarray:
    """Interleaved (N*channels,) or (N, channels) int16/int32/uint8/float samples -> (N,) float32 in [-1, 1]."""
    x = np.asarray(samples)
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    elif x.dtype == np.int32:
        x = (x.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif x.dtype == np.uint8:
        x = (x.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    else:
        raise TypeError(f"unsupported sample dtype {x.dtype}; use int16 or float32")
    if x.ndim == 2:
        if x.shape[1] != channels and channels == 1:
            channels = x.shape[1]
        if x.shape[1] != channels:
            raise ValueError(f"samples of shape {x.shape} do not have {channels} channels")
        x = x.reshape(-1)
    elif x.ndim != 1:
        raise ValueError(f"expected 1-D interleaved or (N, channels) samples, got shape {x.shape}")
    if channels > 1:
        if len(x) % channels:
            raise ValueError(f"{len(x)} interleaved samples is not a multiple of {channels} channels")
        x = x.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return x


class AudioIngest:
    """Streaming conversion of pushed chunks to 16 kHz mono float32."""

    def __init__(self, target_rate: int = TARGET_RATE) -> None:
        self.target_rate = target_rate
        self._resampler: av.AudioResampler | None = None
        self._rate: int | None = None

    def convert(self, samples: np.ndarray, sample_rate: int, channels: int = 1) -> np.ndarray:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        mono = to_float_mono(samples, channels)
        pieces: list[np.ndarray] = []
        if sample_rate != self._rate:
            pieces.append(self._flush())
            self._rate = sample_rate
            if sample_rate != self.target_rate:
                self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.target_rate)
                log.debug("resampling input %d Hz -> %d Hz", sample_rate, self.target_rate)
        if len(mono) == 0:
            return _concat(pieces)
        if self._resampler is None:
            pieces.append(np.array(mono, dtype=np.float32, copy=True))
        else:
            pieces.append(self._resample(mono, sample_rate))
        return _concat(pieces)

    def _resample(self, mono: np.ndarray, sample_rate: int) -> np.ndarray:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono)[None, :], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        assert self._resampler is not None
        return _frames_to_array(self._resampler.resample(frame))

    def _flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        out = _frames_to_array(self._resampler.resample(None))
        self._resampler = None
        return out

    def reset(self) -> None:
        """Forget the resampler's state (interrupt): buffered input samples are discarded."""
        self._resampler = None
        self._rate = None


def convert_clip(samples: np.ndarray, sample_rate: int, channels: int = 1,
                 target_rate: int = TARGET_RATE) -> np.ndarray:
    """A whole clip to 16 kHz mono float32, resampler flushed (its tail kept): what `AudioIngest` gives
    chunk by chunk, in one call that can run off the event loop (server/routes/push_api.py)."""
    ingest = AudioIngest(target_rate)
    return _concat([ingest.convert(samples, sample_rate, channels), ingest._flush()])


def _frames_to_array(frames: list[av.AudioFrame]) -> np.ndarray:
    if not frames:
        return np.zeros(0, dtype=np.float32)
    return _concat([f.to_ndarray().reshape(-1).astype(np.float32, copy=False) for f in frames])


def _concat(pieces: list[np.ndarray]) -> np.ndarray:
    pieces = [p for p in pieces if len(p)]
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class AudioRing:
    """16 kHz mono samples keyed by input-timeline index, each chunk stamped with its arrival time.

    Chunks are appended at or after `head` (a later start leaves a silent gap). Reads outside the stored
    chunks return zeros. `discard_before` releases what nobody will read again, so memory stays bounded.
    """

    def __init__(self, max_samples: int, sample_rate: int = SAMPLE_RATE) -> None:
        self.max_samples = int(max_samples)
        self.sample_rate = sample_rate
        self._starts: list[int] = []
        self._chunks: list[np.ndarray] = []
        self._arrivals: list[float] = []
        self.head = 0          # one past the last stored sample
        self.stored = 0        # samples held
        self.refused = 0       # samples refused because the buffer was full
        self.refused_chunks = 0  # chunks cut short or refused for that reason
        # A source faster than real time (a microphone's RTP sent too fast) is refused chunk after chunk.
        self._refused_log = RateLimitedLog(log)

    def append(self, samples: np.ndarray, start: int, arrival: float) -> int:
        """Store samples at [start, start + n); returns how many were kept (the rest overflowed)."""
        if start < self.head:
            raise ValueError(f"chunk at {start} overlaps stored audio ending at {self.head}")
        room = self.max_samples - self.stored
        if len(samples) > room:
            self.refused += len(samples) - max(room, 0)
            self.refused_chunks += 1
            self._refused_log("audio buffer full (%d samples): refusing %d samples", self.max_samples,
                              len(samples) - max(room, 0))
            samples = samples[:max(room, 0)]
        if len(samples) == 0:
            return 0
        self._starts.append(int(start))
        self._chunks.append(np.asarray(samples, dtype=np.float32))
        self._arrivals.append(float(arrival))
        self.head = int(start) + len(samples)
        self.stored += len(samples)
        return len(samples)

    def read(self, start: int, n: int) -> np.ndarray:
        """Samples [start, start + n) as float32; zeros where nothing was stored."""
        out = np.zeros(max(n, 0), dtype=np.float32)
        if n <= 0 or not self._starts:
            return out
        end = start + n
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while i < len(self._starts) and self._starts[i] < end:
            c0 = self._starts[i]
            chunk = self._chunks[i]
            lo, hi = max(start, c0), min(end, c0 + len(chunk))
            if lo < hi:
                out[lo - start:hi - start] = chunk[lo - c0:hi - c0]
            i += 1
        return out

    def covered(self, start: int, n: int) -> int:
        """How many of the samples [start, start + n) are stored."""
        if n <= 0:
            return 0
        end, total = start + n, 0
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while i < len(self._starts) and self._starts[i] < end:
            c0 = self._starts[i]
            total += max(0, min(end, c0 + len(self._chunks[i])) - max(start, c0))
            i += 1
        return total

    def arrival_of(self, index: int) -> float | None:
        """When sample `index` arrived, or None if it is not stored: its chunk's arrival time, less the
        real time its chunk holds after it, but never before the chunk that precedes it without a gap
        arrived (a chunk after a gap, or the first: all its samples arrived with it). For audio arriving
        in real time that is when the sample was due, whatever the chunk size and however the chunks fall
        against the video frames; stamping the whole chunk with its arrival made the latency of a
        microphone session depend on that phase (0-20 ms, fixed per session: bench/soak.py --isolation
        saw two identical sessions 21 ms apart). Audio pushed ahead of real time arrives with its chunk."""
        i = bisect.bisect_right(self._starts, index) - 1
        if i < 0 or index >= self._starts[i] + len(self._chunks[i]):
            return None
        end = self._starts[i] + len(self._chunks[i])
        due = self._arrivals[i] - (end - index) / self.sample_rate
        contiguous = i > 0 and self._starts[i - 1] + len(self._chunks[i - 1]) == self._starts[i]
        return max(due, self._arrivals[i - 1] if contiguous else self._arrivals[i])

    def move_from(self, index: int, delta: int) -> None:
        """Move every chunk stored at or after `index` by `delta` samples (an utterance whose place on
        the timeline was provisional). It must not overlap the chunks before it."""
        i = bisect.bisect_left(self._starts, index)
        if i == len(self._starts) or delta == 0:
            return
        if i > 0 and self._starts[i] + delta < self._starts[i - 1] + len(self._chunks[i - 1]):
            raise ValueError(f"moving the chunks from {index} by {delta} would overlap stored audio")
        for j in range(i, len(self._starts)):
            self._starts[j] += delta
        self.head += delta

    def discard_before(self, index: int) -> None:
        """Forget whole chunks that end at or before `index`."""
        drop = 0
        while drop < len(self._starts) and self._starts[drop] + len(self._chunks[drop]) <= index:
            self.stored -= len(self._chunks[drop])
            drop += 1
        if drop:
            del self._starts[:drop], self._chunks[:drop], self._arrivals[:drop]

    def clear(self, head: int | None = None) -> None:
        """Forget everything; the next chunk may start at `head` (default: where the last one ended)."""
        self._starts.clear()
        self._chunks.clear()
        self._arrivals.clear()
        self.stored = 0
        if head is not None:
            self.head = int(head)

"""WebRTC tracks of one session: the avatar video out, the synced audio out, and the microphone in.

Both outgoing tracks pace on one `MediaClock`: video frame k leaves at t0 + k / fps and audio sample j
at t0 + j / 16000, so their RTP timestamps (and the RTCP sender reports the browser syncs them by)
share one timeline. The engine (`next_video_frame`, `next_audio`) returns immediately; rendering runs in
its worker thread and encoding in aiortc's executor, so nothing here blocks the event loop.

Video frames leave as yuv420p, the format both video encoders take (`video_frame`).

Per-frame work off the event loop (every session's pacing timer runs on it, so its lag is every
session's jitter): the mouth paste and the BGR -> I420 conversion (`paste` and `frame_build` of
`bench/default_renderer.py --stages`, about 0.2 ms together per 512 px frame) run on the server's frame
pool (`executor`, two threads, not aiortc's encoder executor); the hop costs the loop ~0.05 ms. PCM
conversions stay on the loop because they cost less than the hop would: the 20 ms output frame's
float -> int16 (0.026 ms) and a microphone frame's to_ndarray (0.029 ms), measured on the shared 2-core
machine (min of 300-2000 calls).
"""
from __future__ import annotations

import asyncio
import fractions
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from realtime.config import SAMPLE_RATE
from realtime.timeline.video_out import VideoOut
from server.engine import EngineSession

log = logging.getLogger(__name__)

VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_RATE = SAMPLE_RATE
AUDIO_PTIME = 0.020
AUDIO_SAMPLES = int(AUDIO_RATE * AUDIO_PTIME)  # 320 samples = 20 ms
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)


class MediaClock:
    """The wall-clock origin shared by a session's outgoing tracks: set by whichever starts first."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._started = asyncio.Event()

    def origin(self) -> float:
        if self._t0 is None:
            self._t0 = time.monotonic()
            self._started.set()
        return self._t0

    @property
    def started(self) -> bool:
        return self._t0 is not None

    async def wait_started(self) -> None:
        await self._started.wait()


class PacerStats:
    """How late a track hands frames over, and how many ticks it had to skip."""

    def __init__(self) -> None:
        self.frames = 0
        self.skipped = 0
        self.lateness_s = 0.0  # exponential moving average
        self._window: list[float] = []  # send times of the last second, for fps

    def record(self, lateness: float, now: float) -> None:
        self.frames += 1
        self.lateness_s += 0.05 * (lateness - self.lateness_s)
        self._window.append(now)
        while self._window and self._window[0] < now - 2.0:
            self._window.pop(0)

    def fps(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        recent = [t for t in self._window if t >= now - 2.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(now - recent[0], 1e-6)


async def _sleep_until(deadline: float) -> float:
    """Sleep until the monotonic `deadline`; returns how late we woke (>= 0)."""
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    return max(0.0, time.monotonic() - deadline)


OnError = Callable[[BaseException], None]


def video_frame(image: np.ndarray) -> av.VideoFrame:
    """A BGR uint8 (H, W, 3) image as the yuv420p av.VideoFrame the encoders take.

    The VP8 and H.264 encoders want yuv420p and would otherwise convert a bgr24 frame with swscale on
    every frame. OpenCV's BGR -> I420 uses the same BT.601 limited-range matrix (luma within 1 level)
    and averages each 2x2 block for chroma, which is closer to the image than swscale's default, at
    about half the cost of building a bgr24 frame and converting it. Odd sizes (no 4:2:0 layout) stay
    bgr24 and are converted by the encoder as before.
    """
    height, width = image.shape[:2]
    if height % 2 or width % 2:
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
    return yuv420p_frame(cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420), width, height)


def yuv420p_frame(i420: np.ndarray, width: int, height: int) -> av.VideoFrame:
    """An av.VideoFrame holding OpenCV's I420 layout (the Y rows, then the U rows, then the V rows, each
    plane contiguous), copied plane by plane into the frame's own (row-padded) planes.

    PyAV's `from_ndarray` does the same through a bytes copy of the whole array and then a copy per
    row, which costs more than the colour conversion itself; three numpy copies into views of the
    planes cost a fraction of it (bench/RESULTS.md "The per-frame media path")."""
    frame = av.VideoFrame(width, height, "yuv420p")
    flat = i420.reshape(-1)
    start = 0
    for plane in frame.planes:
        size = plane.width * plane.height
        rows = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(plane.height, plane.line_size)
        rows[:, :plane.width] = flat[start:start + size].reshape(plane.height, plane.width)
        start += size
    return frame


@dataclass(frozen=True)
class VideoStep:
    """What the video track sends of the avatar's frames: `scale` of its size (each side rounded to an
    even number, for 4:2:0) and every `fps_divisor`-th tick. The step is chosen per link
    (server/media/link_quality.py `VideoLadder`); the media clock is untouched: a frame left out is still taken
    from the engine on its tick, and a frame sent keeps the pts of its tick, so A/V sync holds."""

    scale: float = 1.0
    fps_divisor: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.scale <= 1.0 or self.fps_divisor < 1:
            raise ValueError(f"bad video step {self}")

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The sent size of a `width` x `height` frame."""
        if self.scale == 1.0:
            return width, height
        return max(2, 2 * round(width * self.scale / 2)), max(2, 2 * round(height * self.scale / 2))


FULL = VideoStep()


def scaled_frame(image: np.ndarray, step: VideoStep) -> av.VideoFrame:
    """`video_frame` of the image at the step's size: scaled once here (area interpolation, before the
    colour conversion, which then costs less), so the encoder gets the smaller frame and follows it
    (aiortc's VP8 and H.264 encoders reopen the codec on a size change: the next frame is a keyframe
    that carries the new size)."""
    height, width = image.shape[:2]
    size = step.size(width, height)
    if size != (width, height):
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return video_frame(image)


def _frame_of(out: VideoOut, step: VideoStep = FULL) -> tuple[av.VideoFrame, tuple[int, int]]:
    """The frame to send and the engine frame's (width, height); runs where the image is composed."""
    image = out.image
    return scaled_frame(image, step), (int(image.shape[1]), int(image.shape[0]))


class _EngineTrack(MediaStreamTrack):
    """A track fed by the engine: an engine failure ends the track and is reported, never swallowed."""

    def __init__(self, on_error: OnError | None) -> None:
        super().__init__()
        self._on_error = on_error

    def _failed(self, exc: Exception) -> MediaStreamError:
        log.exception("%s track: the engine failed", self.kind)
        if self._on_error is not None:  # first, so the session's close reason is the engine's
            self._on_error(exc)
        self.stop()
        return MediaStreamError(f"engine failed: {exc}")


class AvatarVideoTrack(_EngineTrack):
    """The avatar, one frame per tick at the avatar's fps, pts on the shared clock (time base 1/90000).

    On a thin link the session's link task sets a smaller `VideoStep` (`set_step`): a smaller frame
    and/or every other tick. The engine still gives a frame on every tick (its timeline is the audio's);
    a tick left out is taken and dropped on its time, as the skip-ahead below does."""

    kind = "video"

    def __init__(self, source: EngineSession, fps: float, clock: MediaClock,
                 on_error: OnError | None = None, executor: Executor | None = None) -> None:
        super().__init__(on_error)
        self._source = source
        self._fps = float(fps)
        self._clock = clock
        self._index = 0
        self._executor = executor  # where frames are composited and converted (None: on the loop)
        self._step = FULL
        self.source_size: tuple[int, int] | None = None   # (width, height) of the engine's frames
        self.thinned = 0   # ticks taken from the engine and not sent (a frame-rate step)
        self.stats = PacerStats()

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def step(self) -> VideoStep:
        return self._step

    def set_step(self, step: VideoStep) -> None:
        """Send from the next frame on at `step` (the link task's choice)."""
        if step != self._step:
            log.info("video step: %s -> %s (source %s)", self._step, step, self.source_size)
        self._step = step

    async def _to_frame(self, out: VideoOut) -> av.VideoFrame:
        """The engine's frame as an encoder-ready av.VideoFrame: the mouth paste (VideoOut.image is
        composed on first access) and the BGR -> I420 conversion run on the executor (module docstring);
        the hop costs the loop ~0.05 ms."""
        step = self._step
        if self._executor is None:
            frame, size = _frame_of(out, step)
        else:
            frame, size = await asyncio.get_running_loop().run_in_executor(self._executor, _frame_of, out, step)
        self.source_size = size
        return frame

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        t0 = self._clock.origin()
        due = int((time.monotonic() - t0) * self._fps)
        try:
            if due > self._index + 1:
                # Behind by more than a frame (the sender started late or the loop stalled): skip
                # ahead instead of bursting stale frames. The engine still sees every tick, so its
                # frame k stays frame k of the audio timeline; only the skipped images are dropped.
                for _ in range(due - self._index):
                    self._source.next_video_frame()
                self.stats.skipped += due - self._index
                self._index = due
            while True:
                k = self._index
                self._index += 1
                lateness = await _sleep_until(t0 + k / self._fps)
                if self.readyState != "live":
                    raise MediaStreamError
                out = self._source.next_video_frame()  # the engine's bookkeeping, on the loop (not thread-safe)
                if k % self._step.fps_divisor == 0:
                    break
                self.thinned += 1   # a frame-rate step: this tick is not sent
            frame = await self._to_frame(out)
        except (MediaStreamError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._failed(exc) from exc
        frame.pts = round(k * VIDEO_CLOCK_RATE / self._fps)
        frame.time_base = VIDEO_TIME_BASE
        self.stats.record(lateness, time.monotonic())
        return frame


AUDIO_MAX_LAG_S = 0.080
"""How late the audio track may hand a frame over before it skips to the frame due now (4 frames).

Large enough that ordinary jitter never triggers it: the loop-lag target is p99 <= 20 ms with 8
sessions (issue #15) and aiortc's sender pulls the next frame right after encoding the last, so a
healthy sender hands frames over within a frame or two of their time. Small enough that the audio
never falls far behind the video, which skips ticks as soon as it is more than one 40 ms frame late:
the two stay within ~80 + 40 ms of each other, inside what viewers tolerate for audio lagging the
picture (ITU-R BT.1359: undetectable up to ~125 ms of audio lag, acceptable up to ~185 ms).
Without a bound the audio only ever fell further behind under load (seconds of A/V offset in an
overloaded soak); with it the offset stays within the bound. The runs are in bench/RESULTS.md "Audio lag
bound" (`bench/soak.py --minutes 2 --sessions 6`).
"""


class SyncedAudioTrack(_EngineTrack):
    """The input audio delayed by the engine to match the video: 20 ms frames, 16 kHz mono s16.

    Like the video, the audio follows the media clock whatever the load: a frame handed over up to
    `AUDIO_MAX_LAG_S` late (a late start, a jittery loop) goes out at once with the missed frames
    before it, which the receiver's jitter buffer absorbs; later than that (a starved loop), the track
    skips to the frame due now. The skipped span is still taken from the engine and discarded, so the
    engine's output timeline stays on the wall clock like the video's, and the frame's pts jumps by the
    gap: aiortc's Opus and G.711 encoders derive the RTP timestamp from frame.pts (through PyAV's
    resampler and codec), so the receiver sees the gap and conceals it as loss (ARCHITECTURE.md
    "aiortc and aioice internals"). Skipped frames count in `stats.skipped`.
    """

    kind = "audio"

    def __init__(self, source: EngineSession, clock: MediaClock, on_error: OnError | None = None) -> None:
        super().__init__(on_error)
        self._source = source
        self._clock = clock
        self._sample = 0
        self.stats = PacerStats()

    def _skip_if_too_late(self, t0: float) -> None:
        """Skip to the frame due now when the next one is over `AUDIO_MAX_LAG_S` late."""
        elapsed = time.monotonic() - t0
        if elapsed - self._sample / AUDIO_RATE <= AUDIO_MAX_LAG_S:
            return
        due = int(elapsed * AUDIO_RATE) // AUDIO_SAMPLES * AUDIO_SAMPLES
        skipped = due - self._sample
        self._source.next_audio(skipped)  # keeps the engine's audio timeline on the clock; discarded
        self.stats.skipped += skipped // AUDIO_SAMPLES
        self._sample = due

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        t0 = self._clock.origin()
        await _sleep_until(t0 + self._sample / AUDIO_RATE)
        if self.readyState != "live":
            raise MediaStreamError
        try:
            # Checked after the sleep, right before the frame is taken: a loop stall during the sleep
            # is caught here, so no frame leaves more than the bound late.
            self._skip_if_too_late(t0)
            j = self._sample
            samples = np.asarray(self._source.next_audio(AUDIO_SAMPLES), dtype=np.float32).reshape(-1)
        except Exception as exc:
            raise self._failed(exc) from exc
        self._sample = j + AUDIO_SAMPLES
        lateness = max(0.0, time.monotonic() - (t0 + j / AUDIO_RATE))
        if samples.shape[0] != AUDIO_SAMPLES:  # be strict about frame size: Opus needs steady frames
            samples = np.resize(np.pad(samples, (0, max(0, AUDIO_SAMPLES - samples.shape[0]))),
                                AUDIO_SAMPLES)
        pcm = np.clip(samples * 32767.0, -32768, 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = j
        frame.time_base = AUDIO_TIME_BASE
        self.stats.record(lateness, time.monotonic())
        return frame


def frame_to_pcm(frame: av.AudioFrame) -> tuple[np.ndarray, int, int]:
    """An incoming audio frame as (interleaved samples, rate, channels); int16 or float32 as decoded."""
    channels = len(frame.layout.channels)
    data = frame.to_ndarray()
    if frame.format.is_planar and channels > 1:  # (channels, n) -> interleaved
        data = data.T
    return np.ascontiguousarray(data).reshape(-1), frame.sample_rate, channels


async def pump_microphone(track: MediaStreamTrack, sink: Callable[[np.ndarray, int, int], None],
                          on_end: Callable[[], object] | None = None) -> None:
    """Read the browser's microphone track into `sink(samples, rate, channels)` until the track ends."""
    frames = 0
    try:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            if not isinstance(frame, av.AudioFrame):  # an audio track yields audio frames; typed as any frame
                continue
            sink(*frame_to_pcm(frame))
            frames += 1
    finally:
        log.debug("microphone track ended after %d frames", frames)
        if on_end is not None:
            on_end()


async def drain(track: MediaStreamTrack, clock: MediaClock) -> None:
    """Pull a track that no sender reads, at its own pace, from when the clock starts until it stops."""
    await clock.wait_started()
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        pass

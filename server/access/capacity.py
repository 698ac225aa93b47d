"""Admission by measured capacity: how many sessions this process can serve at full frame rate.

A fixed `--max-sessions` is wrong on every machine but the one it was tuned on: on a slower one the
last admitted session degrades all of them, on a bigger one sessions are refused that would have fit.
So the server measures what one session costs here, with this renderer and avatar size, and admits a
session only while every admitted one can still be served with headroom:

- **At start** (`measure_session_cost`, runner.py): one probe session of the loaded engine is driven in
  real time for about a second and a half, speaking, with everything the server does per frame: the
  engine (push_audio, next_video_frame, next_audio; the render worker renders its jobs), the frame
  conversion (`tracks.video_frame`), the video encode with the real-time encoder the senders use
  (VP8, the codec browsers offer first), two 20 ms Opus frames, and the RTP packetisation. The process's
  CPU time over the probe, less its idle rate, is the session's CPU per frame; the probe thread's own
  engine and audio time is the part that runs on the event loop in the server (GIL-bound Python).
- **Live** (`CapacityMonitor`, once a second on the loop): the process's CPU rate and the loop thread's
  CPU rate, each divided by the live sessions, and how many video ticks were late (a pacer skip or a
  speech frame whose render missed its deadline). A session's cost is the larger of the start-up
  probe and the live figure, so a busier machine (other processes, a noisy session mix) only lowers the
  capacity; a late-tick rate above `LATE_FRACTION` freezes admission at the live count for `hold_s`.

The capacity is the smallest of three bounds: the CPU (`headroom` x the machine's cores over a session's
cores, less the sessions other worker processes hold on the same cores), the event loop (`headroom` x one
thread, over a session's loop share: one loop and one GIL serve every session of a process), and
`--max-sessions N` when one is given (per process). A lone process never goes below 1 (a server that
admits nothing serves nothing; its one session says how it fares).
`/healthz` `free_slots` and the 503 of `POST /offer` read the same `CapacityModel`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from realtime.timeline.session_options import SessionOptions
from server.config import ServerConfig
from server.engine import Engine, EngineSession
from server.media import encoders
from server.media.tracks import AUDIO_RATE, AUDIO_SAMPLES, AvatarVideoTrack, MediaClock, SyncedAudioTrack

log = logging.getLogger(__name__)

DEFAULT_SESSIONS = 4  # --max-sessions auto before anything was measured (an engine handed in by a test)
# What sizes per-session budgets sized before the measurement (the server-wide stream cap,
# server/access/stream_limits.py) under --max-sessions auto: more sessions than a process serves anywhere.
AUTO_SESSIONS_BOUND = 32
DEFAULT_HEADROOM = 0.75
LATE_FRACTION = 0.02  # late video ticks in a window above this: overloaded (the benches' pass rule)
MIN_WINDOW_FRAMES = 25  # a lateness window needs at least a second of one session's frames


@dataclass(frozen=True)
class SessionCost:
    """What one speaking session costs this process, in ms of CPU per video frame.

    `cpu_ms` counts every thread (event loop, frame pool, encoders, render worker); `loop_ms` only the
    work the server runs on its event loop. `stages` is the probe's split (for logs and /metrics)."""

    cpu_ms: float
    loop_ms: float
    stages: tuple[tuple[str, float], ...] = ()

    def cores(self, fps: float) -> float:
        return self.cpu_ms * fps / 1000.0

    def loop_cores(self, fps: float) -> float:
        return self.loop_ms * fps / 1000.0


@dataclass(frozen=True)
class LiveSample:
    """One window of the live monitor: rates over `seconds` with `sessions` live sessions."""

    seconds: float
    sessions: int
    process_cores: float  # the whole process's CPU seconds per second
    loop_cores: float     # the event-loop thread's
    frames: int           # video ticks of the live sessions in the window
    late: int             # of them late: skipped by the pacer, or a speech frame whose render missed


class CapacityModel:
    """The number of sessions this process admits now (`limit`), from the measured costs.

    Without a measured cost (`cost=None`: an engine handed in by a caller, not loaded and probed here)
    the limit is `upper_bound`, or DEFAULT_SESSIONS for auto, and live samples are ignored: there is
    nothing to correct."""

    def __init__(self, fps: float, upper_bound: int | None, cores: float, cost: SessionCost | None = None,
                 headroom: float = DEFAULT_HEADROOM, hold_s: float = 10.0, smoothing: float = 0.3,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if upper_bound is not None and upper_bound < 1:
            raise ValueError("upper_bound must be at least 1 (None: auto)")
        if not 0 < headroom <= 1:
            raise ValueError("headroom must be in (0, 1]")
        self.fps = float(fps)
        self.upper_bound = upper_bound
        self.cores = float(cores)
        self.calibrated = cost
        self.headroom = headroom
        self.hold_s = hold_s
        self.smoothing = smoothing
        self._clock = clock
        self._live_cpu_ms: float | None = None   # per session per frame, smoothed
        self._live_loop_ms: float | None = None
        self._frozen_until = -math.inf
        self.overloads = 0  # windows that froze admission
        # With --workers: the sessions the other worker processes hold (the shared board), which take
        # their share of the same cores. None: this process is the only one.
        self.others: Callable[[], int] | None = None

    def calibrate(self, cost: SessionCost) -> None:
        """Adopt the start-up probe's cost (before serving): from now on the limit is measured."""
        self.calibrated = cost

    @property
    def measured(self) -> bool:
        return self.calibrated is not None

    def cost(self) -> SessionCost | None:
        """The cost admission uses: the larger of the start-up probe and the live figure, per part."""
        if self.calibrated is None:
            return None
        cpu, loop = self.calibrated.cpu_ms, self.calibrated.loop_ms
        if self._live_cpu_ms is not None:
            cpu = max(cpu, self._live_cpu_ms)
        if self._live_loop_ms is not None:
            loop = max(loop, self._live_loop_ms)
        return SessionCost(cpu_ms=cpu, loop_ms=loop, stages=self.calibrated.stages)

    def bounds(self) -> dict[str, int | None]:
        """Each bound by name (None: not measured / not given): the CPU, the event loop, the flag. The
        CPU and the flag are the server's (all worker processes together): the other workers' sessions
        count against them; the loop is this process's own."""
        cost = self.cost()
        cpu = loop = None
        others = self._others()
        if cost is not None:
            cpu = max(0, _fit(self.headroom * self.cores, cost.cores(self.fps)) - others)
            loop = _fit(self.headroom * 1.0, cost.loop_cores(self.fps))
        flag = None if self.upper_bound is None else max(0, self.upper_bound - others)
        return {"cpu": cpu, "loop": loop, "max_sessions": flag}

    def shared_room(self, live: int) -> int | None:
        """Sessions the server as a whole still takes by its shared bounds (the cores, --max-sessions),
        counting every worker's (`live`: this process's live and negotiating ones); None when neither
        applies. The server-wide free slots never exceed it."""
        room = [b for key, b in self.bounds().items() if key != "loop" and b is not None]
        return max(0, min(room) - live) if room else None

    def _others(self) -> int:
        return 0 if self.others is None else self.others()

    def capacity(self) -> int:
        """Sessions this process may hold with headroom, ignoring a current overload. At least 1 when
        it is the only process (one session says how this machine fares); with other workers holding
        sessions, 0 when they already fill the cores."""
        if self.calibrated is None:
            return max(0, (self.upper_bound or DEFAULT_SESSIONS) - self._others())
        floor = 1 if self._others() == 0 else 0
        return max(floor, min(b for b in self.bounds().values() if b is not None))

    def limit(self, live: int) -> int:
        """Sessions admitted in all now: the capacity, or no more than `live` while overloaded."""
        capacity = self.capacity()
        if self.overloaded() and live:
            return min(capacity, live)
        return capacity

    def overloaded(self) -> bool:
        return self._clock() < self._frozen_until

    def retry_after_s(self) -> int:
        """What a refused offer is told: the rest of an overload hold, else 5 s."""
        left = self._frozen_until - self._clock()
        return max(1, math.ceil(left)) if left > 0 else 5

    def observe(self, sample: LiveSample) -> None:
        """Fold in one live window (ignored without a start-up measurement)."""
        if self.calibrated is None or sample.seconds <= 0 or sample.sessions < 1:
            return
        per_frame = 1000.0 / (self.fps * sample.sessions)  # ms of CPU per frame per core busy
        cpu_ms, loop_ms = sample.process_cores * per_frame, sample.loop_cores * per_frame
        a = self.smoothing
        self._live_cpu_ms = cpu_ms if self._live_cpu_ms is None else (1 - a) * self._live_cpu_ms + a * cpu_ms
        self._live_loop_ms = loop_ms if self._live_loop_ms is None else (1 - a) * self._live_loop_ms + a * loop_ms
        if sample.frames >= MIN_WINDOW_FRAMES and sample.late > LATE_FRACTION * sample.frames:
            if not self.overloaded():
                self.overloads += 1
                log.warning("sessions are late (%d of %d video ticks in %.1f s with %d sessions): "
                            "admitting no more for %g s", sample.late, sample.frames, sample.seconds,
                            sample.sessions, self.hold_s)
            self._frozen_until = self._clock() + self.hold_s

    def describe(self) -> dict[str, Any]:
        cost = self.cost()
        return {
            "measured": self.measured,
            "capacity": self.capacity(),
            "overloaded": self.overloaded(),
            "bounds": self.bounds(),
            "cores": round(self.cores, 2),
            "headroom": self.headroom,
            "cpu_ms_per_frame": None if cost is None else round(cost.cpu_ms, 2),
            "loop_ms_per_frame": None if cost is None else round(cost.loop_ms, 2),
        }


def _fit(budget: float, per_session: float) -> int:
    return 1_000_000 if per_session <= 0 else int(budget // per_session)


def unmeasured_capacity(config: ServerConfig, fps: float) -> CapacityModel:
    """The model of an app whose engine was not probed: the fixed `--max-sessions` (auto: DEFAULT_SESSIONS)."""
    return CapacityModel(fps, config.max_sessions or None, usable_cores(), None, config.capacity_headroom)


def usable_cores() -> float:
    """The cores this server may use: its CPU affinity (shared by all its worker processes)."""
    try:
        return float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return float(os.cpu_count() or 1)


# -- live ------------------------------------------------------------------------------------------


@dataclass
class _Seen:
    frames: int
    late: int


class CapacityMonitor:
    """Once every `interval_s`, on the event loop: the process and loop-thread CPU rates and the live
    sessions' late ticks, into `model.observe`. `time.thread_time()` called here is the loop thread's
    CPU clock, since this coroutine runs on it."""

    def __init__(self, model: CapacityModel, ticks: Callable[[], Iterable[tuple[str, int, int]]],
                 interval_s: float = 1.0) -> None:
        self.model = model
        self._ticks = ticks  # (session id, video ticks so far, late ticks so far) of each live session
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[str, _Seen] = {}

    def start(self) -> None:
        if self.model.measured and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="capacity-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _late_ticks(self) -> tuple[int, int, int]:
        frames = late = sessions = 0
        seen: dict[str, _Seen] = {}
        for session_id, total, total_late in self._ticks():
            before = self._seen.get(session_id)
            if before is not None:
                frames += max(0, total - before.frames)
                late += max(0, total_late - before.late)
            seen[session_id] = _Seen(total, total_late)
            sessions += 1
        self._seen = seen
        return sessions, frames, late

    async def _run(self) -> None:
        wall, cpu, loop_cpu = time.monotonic(), time.process_time(), time.thread_time()
        self._late_ticks()
        while True:
            await asyncio.sleep(self.interval_s)
            now, cpu_now, loop_now = time.monotonic(), time.process_time(), time.thread_time()
            sessions, frames, late = self._late_ticks()
            dt = now - wall
            if dt > 0:
                self.model.observe(LiveSample(seconds=dt, sessions=sessions,
                                              process_cores=(cpu_now - cpu) / dt,
                                              loop_cores=(loop_now - loop_cpu) / dt,
                                              frames=frames, late=late))
            wall, cpu, loop_cpu = now, cpu_now, loop_now


# -- start-up probe ----------------------------------------------------------------------------------


def probe_speech(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-modulated signal (a 120 Hz pulse train with two formant-like harmonics bands,
    4 syllables a second) that the engine's VAD takes for speech, so the probe renders mouths."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120.0 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30))
    formants = 0.6 * np.sin(2 * np.pi * 700 * t) * np.sin(phase) + 0.3 * np.sin(2 * np.pi * 1200 * t) * np.sin(phase)
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t), 0.15, 1.0)
    signal: np.ndarray = (voiced * 0.3 + formants) * envelope + 0.01 * rng.standard_normal(t.shape)
    out: np.ndarray = (0.5 * signal / np.max(np.abs(signal))).astype(np.float32)
    return out


async def measure_session_cost(engine: Engine, frame_pool: Executor | None = None, seconds: float = 2.0,
                               idle_s: float = 0.3, codec: str = "VP8") -> SessionCost:
    """Serve one probe session of `engine` on this event loop for `seconds`, speaking, the way the
    server serves one, and return its cost per video frame.

    The session's own `AvatarVideoTrack` and `SyncedAudioTrack` (server/media/tracks.py, frames built on
    `frame_pool`) are pulled as aiortc's RTCRtpSender pulls them: `await track.recv()`, the encode on the
    loop's default executor (the real-time VP8 and Opus encoders the senders use), then the RTP packets
    built on the loop. Speech arrives every 20 ms, as a microphone's frames do. Run before serving, with
    nothing else on the loop: the loop thread's CPU over the probe is the session's loop share (asyncio
    and the hops included), the process's CPU (render worker, frame pool and encoders included) its
    total; each less its idle rate, measured over `idle_s` first. Not included: SRTP, the UDP send, RTCP
    and ICE housekeeping, which the live figure (`CapacityMonitor`) adds once sessions run."""
    loop = asyncio.get_running_loop()
    fps = float(engine.fps)
    encoder = encoders.get_encoder(RTCRtpCodecParameters(mimeType=f"video/{codec}", clockRate=90000))
    opus = encoders.get_encoder(RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2))
    speech = probe_speech(seconds + 1.0)
    encode_s = {"video_encode": 0.0, "audio_encode": 0.0}

    def encode(stage: str, coder: Any, frame: Any) -> tuple[list[bytes], int]:
        start = time.thread_time()
        try:
            packets: tuple[list[bytes], int] = coder.encode(frame, False)  # aiortc's encoder: untyped
            return packets
        finally:
            encode_s[stage] += time.thread_time() - start

    async def send(track: MediaStreamTrack, stage: str, coder: Any) -> None:
        sequence = 0
        while True:
            frame = await track.recv()
            payloads, stamp = await loop.run_in_executor(None, encode, stage, coder, frame)
            sequence = _packetize(payloads, sequence, stamp)

    async def speak(session: EngineSession) -> None:
        for i in range(0, len(speech), AUDIO_SAMPLES):
            session.push_audio(speech[i:i + AUDIO_SAMPLES], AUDIO_RATE)
            await asyncio.sleep(AUDIO_SAMPLES / AUDIO_RATE)

    wall, cpu, loop_cpu = time.monotonic(), time.process_time(), time.thread_time()
    await asyncio.sleep(idle_s)
    elapsed = time.monotonic() - wall
    idle_cores = (time.process_time() - cpu) / elapsed
    idle_loop = (time.thread_time() - loop_cpu) / elapsed
    session = engine.open_session(SessionOptions(), name="capacity-probe")
    clock = MediaClock()
    video = AvatarVideoTrack(session, fps, clock, executor=frame_pool)
    audio = SyncedAudioTrack(session, clock)
    tasks = [loop.create_task(speak(session), name="capacity-probe-speech"),
             loop.create_task(send(video, "video_encode", encoder), name="capacity-probe-video"),
             loop.create_task(send(audio, "audio_encode", opus), name="capacity-probe-audio")]
    try:
        wall, cpu, loop_cpu = time.monotonic(), time.process_time(), time.thread_time()
        done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # a failing engine or encoder fails the start, loudly
        elapsed = time.monotonic() - wall
        cpu_s = max(0.0, time.process_time() - cpu - idle_cores * elapsed)
        loop_s = max(0.0, time.thread_time() - loop_cpu - idle_loop * elapsed)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        video.stop()
        audio.stop()
        session.close()
    frames = max(1, video.stats.frames)
    per_frame = {name: 1000.0 * value / frames for name, value in encode_s.items()}
    cpu_ms, loop_ms = 1000.0 * cpu_s / frames, 1000.0 * loop_s / frames
    per_frame["event_loop"] = loop_ms
    per_frame["render_frame_build_other"] = max(0.0, cpu_ms - sum(per_frame.values()))
    cost = SessionCost(cpu_ms=max(cpu_ms, sum(per_frame.values())), loop_ms=loop_ms,
                       stages=tuple((name, round(value, 3)) for name, value in per_frame.items()))
    log.info("one session costs %.2f ms of CPU per frame (%.2f on the event loop) at %g fps", cost.cpu_ms,
             loop_ms, fps, extra={"stages": dict(cost.stages), "probe_frames": frames,
                                  "idle_cores": round(idle_cores, 3)})
    return cost


def _packetize(payloads: list[bytes], sequence: int, timestamp: int) -> int:
    """The RTP packets a sender builds for one encoded frame (serialised; SRTP and the send not included)."""
    for i, payload in enumerate(payloads):
        packet = RtpPacket(payload_type=96, sequence_number=sequence, timestamp=timestamp % (1 << 32))
        packet.payload = payload
        packet.marker = int(i == len(payloads) - 1)
        packet.serialize()
        sequence = (sequence + 1) % (1 << 16)
    return sequence

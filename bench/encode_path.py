"""The encode path of a live session, for the benches that measure it: a session driven the way the server
drives it (its tracks, encoders and RTP/SRTP send) with a per-stage CPU split. A library module, not a bench:
bench/encoded_sessions.py and bench/sessions.py call `sessions_with_encode`; what each step mirrors is in
bench/encoded_sessions.py's docstring.
"""
from __future__ import annotations

import asyncio
import contextvars
import fractions
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiortc.rtcrtpsender
import pylibsrtp
from aiortc import clock as ntp_clock
from aiortc import rtp
from aiortc.codecs import HEADER_EXTENSIONS
from aiortc.codecs import get_encoder as aiortc_get_encoder
from aiortc.codecs.base import Encoder
from aiortc.codecs.opus import OpusEncoder
from aiortc.rtcdtlstransport import SRTP_PROFILES
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpParameters

from realtime.config import EngineConfig
from realtime.renderers import compositor
from realtime.timeline.session_options import SessionOptions
from server.media import encoders, opus_fec, tracks
from server.media.media_executor import MediaExecutor, limit_native_threads
from server.media.opus_fec import FecOpusDecoder, MicrophoneFrame
from server.media.tracks import AvatarVideoTrack, MediaClock, SyncedAudioTrack, frame_to_pcm
from server.ops.event_loop import DEFAULT_LOOP, loop_factory
from server.realtime_engine import RealtimeEngine

log = logging.getLogger("bench.encoded_sessions")

STEPS = (1, 2, 4, 6, 8, 10, 12, 16, 24, 32)
MAX_MISSED = 0.02          # share of video ticks that may be missed or late, per session
MAX_DROPPED = 0.02         # share of speech frames the engine may drop (bench/sessions.py)
EXECUTOR_PREFIX = "bench-encode"


def codec_parameters(codec: str) -> RTCRtpCodecParameters:
    """What the answer negotiates for `codec` (payload types do not matter to the encoders)."""
    name = codec.upper()
    if name == "VP8":
        return RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)
    if name == "H264":
        return RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=99,
                                     parameters={"packetization-mode": "1", "level-asymmetry-allowed": "1",
                                                 "profile-level-id": "42e01f"})
    if name == "OPUS":
        return RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    raise ValueError(f"unknown codec {codec!r} (VP8, H264)")


def server_config(renderer: Any) -> EngineConfig:
    """The EngineConfig RealtimeEngine.load builds: budget fitted to Wav2Lip, fixed for the default."""
    return EngineConfig(fit_budget_to_renderer=getattr(renderer, "name", "") != "default")


# -- CPU accounting ---------------------------------------------------------------------------------

class StageClock:
    """Thread CPU seconds per stage, added from whichever thread did the work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cpu: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.cpu[stage] = self.cpu.get(stage, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.thread_time()
        try:
            yield
        finally:
            self.add(name, time.thread_time() - t0)


def thread_cpu(ident: int | None) -> float:
    """CPU seconds of a live Python thread (0 if it is gone)."""
    if ident is None:
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (OSError, ProcessLookupError):
        return 0.0


def python_threads() -> dict[str, list[int]]:
    """Idents of the Python threads this bench cares about, by role."""
    roles: dict[str, list[int]] = {"loop": [], "render": [], "executor": []}
    for t in threading.enumerate():
        if t.ident is None:
            continue
        if t is threading.current_thread():
            roles["loop"].append(t.ident)
        elif t.name.startswith("render-"):
            roles["render"].append(t.ident)
        elif t.name.startswith(EXECUTOR_PREFIX):
            roles["executor"].append(t.ident)
    return roles


@contextmanager
def timed_paste(clock: StageClock) -> Iterator[None]:
    """Time compositor.paste where the session calls it (realtime.timeline.session looks it up per call)."""
    original = compositor.paste

    def paste(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            clock.add("composite", time.thread_time() - t0)

    compositor.paste = paste
    try:
        yield
    finally:
        compositor.paste = original


class TimedSource:
    """The session as the tracks see it (server.engine.EngineSession), timing the engine's calls."""

    def __init__(self, session: Any, clock: StageClock) -> None:
        self.session = session
        self._clock = clock
        self.engine_cpu = 0.0  # running total, so a recv can tell its own engine time apart

    def _timed(self, stage: str, fn, *args):
        t0 = time.thread_time()
        try:
            return fn(*args)
        finally:
            dt = time.thread_time() - t0
            self.engine_cpu += dt
            self._clock.add(stage, dt)

    def next_video_frame(self):
        return self._timed("engine_output", self.session.next_video_frame)

    def next_audio(self, n_samples: int) -> np.ndarray:
        return self._timed("engine_output", self.session.next_audio, n_samples)

    def push_audio(self, samples: np.ndarray, sample_rate: int, channels: int = 1) -> int:
        return self._timed("engine_input", self.session.push_audio, samples, sample_rate, channels)


_woke: contextvars.ContextVar[float | None] = contextvars.ContextVar("woke", default=None)


@contextmanager
def timed_track_wakeups() -> Iterator[None]:
    """Note (thread CPU, nothing else) when a track's recv wakes from its pacing sleep.

    The tracks' recv has one await, `_sleep_until`; what it does after waking (the engine call and
    building the av frame) runs without yielding, so thread CPU from the wake-up to the end of recv
    is that recv's own work. The send loop reads the mark (same task, same context)."""
    original = tracks._sleep_until

    async def sleep_until(deadline: float) -> float:
        late = await original(deadline)
        _woke.set(time.thread_time())
        return late

    tracks._sleep_until = sleep_until
    try:
        yield
    finally:
        tracks._sleep_until = original


class TimedVideoEncoder(Encoder):
    """aiortc's video encoder, with the yuv420p conversion it would make itself timed apart. An aiortc
    `Encoder`, so the server's executor runs it where it runs a sender's encodes (its encoder threads,
    behind audio: server/media/media_executor.py `is_encode`), not on the pool for other work."""

    def __init__(self, encoder: Any, clock: StageClock) -> None:
        self.encoder = encoder
        self._clock = clock

    def encode(self, frame: av.VideoFrame, force_keyframe: bool = False):
        if frame.format.name != "yuv420p":
            with self._clock.stage("colour_conversion"):
                frame = frame.reformat(format="yuv420p")
        with self._clock.stage("video_encode_call"):
            return self.encoder.encode(frame, force_keyframe)

    def pack(self, packet: Any):
        return self.encoder.pack(packet)


class TimedAudioEncoder(Encoder):
    """aiortc's Opus encoder, timed. Registered as an `OpusEncoder` so the executor's audio-first rule
    (`is_audio_encode`) serves it before queued video, as it serves the senders' Opus encodes."""

    def __init__(self, encoder: Any, clock: StageClock) -> None:
        self.encoder = encoder
        self._clock = clock

    def encode(self, frame: av.AudioFrame, force_keyframe: bool = False):
        with self._clock.stage("audio_encode_call"):
            return self.encoder.encode(frame, force_keyframe)

    def pack(self, packet: Any):
        return self.encoder.pack(packet)


OpusEncoder.register(TimedAudioEncoder)


class RtpOut:
    """What RTCRtpSender._run_rtp does on the loop with each encoded frame: one RtpPacket per payload
    (mid, abs-send-time, and the audio level for audio), serialised, SRTP-protected (aiortc's first
    profile, a random key) and sent as a UDP datagram (to the trial's client, bench/rtp_counter.py)."""

    def __init__(self, kind: str, payload_type: int, sink: socket.socket, address: tuple) -> None:
        self.extensions = rtp.HeaderExtensionsMap()
        self.extensions.configure(RTCRtpParameters(headerExtensions=HEADER_EXTENSIONS[kind]))
        profile = SRTP_PROFILES[0]
        key = os.urandom(profile.key_length + profile.salt_length)
        self.srtp = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                                                       srtp_profile=profile.libsrtp_profile))
        self.payload_type = payload_type
        self.ssrc = random.getrandbits(32)
        self.sequence = random.getrandbits(16)
        self.timestamp_origin = random.getrandbits(32)
        self.sink, self.address = sink, address

    def send(self, payloads: list[bytes], timestamp: int, audio_level: int | None) -> None:
        for i, payload in enumerate(payloads):
            packet = rtp.RtpPacket(payload_type=self.payload_type, sequence_number=self.sequence,
                                   timestamp=(self.timestamp_origin + timestamp) % (1 << 32))
            packet.ssrc = self.ssrc
            packet.payload = payload
            packet.marker = int(i == len(payloads) - 1)
            packet.extensions.abs_send_time = (ntp_clock.current_ntp_time() >> 14) & 0x00FFFFFF
            packet.extensions.mid = "0"
            if audio_level is not None:
                packet.extensions.audio_level = (False, -audio_level)
            data = self.srtp.protect(packet.serialize(self.extensions))
            try:
                self.sink.sendto(data, self.address)
            except BlockingIOError:  # the reader's buffer is full: a real network would drop too
                pass
            self.sequence = (self.sequence + 1) % (1 << 16)


VIDEO_PT = 97
AUDIO_PT = 111


class RtpCounter:
    """The bench's client, bench/rtp_counter.py, in a process of its own: `address` to send to; `result()`
    stops it and returns what it received (video frames per SSRC, its CPU)."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("rtp_counter.py")),
                                       str(VIDEO_PT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self.address = ("127.0.0.1", int(self._proc.stdout.readline()))
        self._result: dict | None = None

    def result(self) -> dict:
        if self._result is None:
            out, _ = self._proc.communicate("stop\n", timeout=30)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            self._result = json.loads(lines[-1]) if lines else {"streams": {}, "cpu_s": 0.0}
        return self._result

    def __enter__(self) -> RtpCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


# -- one session ------------------------------------------------------------------------------------

@dataclass
class VideoLog:
    ticks: int = 0               # ticks due during the trial
    encoded: int = 0             # frames encoded (of those ticks)
    late: int = 0                # encoded more than one frame period after their tick
    lateness_ms: list[float] = field(default_factory=list)


async def send_loop(track: Any, source: TimedSource, encoder: Any, out: RtpOut, stop_at: float,
                    clock: MediaClock, fps: float, video: VideoLog | None, stages: StageClock) -> None:
    """aiortc's RTCRtpSender loop: recv, encode in the loop's default executor, RTP/SRTP out."""
    loop = asyncio.get_running_loop()
    while True:
        _woke.set(None)
        engine_before = source.engine_cpu
        frame = await track.recv()
        woke = _woke.get()
        if woke is not None:
            # the track's own work after its pacing sleep, minus the engine call made in it
            own = time.thread_time() - woke - (source.engine_cpu - engine_before)
            stages.add("frame_build" if video is not None else "audio_build", max(own, 0.0))
        level = None
        if video is None:
            with stages.stage("audio_build"):
                level = rtp.compute_audio_level_dbov(frame)  # the sender does this on the loop
        # the encoder may rebase the frame's pts to its own time base in place: read the tick first
        pts, time_base = frame.pts, frame.time_base
        payloads, timestamp = await loop.run_in_executor(None, encoder.encode, frame, False)
        if payloads:
            with stages.stage("rtp_send"):
                out.send(payloads, timestamp, level)
        done = time.monotonic()
        if video is not None:
            k = round(pts * time_base * fps)
            due = clock.origin() + k / fps
            if due >= stop_at:
                return
            video.encoded += 1
            lateness = done - due
            video.lateness_ms.append(1000.0 * lateness)
            if lateness > 1.0 / fps:
                video.late += 1
        elif clock.origin() + float(pts * time_base) >= stop_at:
            return


async def push_loop(source: TimedSource, wav: np.ndarray, rate: int, clock: MediaClock) -> None:
    """20 ms chunks of speech in real time from the session's start."""
    await clock.wait_started()
    t0 = clock.origin()
    chunk = rate // 50
    for c, start in enumerate(range(0, len(wav), chunk)):
        delay = t0 + 0.02 * c - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        source.push_audio(wav[start:start + chunk], rate)


OPUS_RATE = 48000
OPUS_FRAME = 960   # 20 ms at 48 kHz


def browser_opus(wav: np.ndarray, rate: int) -> list[tuple[bytes, int]]:
    """The speech as a browser's microphone sends it: Opus 20 ms packets from 48 kHz stereo (32 kb/s,
    voip, in-band FEC on), as (payload, 48 kHz RTP timestamp). Made once before a trial: the client's
    encode is not the server's cost."""
    codec = av.CodecContext.create("libopus", "w")
    assert isinstance(codec, av.AudioCodecContext)
    codec.bit_rate, codec.format, codec.layout = 32000, "s16", "stereo"
    codec.sample_rate, codec.time_base = OPUS_RATE, fractions.Fraction(1, OPUS_RATE)
    codec.options = {"application": "voip", "fec": "1", "packet_loss": "5"}
    x = np.interp(np.arange(int(len(wav) * OPUS_RATE / rate)) * rate / OPUS_RATE, np.arange(len(wav)), wav)
    pcm = np.clip(x * 32767, -32768, 32767).astype(np.int16)
    packets: list[tuple[bytes, int]] = []
    first: int | None = None
    for i in range(0, len(pcm) - OPUS_FRAME + 1, OPUS_FRAME):
        frame = av.AudioFrame.from_ndarray(np.repeat(pcm[i:i + OPUS_FRAME], 2).reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = OPUS_RATE, i, fractions.Fraction(1, OPUS_RATE)
        for p in codec.encode(frame):
            assert p.pts is not None
            first = p.pts if first is None else first
            packets.append((bytes(p), int(p.pts - first)))
    return packets


async def microphone_loop(source: TimedSource, packets: list[tuple[bytes, int]], clock: MediaClock,
                          stages: StageClock, baseline: bool) -> None:
    """The speech as the server receives a microphone: each Opus packet in real time, decoded by the
    decoder the server installs for its receivers (server.media.opus_fec.get_decoder, fed the MicrophoneFrames its
    receive buffer makes: 16 kHz mono; the baseline: 48 kHz stereo as before), then server.media.tracks'
    frame_to_pcm and the session's push_audio, as pump_microphone and AudioInput do. The server decodes
    in aiortc's decoder thread; here it runs on the loop, timed apart (`mic_decode`)."""
    decoder = FecOpusDecoder() if baseline else opus_fec.get_decoder(codec_parameters("opus"))
    await clock.wait_started()
    t0 = clock.origin()
    for c, (data, timestamp) in enumerate(packets):
        delay = t0 + 0.02 * c - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        with stages.stage("mic_decode"):
            frames = decoder.decode(MicrophoneFrame(data=data, timestamp=timestamp))
            pcm = [frame_to_pcm(frame) for frame in frames if isinstance(frame, av.AudioFrame)]
        for samples, rate, channels in pcm:
            source.push_audio(samples, rate, channels)


def encoder_factory(baseline: bool):
    """What an RTCRtpSender calls to make its encoder: the server's (server.media.encoders, installed by
    create_app), or aiortc's own settings for the baseline."""
    if baseline:
        return aiortc_get_encoder
    encoders.install()
    return aiortc.rtcrtpsender.get_encoder  # looked up per sender, as the sender does


def bgr24_frame(image: np.ndarray) -> av.VideoFrame:
    """The track's frame before yuv420p frames (baseline): bgr24, converted by the encoder."""
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")


@contextmanager
def server_threads(baseline: bool) -> Iterator[None]:
    """OpenCV's thread count as the server sets it (server.media.media_executor.limit_native_threads, from
    create_app), OpenCV's default for the baseline; restored after."""
    before = cv2.getNumThreads()
    if not baseline:
        limit_native_threads()
    try:
        yield
    finally:
        cv2.setNumThreads(before)


@contextmanager
def baseline_frames(enabled: bool) -> Iterator[None]:
    original = tracks.video_frame
    if enabled:
        tracks.video_frame = bgr24_frame
    try:
        yield
    finally:
        tracks.video_frame = original


async def run_session(engine: RealtimeEngine, i: int, n: int, codec: str, wav: np.ndarray, rate: int,
                      seconds: float, stages: StageClock, baseline: bool, sink: socket.socket,
                      address: tuple, mic: list[tuple[bytes, int]] | None = None) -> dict:
    await asyncio.sleep(i / (n * engine.fps))  # independent peers: arbitrary phases
    session = engine.open_session(SessionOptions(), name=f"s{i}")
    source = TimedSource(session, stages)
    clock = MediaClock()
    video_track = AvatarVideoTrack(source, engine.fps, clock)
    audio_track = SyncedAudioTrack(source, clock)
    get_encoder = encoder_factory(baseline)
    venc = TimedVideoEncoder(get_encoder(codec_parameters(codec)), stages)
    aenc = TimedAudioEncoder(get_encoder(codec_parameters("opus")), stages)
    stop_at = clock.origin() + seconds
    vlog = VideoLog(ticks=int(np.ceil(seconds * engine.fps - 1e-9)))
    video_out = RtpOut("video", VIDEO_PT, sink, address)
    try:
        await asyncio.gather(
            send_loop(video_track, source, venc, video_out, stop_at, clock, engine.fps, vlog, stages),
            send_loop(audio_track, source, aenc, RtpOut("audio", AUDIO_PT, sink, address), stop_at, clock,
                      engine.fps, None, stages),
            push_loop(source, wav, rate, clock) if mic is None
            else microphone_loop(source, mic, clock, stages, baseline))
        metrics = asdict(session.metrics())  # plain data: the results are printed as JSON
    finally:
        video_track.stop()
        audio_track.stop()
        session.close()
    lat = np.asarray(vlog.lateness_ms) if vlog.lateness_ms else np.zeros(1)
    missed = max(0, vlog.ticks - vlog.encoded)
    return {"metrics": metrics, "ticks": vlog.ticks, "encoded": vlog.encoded, "late": vlog.late,
            "missed": missed, "skipped": video_track.stats.skipped, "video_ssrc": video_out.ssrc,
            "encode_lateness_p95_ms": round(float(np.percentile(lat, 95)), 1),
            "encode_lateness_max_ms": round(float(lat.max()), 1)}


# -- one trial --------------------------------------------------------------------------------------

def _cpu_split(stages: StageClock, threads_before: dict[int, float], roles: dict[str, list[int]],
               process_cpu: float, frames: int, wall: float) -> dict:
    """ms of CPU per encoded video frame for each stage, from the stage clocks and the thread clocks."""
    c = stages.cpu

    def thread_total(role: str) -> float:
        return sum(thread_cpu(t) - threads_before.get(t, 0.0) for t in roles[role])

    loop_cpu, render_cpu, executor_cpu = thread_total("loop"), thread_total("render"), thread_total("executor")
    composite = c.get("composite", 0.0)
    engine_in = c.get("engine_input", 0.0)
    engine_out = c.get("engine_output", 0.0) - composite  # compositing is timed inside next_video_frame
    frame_build, audio_build = c.get("frame_build", 0.0), c.get("audio_build", 0.0)
    rtp_send = c.get("rtp_send", 0.0)
    video_call, colour = c.get("video_encode_call", 0.0), c.get("colour_conversion", 0.0)
    audio_call = c.get("audio_encode_call", 0.0)
    mic_decode = c.get("mic_decode", 0.0)  # 0 when the speech is pushed as PCM
    # Threads Python did not start: the encoders' own threads and OpenCV's pool (the renderer's,
    # the compositor's and the track's cv2 calls spread onto it). They carry no names to split them by.
    native = max(0.0, process_cpu - loop_cpu - render_cpu - executor_cpu)
    cpu = {
        "engine_input": engine_in,          # push_audio: resample, mel, VAD, render jobs
        "engine_output": engine_out,        # next_video_frame / next_audio, compositing excluded
        "render": render_cpu,               # the render worker thread
        "composite": composite,             # compositor.paste
        "frame_build": frame_build,         # track: engine image -> av.VideoFrame (yuv420p: the conversion)
        "colour_conversion": colour,        # encoder side: bgr24 -> yuv420p (swscale), 0 for yuv420p frames
        "video_encode": video_call,         # the encoder's call on the executor thread
        "audio": audio_build + audio_call,  # AudioFrame, audio level, Opus encode
        "rtp_send": rtp_send,               # RTP packets, SRTP, UDP send (video and audio)
        "mic_decode": mic_decode,           # the microphone's Opus decode and frame -> PCM (microphone input)
        "native_threads": native,
        "loop_overhead": max(0.0, loop_cpu - engine_in - engine_out - composite - frame_build - audio_build
                             - rtp_send - mic_decode),
        "executor_overhead": max(0.0, executor_cpu - video_call - colour - audio_call),
    }
    summary = {  # the split
        "engine_and_render": engine_in + engine_out + render_cpu,
        "composite": composite,
        "colour_conversion": frame_build + colour,
        "encode": video_call + audio_call,
        "native_threads": native,
        "rtp_send": rtp_send,
        "mic_decode": mic_decode,
        "other": cpu["loop_overhead"] + cpu["executor_overhead"] + audio_build,
    }

    def per_frame(d: dict[str, float]) -> dict[str, float]:
        return {k: round(1000.0 * v / max(frames, 1), 3) for k, v in d.items()}

    return {"ms_per_video_frame": per_frame(cpu), "summary_ms_per_video_frame": per_frame(summary),
            "total_ms_per_video_frame": round(1000.0 * process_cpu / max(frames, 1), 3),
            "cores_used": round(process_cpu / max(wall, 1e-9), 2),
            "loop_thread_cores": round(loop_cpu / max(wall, 1e-9), 2)}


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine (all cores, /proc/stat), to tell how much of the cores
    other processes took during a trial."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def _trial_async(engine: RealtimeEngine, codec: str, wav: np.ndarray, rate: int, n: int,
                       seconds: float, baseline: bool, mic: list[tuple[bytes, int]] | None = None) -> dict:
    loop = asyncio.get_running_loop()
    # aiortc encodes in the loop's default executor: the server's MediaExecutor (runner.py,
    # start_default_executor: one encoder thread per core the loop leaves, audio first); the baseline
    # Python's default pool.
    executor = (ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix=EXECUTOR_PREFIX)
                if baseline else MediaExecutor(name=EXECUTOR_PREFIX))
    loop.set_default_executor(executor)
    stages = StageClock()
    roles = python_threads()
    before = {t: thread_cpu(t) for ids in roles.values() for t in ids}
    # datagrams go to the client (bench/rtp_counter.py, a process of its own): it counts whole video frames
    # by marker bit and decodes nothing
    counter = RtpCounter()
    busy0 = machine_busy()
    p0, w0 = time.process_time(), time.monotonic()
    with counter, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink, \
            timed_paste(stages), timed_track_wakeups(), baseline_frames(baseline), server_threads(baseline):
        sink.setblocking(False)
        results = await asyncio.gather(*[
            run_session(engine, i, n, codec, wav, rate, seconds, stages, baseline, sink, counter.address, mic)
            for i in range(n)])
        wall = time.monotonic() - w0
        process_cpu = time.process_time() - p0
        busy1 = machine_busy()
        received = counter.result()
    for r in results:
        stream = received["streams"].get(str(r["video_ssrc"]), {})
        frames, first, last = stream.get("frames", 0), stream.get("first_s"), stream.get("last_s")
        r["received"] = frames
        r["received_fps"] = (round((frames - 1) / (last - first), 2)
                             if frames > 1 and first is not None and last is not None and last > first else 0.0)
        r["received_max_gap_ms"] = stream.get("max_gap_ms")
    roles = python_threads()  # executor threads started during the trial
    frames = sum(r["encoded"] for r in results)
    split = _cpu_split(stages, before, roles, process_cpu, frames, wall)
    client_cpu = float(received.get("cpu_s", 0.0))
    split["client_cores"] = round(client_cpu / max(wall, 1e-9), 3)
    split["other_processes_cores"] = round(max(0.0, (busy1 - busy0) - process_cpu - client_cpu) / max(wall, 1e-9), 2)
    executor.shutdown(wait=True)
    return {"results": results, "cpu": split, "wall_s": round(wall, 2)}


def trial(engine: RealtimeEngine, codec: str, wav: np.ndarray, rate: int, n: int,
          baseline: bool = False, mic: list[tuple[bytes, int]] | None = None,
          event_loop: str = DEFAULT_LOOP) -> dict:
    """N sessions for the speech clip plus 0.6 s (as bench/sessions.py), judged per session, on the
    server's event loop (`event_loop`: its --event-loop)."""
    seconds = len(wav) / rate + 0.6
    load_before = os.getloadavg()[0]
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        out = runner.run(_trial_async(engine, codec, wav, rate, n, seconds, baseline, mic))
    worst: dict[str, Any] = {"missed_or_late": 0.0, "not_received": 0.0, "drop_rate": 0.0, "latency_p95_ms": 0.0}
    ok = True
    budget = float("inf")
    totals = {"ticks": 0, "encoded": 0, "late": 0, "missed": 0, "skipped": 0, "received": 0, "speech_frames": 0,
              "drops": 0}
    for r in out["results"]:
        m = r["metrics"]
        speech = m["frames_rendered"] + m["frames_dropped"]
        drops = m["frames_dropped"]
        p95 = m["latency_ms"]["p95"] or 0.0
        budget = min(budget, m["latency_budget_ms"])
        bad_ticks = (r["missed"] + r["late"]) / max(r["ticks"], 1)
        not_received = max(0, r["ticks"] - r["received"]) / max(r["ticks"], 1)  # whole frames at the client
        ok &= (bad_ticks <= MAX_MISSED and not_received <= MAX_MISSED and speech > 0
               and drops <= MAX_DROPPED * speech and p95 <= m["latency_budget_ms"] + 500.0 / m["fps"])
        worst["missed_or_late"] = max(worst["missed_or_late"], bad_ticks)
        worst["not_received"] = max(worst["not_received"], not_received)
        worst["drop_rate"] = max(worst["drop_rate"], drops / max(speech, 1))
        worst["latency_p95_ms"] = max(worst["latency_p95_ms"], p95)
        for key in ("ticks", "encoded", "late", "missed", "skipped", "received"):
            totals[key] += r[key]
        totals["speech_frames"] += speech
        totals["drops"] += drops
    worst = {k: round(v, 4 if k != "latency_p95_ms" else 1) for k, v in worst.items()}
    return {"sessions": n, "codec": codec, "baseline": baseline, "ok": bool(ok), **totals, "worst": worst,
            "latency_budget_ms": round(budget, 1),
            "encode_lateness_p95_ms": max(r["encode_lateness_p95_ms"] for r in out["results"]),
            "encode_lateness_max_ms": max(r["encode_lateness_max_ms"] for r in out["results"]),
            "received_fps_min": min(r["received_fps"] for r in out["results"]),
            "received_max_gap_ms": max(r["received_max_gap_ms"] or 0.0 for r in out["results"]),
            "cpu": out["cpu"], "wall_s": out["wall_s"],
            "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def sessions_with_encode(renderer: Any, avatar: Any, wav: np.ndarray, rate: int, max_n: int,
                         codec: str = "VP8", config: EngineConfig | None = None,
                         steps: tuple[int, ...] = STEPS, baseline: bool = False,
                         microphone: bool = False, event_loop: str = DEFAULT_LOOP) -> tuple[int, list[dict]]:
    """Largest N (of `steps`, up to `max_n`) whose trial passed before the first failure, and the trials.

    `renderer` and `avatar` are shared by every session, as in the server (one RealtimeEngine);
    `config` defaults to the server's for that renderer. `wav` (float32 mono at `rate`) is each
    session's speech; a trial lasts its length plus 0.6 s. `baseline` measures the server as it was
    before its encode path was tuned: bgr24 frames and aiortc's default encoder settings. `microphone`: the
    speech arrives as a browser's Opus packets decoded the server's way (`microphone_loop`), not as PCM.
    """
    mic = browser_opus(wav, rate) if microphone else None
    engine = RealtimeEngine(avatar, renderer, config or server_config(renderer))
    trials: list[dict] = []
    best = 0
    try:
        for n in [n for n in steps if n <= max_n]:
            res = trial(engine, codec, wav, rate, n, baseline, mic, event_loop)
            trials.append(res)
            log.info("%s x%d: %s", codec, n, _summary(res))
            if not res["ok"]:
                break
            best = n
    finally:
        engine.close()
    return best, trials


def _summary(res: dict) -> str:
    cpu = res["cpu"]
    return (f"ok={res['ok']} worst={res['worst']} late={res['late']} missed={res['missed']} "
            f"lateness p95 {res['encode_lateness_p95_ms']} ms; cores {cpu['cores_used']}, "
            f"others {cpu['other_processes_cores']}; "
            f"{cpu['total_ms_per_video_frame']} ms CPU/frame {cpu['summary_ms_per_video_frame']}; "
            f"load {res['loadavg_1min']}")


def label_of(codec: str, baseline: bool) -> str:
    return f"{codec} (baseline: bgr24 + aiortc encoders)" if baseline else codec

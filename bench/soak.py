"""Hours, hundreds of sessions: a real server under black-box aiortc clients, watched for drift and leaks.

    python bench/soak.py --minutes 30 --sessions 4      # soak: N sessions for M minutes
    python bench/soak.py --churn 200 --concurrency 10   # churn: 200 sessions, 10 at a time
    python bench/soak.py --isolation [--phase-s 40]     # a microphone session vs big uploads

The server runs as its own process (`python -m server`, the no-weights renderer, 127.0.0.1 only), so its
RSS, open fds and threads are read from /proc as an operator would see them, summed over its process tree
(the workers of `--workers auto` too); asyncio tasks and
event-loop lag come from its /metrics (`lipsync_asyncio_tasks`, `lipsync_event_loop_lag_seconds`). The
clients are aiortc peers in this process (loopback only, no STUN), half with a microphone track that
plays speech bursts between silences, half pushing speech files through POST /sessions/{id}/audio
(some interrupted mid-utterance with POST /sessions/{id}/interrupt). Per-session routes carry the
session's `session_token` when the server hands one out.

Soak: one warm-up cycle (every session opened, run 15 s, closed) sizes the lazily created pools, then
the baseline (fds, threads, tasks) is taken, N sessions run for M minutes, sampled every 10 s (RSS, fds,
threads, tasks, loop lag, per-session fps received by the client, engine latency, A/V offsets, load
average), then all are closed and the leftovers compared with the baseline. Windows are 5 minutes (per
minute for runs under 10 minutes):
- `min_fps_by_window`: the lowest, over sessions, of video frames the client received in the window /
  window length.
- `latency_p95_ms_by_window`: the highest, over sessions, of the engine's latency p95 read at the end of
  the window; the engine computes it over its last 4096 rendered frames (at 4 sessions talking about half
  the time that is ~5 minutes: the window itself; for 1-minute windows it lags). The exact per-window
  mean (from the histogram sums) is in `latency_mean_ms_by_window`.
- `rss_slope_mb_per_min`: least-squares slope of RSS against time after `--warmup-min` (2) minutes.
- `loop_lag_p99_ms`: p99 of the loop lag over the run, from the /metrics histogram's bucket counts
  (linear inside a bucket); `loop_lag_p99_ms_max_minute`: the worst per-minute p99 the server reported.
- `drops`: speech frames whose render missed its tick (engine), video ticks and 20 ms audio frames the
  sender skipped (`pacer_skipped`, `pacer_audio_skipped`), and frames missing at the client (gaps in
  the received pts); `drops_total` adds them up.
- `leaked`: fds, threads and tasks after every session closed (and 10 s to settle) minus the baseline.
- `server_cores`, `server_cpu_ms_per_video_frame`: CPU (user + system) of the server and its worker
  processes over the N sessions' run, per second and per video frame the clients received.

Churn: `--churn` sessions in rounds of `--concurrency`; in each round three clients run in a child process
that is SIGKILLed once their video flows (no goodbye at all), the others close politely (half DELETE
first, half just hang up). `reap_s` is from the kill to the server answering 404 for that session.
`rss_growth_after_20_mb` is RSS at the end minus RSS after the first 20 sessions.

Isolation: two push sessions are open; a fresh microphone session talks (speech with 0.3-0.8 s gaps) for
`--phase-s` seconds alone ("quiet"), then another fresh one talks while one push session uploads
`--long-upload-s` (300) seconds of audio and the other makes six concurrent 20 s uploads ("loaded").
A fresh session per phase makes each latency p95 that phase's own. `latency_p95_delta_ms` = loaded -
quiet; `mic_drops_under_load` adds the loaded mic session's engine drops, skipped video ticks and audio
frames, and missing frames.

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import aiortc.rtcrtpreceiver
import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

SELF = Path(__file__).resolve()
ROOT = SELF.parents[1]
sys.path.insert(0, str(ROOT))

from bench.client import PeerClient  # noqa: E402
from bench.common import make_speech, wav_bytes  # noqa: E402
from server.network.ice import use_host_addresses  # noqa: E402

log = logging.getLogger("soak")

RATE = 16000
VIDEO_PTS_PER_FRAME = 90000 // 25
TEXT = "The quick brown fox jumps over the lazy dog. How vexingly quick daft zebras jump."


# -- speech ----------------------------------------------------------------------------------------


def speech_16k() -> np.ndarray:
    wav, rate = make_speech(TEXT, 1)
    t_src = np.arange(len(wav)) / rate
    t_dst = np.arange(int(len(wav) * RATE / rate)) / RATE
    return np.interp(t_dst, t_src, wav).astype(np.float32)


def wav_of(samples: np.ndarray) -> bytes:
    return wav_bytes(np.clip(samples * 32767, -32768, 32767).astype(np.int16), RATE)


class BurstMicrophone(MediaStreamTrack):
    """A microphone: the speech clip, then `gap_s` (2-6 s) of silence, again and again, in real time."""

    kind = "audio"

    def __init__(self, speech: np.ndarray, seed: int, gap_s: tuple[float, float] = (2.0, 6.0)) -> None:
        super().__init__()
        self._speech = np.clip(speech * 32767, -32768, 32767).astype(np.int16)
        self._rng = random.Random(seed)
        self._gap = (int(gap_s[0] * RATE), int(gap_s[1] * RATE))
        self._n = RATE // 50
        self._pos = 0  # samples sent
        self._clip_pos = 0
        self._silence_left = self._rng.randint(0, 3 * RATE)
        self._start: float | None = None

    def _next_chunk(self) -> np.ndarray:
        if self._silence_left > 0:
            self._silence_left -= self._n
            return np.zeros(self._n, np.int16)
        chunk = self._speech[self._clip_pos:self._clip_pos + self._n]
        self._clip_pos += self._n
        if self._clip_pos >= len(self._speech):
            self._clip_pos = 0
            self._silence_left = self._rng.randint(*self._gap)
        return np.pad(chunk, (0, self._n - chunk.size))

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pos / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.AudioFrame.from_ndarray(self._next_chunk().reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pos
        frame.time_base = fractions.Fraction(1, RATE)
        self._pos += self._n
        return frame


class CountingVideoDecoder:
    """Client side: one tiny frame per received video frame, pts kept, pixels not decoded. The clients
    count frames and pts gaps only; decoding N 512 px VP8 streams would take the cores the server is
    being measured on (8 sessions: the client process starved itself to ~13 fps)."""

    def decode(self, encoded_frame) -> list[av.VideoFrame]:
        frame = av.VideoFrame(16, 16, "yuv420p")
        frame.pts = encoded_frame.timestamp
        frame.time_base = fractions.Fraction(1, 90000)
        return [frame]


def count_video_without_decoding() -> None:
    real_get_decoder = aiortc.rtcrtpreceiver.get_decoder

    def get_decoder(codec):
        return CountingVideoDecoder() if codec.mimeType.lower().startswith("video/") else real_get_decoder(codec)

    aiortc.rtcrtpreceiver.get_decoder = get_decoder


# -- the server process ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ProcSample:
    rss_mb: float
    fds: int
    threads: int


class ServerProcess:
    """`python -m server` on 127.0.0.1 with the flags this checkout has; read from /proc like an operator."""

    def __init__(self, max_sessions: int, log_path: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.operator_token = secrets.token_urlsafe(16)
        flags = server_flags()
        args = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--max-sessions", str(max_sessions), "--ice-host-addresses", "127.0.0.1",
                "--log-level", "warning"]
        if "--api-token" in flags:
            args.append(f"--api-token={self.operator_token}")   # "=": a token may start with "-"
        # Every client comes from 127.0.0.1, standing for many visitors: no per-address limits (0), so the
        # supervisor of --workers N places each offer on the freest worker as it does distinct visitors'
        # (with a limit set, one address's sessions all go to its home worker: server/access/visitor_homes.py).
        if "--max-sessions-per-ip" in flags:
            args += ["--max-sessions-per-ip", "0"]
        if "--max-offers-per-minute" in flags:
            args += ["--max-offers-per-minute", "0"]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(args + extra, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(ROOT))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.operator_token}"}

    async def wait_ready(self, http: aiohttp.ClientSession, limit_s: float = 120.0) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                async with http.get(self.url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        raise SystemExit(f"the server did not answer /healthz in {limit_s:g} s; see {self.log_path}")

    def tree(self) -> list[int]:
        """The server's pid and its children's (the workers of --workers N, multiprocessing's resource
        tracker): an operator's view of the server is the whole tree, so a leak in a worker counts."""
        children = [int(c) for t in Path(f"/proc/{self.pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
        return [self.pid, *children]

    def sample(self) -> ProcSample:
        """RSS, open fds and threads summed over the process tree (a worker that exits meanwhile is skipped)."""
        rss_kb = fds = threads = 0
        for pid in self.tree():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                pid_fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
            rss_kb += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            threads += int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            fds += pid_fds
        return ProcSample(rss_kb / 1024.0, fds, threads)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the server and its worker processes (--workers N) so far."""
        def of(pid: int) -> float:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # a worker that exited meanwhile
                return 0.0
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        return sum(of(pid) for pid in self.tree())

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_errors(self) -> int:
        text = self.log_path.read_text(errors="replace")
        return len(re.findall(r"\b(ERROR|Traceback)\b", text))


def server_flags() -> str:
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
    return out.stdout


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> {series name: [(labels, value)]}."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(4))))
    return out


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """The q-quantile of the observations between two reads of a cumulative histogram {le: count}."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            inside = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / inside if inside else 1.0)
        prev_bound, prev_count = bound, count
    return prev_bound


def buckets_of(metrics: dict, name: str) -> dict[float, float]:
    return {float(labels["le"]): value for labels, value in metrics.get(name + "_bucket", [])}


def gauge(metrics: dict, name: str) -> float | None:
    series = metrics.get(name)
    return series[0][1] if series else None


# -- clients ---------------------------------------------------------------------------------------


@dataclass
class ClientStats:
    video_frames: int = 0
    missing_frames: int = 0  # gaps in the received pts
    audio_frames: int = 0
    uploads: int = 0
    upload_errors: int = 0
    interrupts: int = 0
    last_pts: int | None = None


class SoakClient(PeerClient):
    """One peer (bench/client.py): receives the avatar; a microphone track or speech pushed over HTTP."""

    def __init__(self, url: str, http: aiohttp.ClientSession, microphone: bool, speech: np.ndarray,
                 seed: int, auto_push: bool = True, mic_gap_s: tuple[float, float] = (2.0, 6.0)) -> None:
        super().__init__(url, http)
        self.url = self.base_url
        self.microphone = microphone
        self.speech = speech
        self.rng = random.Random(seed)
        self.seed = seed
        self.auto_push = auto_push
        self.mic_gap_s = mic_gap_s
        self.stats = ClientStats()

    def headers(self) -> dict[str, str]:
        return self.auth

    async def connect(self, microphone: MediaStreamTrack | None = None, **kwargs: Any) -> dict[str, Any]:
        if microphone is None and self.microphone:
            microphone = BurstMicrophone(self.speech, self.seed, self.mic_gap_s)
        answer = await super().connect(microphone, **kwargs)
        if not self.microphone and self.auto_push:
            self.spawn(self._push_loop())
        return answer

    async def wait_for_video(self, frames: int, limit_s: float = 60.0) -> None:
        deadline = time.monotonic() + limit_s
        while self.stats.video_frames < frames:
            if time.monotonic() > deadline:
                raise RuntimeError(f"session {self.session_id}: {self.stats.video_frames} frames in {limit_s:g} s")
            await asyncio.sleep(0.1)

    def on_frame(self, kind: str, frame: Any, arrival: float) -> None:
        if kind == "video":
            s, pts = self.stats, frame.pts
            if pts is not None and s.last_pts is not None and pts > s.last_pts:
                s.missing_frames += max(0, round((pts - s.last_pts) / VIDEO_PTS_PER_FRAME) - 1)
            s.last_pts = pts
            s.video_frames += 1
        else:
            self.stats.audio_frames += 1

    async def _push_loop(self) -> None:
        """Speech uploads between silences; one in four interrupted mid-utterance."""
        body = wav_of(self.speech)
        speech_s = len(self.speech) / RATE
        while True:
            await asyncio.sleep(self.rng.uniform(2.0, 6.0))
            try:
                async with self.http.post(f"{self.url}/sessions/{self.session_id}/audio", data=body,
                                          headers={**self.headers(), "Content-Type": "audio/wav"}) as resp:
                    await resp.read()
                    self.stats.uploads += 1
                    self.stats.upload_errors += resp.status != 200
                if self.rng.random() < 0.25:
                    await asyncio.sleep(self.rng.uniform(0.5, speech_s * 0.8))
                    async with self.http.post(f"{self.url}/sessions/{self.session_id}/interrupt",
                                              headers=self.headers()) as resp:
                        await resp.read()
                        self.stats.interrupts += 1
                else:
                    await asyncio.sleep(speech_s)
            except aiohttp.ClientError:
                self.stats.upload_errors += 1

    async def upload(self, body: bytes) -> tuple[int, float]:
        """POST a WAV to the session; (status, seconds to answer)."""
        t0 = time.monotonic()
        async with self.http.post(f"{self.url}/sessions/{self.session_id}/audio", data=body,
                                  headers={**self.headers(), "Content-Type": "audio/wav"}) as resp:
            await resp.read()
            return resp.status, time.monotonic() - t0

    async def describe(self) -> dict | None:
        async with self.http.get(f"{self.url}/sessions/{self.session_id}", headers=self.headers()) as resp:
            return await resp.json() if resp.status == 200 else None

    async def close(self, delete: bool = False) -> None:
        await self.stop_tasks()
        if delete:
            async with self.http.delete(f"{self.url}/sessions/{self.session_id}",
                                        headers=self.headers()) as resp:
                await resp.read()
        await super().close()


# -- soak ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the soak started
    proc: ProcSample
    tasks: float | None
    loop_lag_p99_ms: float | None
    load: list[float]
    fps: list[float]            # per session, frames received by the client in the last interval
    latency_p95_ms: list[float]  # per session, engine p95 of its recent frames
    latency_sum_count: list[tuple[float, int]]
    av_offset_ms: list[float]
    pacer_av_offset_ms: list[float]


@dataclass
class SoakRun:
    server: ServerProcess
    http: aiohttp.ClientSession
    samples: list[Sample] = field(default_factory=list)

    async def metrics(self) -> dict:
        async with self.http.get(self.server.url + "/metrics", headers=self.server.headers()) as resp:
            return parse_metrics(await resp.text())


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages (the machine is shared: say how loaded it was)."""
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


async def open_clients(url: str, http: aiohttp.ClientSession, n: int, speech: np.ndarray,
                       seed: int) -> list[SoakClient]:
    clients = [SoakClient(url, http, microphone=i % 2 == 0, speech=speech, seed=seed + i) for i in range(n)]
    for client in clients:
        await client.connect()
    await asyncio.gather(*(c.wait_for_video(25) for c in clients))
    return clients


async def settle_baseline(run: SoakRun, seconds: float = 10.0) -> tuple[ProcSample, float]:
    await asyncio.sleep(seconds)
    m = await run.metrics()
    return run.server.sample(), gauge(m, "lipsync_asyncio_tasks") or 0.0


async def soak(args: argparse.Namespace) -> dict:
    speech = speech_16k()
    log_path = Path(tempfile.gettempdir()) / f"soak-server-{os.getpid()}.log"
    server = ServerProcess(max_sessions=args.sessions + 2, log_path=log_path, extra=args.server_arg)
    async with aiohttp.ClientSession() as http:
        run = SoakRun(server, http)
        try:
            await server.wait_ready(http)
            log.info("warm-up: %d sessions for 15 s", args.sessions)
            warm = await open_clients(server.url, http, args.sessions, speech, seed=1000)
            await asyncio.sleep(15)
            await asyncio.gather(*(c.close(delete=True) for c in warm))
            base_proc, base_tasks = await settle_baseline(run)
            log.info("baseline: %s, %g tasks", base_proc, base_tasks)
            clients = await open_clients(server.url, http, args.sessions, speech, seed=args.seed)
            m0 = await run.metrics()
            t0 = time.monotonic()
            last_frames = [c.stats.video_frames for c in clients]
            first_engine = [await c.describe() or {} for c in clients]
            duration = 60.0 * args.minutes
            cpu0, frames0 = server.cpu_s(), sum(c.stats.video_frames for c in clients)
            while (now := time.monotonic()) - t0 < duration:
                await asyncio.sleep(min(args.sample_s, max(0.0, t0 + duration - now)))
                run.samples.append(await take_sample(run, clients, t0, last_frames))
                last_frames = [c.stats.video_frames for c in clients]
                s = run.samples[-1]
                log.info("t=%4.0fs rss=%.1f MB fds=%d threads=%d tasks=%s lag_p99=%s fps=%s lat_p95=%s load=%s",
                         s.t, s.proc.rss_mb, s.proc.fds, s.proc.threads, s.tasks, s.loop_lag_p99_ms,
                         [round(f, 1) for f in s.fps], s.latency_p95_ms, s.load)
            cpu = {"server_cpu_s": server.cpu_s() - cpu0,
                   "video_frames_received": sum(c.stats.video_frames for c in clients) - frames0,
                   "seconds": time.monotonic() - t0}
            m1 = await run.metrics()
            last_engine = [await c.describe() or {} for c in clients]
            drops = {
                "engine_frames_dropped": sum(_engine(e).get("frames_dropped", 0) - _engine(f).get("frames_dropped", 0)
                                             for f, e in zip(first_engine, last_engine, strict=True)),
                "pacer_skipped": sum(e.get("video_skipped", 0) - f.get("video_skipped", 0)
                                     for f, e in zip(first_engine, last_engine, strict=True)),
                "pacer_audio_skipped": sum(e.get("audio_skipped", 0) - f.get("audio_skipped", 0)
                                           for f, e in zip(first_engine, last_engine, strict=True)),
                "client_missing_frames": sum(c.stats.missing_frames for c in clients),
            }
            uploads = {"uploads": sum(c.stats.uploads for c in clients),
                       "upload_errors": sum(c.stats.upload_errors for c in clients),
                       "interrupts": sum(c.stats.interrupts for c in clients)}
            await asyncio.gather(*(c.close(delete=i % 2 == 0) for i, c in enumerate(clients)))
            end_proc, end_tasks = await settle_baseline(run)
            return {**summarize(args, run, drops, uploads, base_proc, base_tasks, end_proc, end_tasks, m0, m1),
                    "server_cores": round(cpu["server_cpu_s"] / max(cpu["seconds"], 1e-9), 3),
                    "server_cpu_ms_per_video_frame": round(1000.0 * cpu["server_cpu_s"]
                                                           / max(cpu["video_frames_received"], 1), 3)}
        finally:
            code = server.stop()
            log.info("server exit code %s, log %s (%d ERROR/Traceback lines)", code, log_path,
                     server.log_errors())


def _engine(describe: dict) -> dict:
    return describe.get("engine") or {}


async def take_sample(run: SoakRun, clients: list[SoakClient], t0: float, last_frames: list[int]) -> Sample:
    now = time.monotonic()
    interval = now - (run.samples[-1].t + t0 if run.samples else t0)
    m = await run.metrics()
    lag = gauge(m, "lipsync_event_loop_lag_p99_seconds")
    described = [await c.describe() or {} for c in clients]
    engines = [_engine(d) for d in described]
    return Sample(
        t=now - t0, proc=run.server.sample(), tasks=gauge(m, "lipsync_asyncio_tasks"),
        loop_lag_p99_ms=None if lag is None else round(1000 * lag, 2), load=loadavg(),
        fps=[(c.stats.video_frames - n) / interval for c, n in zip(clients, last_frames, strict=True)],
        latency_p95_ms=[round((e.get("latency_ms") or {}).get("p95") or 0.0, 1) for e in engines],
        latency_sum_count=[((e.get("latency_ms") or {}).get("sum", 0.0), (e.get("latency_ms") or {}).get("count", 0))
                           for e in engines],
        av_offset_ms=[float(e.get("av_offset_ms") or 0.0) for e in engines],
        pacer_av_offset_ms=[float(d.get("pacer_av_offset_ms") or 0.0) for d in described],
    )


def rss_slope(samples: list[Sample], after_s: float) -> float | None:
    points = [(s.t / 60.0, s.proc.rss_mb) for s in samples if s.t >= after_s]
    if len(points) < 3:
        return None
    t, rss = np.array(points).T
    return float(np.polyfit(t, rss, 1)[0])


def summarize(args, run: SoakRun, drops: dict, uploads: dict, base_proc: ProcSample, base_tasks: float,
              end_proc: ProcSample, end_tasks: float, m0: dict, m1: dict) -> dict:
    window_s = 300.0 if args.minutes >= 10 else 60.0
    samples = run.samples
    # A sample a fraction of a period after a window's end still belongs to it (no one-sample windows).
    n_windows = max(1, int(np.ceil((samples[-1].t - args.sample_s / 2) / window_s))) if samples else 0
    fps_w, p95_w, mean_w, av_w = [], [], [], []
    prev_sum_count = None
    for w in range(n_windows):
        lo, hi = w * window_s + args.sample_s / 2, (w + 1) * window_s + args.sample_s / 2
        inside = [s for s in samples if lo < s.t <= hi or (w == n_windows - 1 and s.t > hi)]
        if not inside:
            continue
        span = inside[-1].t - (inside[0].t - args.sample_s)
        per_session = np.sum([np.array(s.fps) * args.sample_s for s in inside], axis=0) / max(span, 1e-6)
        fps_w.append(round(float(per_session.min()), 2))
        p95_w.append(round(max(inside[-1].latency_p95_ms), 1))
        sc = inside[-1].latency_sum_count
        if prev_sum_count is not None:
            deltas = [(s1 - s0, c1 - c0) for (s1, c1), (s0, c0) in zip(sc, prev_sum_count, strict=True)]
        else:
            deltas = list(sc)
        total, count = sum(d[0] for d in deltas), sum(d[1] for d in deltas)
        mean_w.append(round(total / count, 1) if count else None)
        prev_sum_count = sc
        av_w.append(round(max(abs(v) for s in inside for v in s.av_offset_ms + s.pacer_av_offset_ms), 1))
    lag = histogram_quantile(0.99, buckets_of(m0, "lipsync_event_loop_lag_seconds"),
                             buckets_of(m1, "lipsync_event_loop_lag_seconds"))
    return {
        "bench": "soak",
        "minutes": args.minutes,
        "sessions": args.sessions,
        "rss_slope_mb_per_min": _round(rss_slope(samples, 60.0 * args.warmup_min), 3),
        "latency_p95_ms_by_window": p95_w,
        "latency_mean_ms_by_window": mean_w,
        "min_fps_by_window": fps_w,
        "av_offset_max_abs_ms_by_window": av_w,
        "loop_lag_p99_ms": _round(None if lag is None else 1000 * lag, 2),
        "loop_lag_p99_ms_max_minute": max((s.loop_lag_p99_ms or 0.0 for s in samples), default=None),
        "drops": drops,
        "drops_total": sum(drops.values()),
        "leaked": {"fds": end_proc.fds - base_proc.fds, "threads": end_proc.threads - base_proc.threads,
                   "tasks": int(end_tasks - base_tasks)},
        "rss_mb": {"baseline": round(base_proc.rss_mb, 1), "first": round(samples[0].proc.rss_mb, 1),
                   "last": round(samples[-1].proc.rss_mb, 1), "after_close": round(end_proc.rss_mb, 1)},
        "push": uploads,
        "load_avg": [samples[0].load, samples[len(samples) // 2].load, samples[-1].load] if samples else [],
        "server_log_errors": run.server.log_errors(),
        "samples": len(samples),
        "window_s": window_s,
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# -- churn -----------------------------------------------------------------------------------------


CHILD_KILLED = 3  # clients per round that are SIGKILLed with their process


async def child_clients(url: str, n: int) -> None:
    """`--child`: n push clients that print `session_id token` once video flows, then wait to be killed."""
    speech = np.zeros(RATE, np.float32)
    async with aiohttp.ClientSession() as http:
        clients = [SoakClient(url, http, microphone=False, speech=speech, seed=i) for i in range(n)]
        for c in clients:
            await c.connect()
        await asyncio.gather(*(c.wait_for_video(10) for c in clients))
        for c in clients:
            print(c.session_id, c.token or "", flush=True)
        await asyncio.sleep(3600)


async def spawn_killable(url: str, n: int) -> tuple[asyncio.subprocess.Process, list[tuple[str, str]]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SELF), "--child", url, "--clients", str(n),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ids = []
    for _ in range(n):
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=120)  # type: ignore[union-attr]
        sid, _, token = line.decode().strip().partition(" ")
        ids.append((sid, token))
    return proc, ids


async def wait_reaped(http: aiohttp.ClientSession, server: ServerProcess, sid: str, token: str,
                      since: float, limit_s: float = 60.0) -> float | None:
    headers = {"Authorization": f"Bearer {token}"} if token else server.headers()
    while time.monotonic() - since < limit_s:
        async with http.get(f"{server.url}/sessions/{sid}", headers=headers) as resp:
            await resp.read()
            if resp.status == 404:
                return time.monotonic() - since
        await asyncio.sleep(0.1)
    return None


async def churn_round(server: ServerProcess, http: aiohttp.ClientSession, speech: np.ndarray, size: int,
                      seed: int) -> list[float | None]:
    killed_n = min(CHILD_KILLED, size)
    child = asyncio.ensure_future(spawn_killable(server.url, killed_n))
    polite = [SoakClient(server.url, http, microphone=i % 2 == 0, speech=speech, seed=seed + i)
              for i in range(size - killed_n)]
    for c in polite:
        await c.connect()
    await asyncio.gather(*(c.wait_for_video(25) for c in polite))
    proc, ids = await child
    proc.kill()
    killed_at = time.monotonic()
    await proc.wait()
    await asyncio.gather(*(c.close(delete=i % 2 == 0) for i, c in enumerate(polite)))
    return list(await asyncio.gather(*(wait_reaped(http, server, sid, tok, killed_at) for sid, tok in ids)))


async def churn(args: argparse.Namespace) -> dict:
    speech = speech_16k()
    log_path = Path(tempfile.gettempdir()) / f"churn-server-{os.getpid()}.log"
    server = ServerProcess(max_sessions=args.concurrency + 2, log_path=log_path, extra=args.server_arg)
    async with aiohttp.ClientSession() as http:
        run = SoakRun(server, http)
        try:
            await server.wait_ready(http)
            await churn_round(server, http, speech, args.concurrency, seed=10_000)  # warm-up, not counted
            base_proc, base_tasks = await settle_baseline(run, 5.0)
            reaps: list[float | None] = []
            rss_after_20: float | None = None
            opened = 0
            rounds = 0
            while opened < args.churn:
                size = min(args.concurrency, args.churn - opened)
                reaps += await churn_round(server, http, speech, size, seed=rounds * 100)
                opened += size
                rounds += 1
                p = server.sample()
                if rss_after_20 is None and opened >= 20:
                    await asyncio.sleep(5.0)
                    rss_after_20 = server.sample().rss_mb
                log.info("churn: %d sessions, rss=%.1f MB fds=%d threads=%d load=%s reap=%s", opened,
                         p.rss_mb, p.fds, p.threads, loadavg(), [None if r is None else round(r, 2)
                                                                for r in reaps[-CHILD_KILLED:]])
            end_proc, end_tasks = await settle_baseline(run)
            m = await run.metrics()
            known = [r for r in reaps if r is not None]
            return {
                "bench": "churn",
                "sessions": opened,
                "concurrency": args.concurrency,
                "killed": len(reaps),
                "reap_s": {"max": _round(max(known, default=None), 2),
                           "p50": _round(float(np.median(known)) if known else None, 2),
                           "not_reaped_in_60s": sum(r is None for r in reaps)},
                "leaked": {"fds": end_proc.fds - base_proc.fds, "threads": end_proc.threads - base_proc.threads,
                           "tasks": int(end_tasks - base_tasks)},
                "rss_mb": {"baseline": round(base_proc.rss_mb, 1), "after_20": _round(rss_after_20, 1),
                           "end": round(end_proc.rss_mb, 1)},
                "rss_growth_after_20_mb": _round(None if rss_after_20 is None else end_proc.rss_mb - rss_after_20, 1),
                "closed_by_reason": {labels.get("reason", ""): v for labels, v in
                                     m.get("lipsync_sessions_closed_total", [])},
                "loop_lag_p99_ms_max_minute": _round(1000 * (gauge(m, "lipsync_event_loop_lag_p99_seconds") or 0), 2),
                "load_avg_end": loadavg(),
                "server_log_errors": server.log_errors(),
            }
        finally:
            code = server.stop()
            log.info("server exit code %s, log %s", code, log_path)


# -- isolation -------------------------------------------------------------------------------------


async def mic_phase(run: SoakRun, speech: np.ndarray, seconds: float, seed: int,
                    load: Callable[[], Awaitable[list[tuple[int, float]]]] | None) -> dict:
    """A fresh microphone session talking (short gaps) for `seconds`, with `load` started as it begins.
    Its latency p95 is the engine's over this session's frames only (a fresh histogram per phase)."""
    mic = SoakClient(run.server.url, run.http, microphone=True, speech=speech, seed=seed, mic_gap_s=(0.3, 0.8))
    await mic.connect()
    await mic.wait_for_video(25)
    await asyncio.sleep(3.0)
    d0, m0, missing0 = await mic.describe() or {}, await run.metrics(), mic.stats.missing_frames
    frames0 = mic.stats.video_frames
    t0 = time.monotonic()
    load_task = asyncio.ensure_future(load()) if load is not None else None
    await asyncio.sleep(seconds)
    d1, m1 = await mic.describe() or {}, await run.metrics()
    elapsed = time.monotonic() - t0
    uploads = await load_task if load_task is not None else []
    await mic.close(delete=True)
    latency = _engine(d1).get("latency_ms") or {}
    lag = histogram_quantile(0.99, buckets_of(m0, "lipsync_event_loop_lag_seconds"),
                             buckets_of(m1, "lipsync_event_loop_lag_seconds"))
    return {
        "latency_p95_ms": _round(latency.get("p95"), 1),
        "latency_p50_ms": _round(latency.get("p50"), 1),
        "latency_budget_ms": _round(_engine(d1).get("latency_budget_ms"), 1),   # the session's fixed L
        "rendered_frames": _engine(d1).get("frames_rendered", 0),
        "frames_dropped": _engine(d1).get("frames_dropped", 0) - _engine(d0).get("frames_dropped", 0),
        "pacer_skipped": d1.get("video_skipped", 0) - d0.get("video_skipped", 0),
        "pacer_audio_skipped": d1.get("audio_skipped", 0) - d0.get("audio_skipped", 0),
        "client_missing_frames": mic.stats.missing_frames - missing0,
        "client_fps": round((mic.stats.video_frames - frames0) / elapsed, 2),
        "loop_lag_p99_ms": _round(None if lag is None else 1000 * lag, 2),
        "uploads": [{"status": status, "seconds": round(took, 2)} for status, took in uploads],
        "load_avg": loadavg(),
    }


async def isolation(args: argparse.Namespace) -> dict:
    """A microphone session alone, then another one while one session uploads `--long-upload-s` (300 s)
    of audio and another makes six concurrent uploads (20 s each)."""
    speech = speech_16k()
    log_path = Path(tempfile.gettempdir()) / f"isolation-server-{os.getpid()}.log"
    server = ServerProcess(max_sessions=5, log_path=log_path, extra=args.server_arg)
    long_body = wav_of(np.resize(speech, int(args.long_upload_s * RATE)))
    short_body = wav_of(np.resize(speech, 20 * RATE))
    async with aiohttp.ClientSession() as http:
        run = SoakRun(server, http)
        try:
            await server.wait_ready(http)
            pushers = [SoakClient(server.url, http, microphone=False, speech=speech, seed=500 + i, auto_push=False)
                       for i in range(2)]
            for c in pushers:
                await c.connect()
            await asyncio.gather(*(c.wait_for_video(25) for c in pushers))

            async def uploads() -> list[tuple[int, float]]:
                return list(await asyncio.gather(pushers[0].upload(long_body),
                                                 *(pushers[1].upload(short_body) for _ in range(6))))

            quiet = await mic_phase(run, speech, args.phase_s, seed=1, load=None)
            loaded = await mic_phase(run, speech, args.phase_s, seed=2, load=uploads)
            await asyncio.gather(*(c.close(delete=True) for c in pushers))
            q, loaded_p95 = quiet["latency_p95_ms"], loaded["latency_p95_ms"]
            return {
                "bench": "isolation",
                "phase_s": args.phase_s,
                "long_upload_s": args.long_upload_s,
                "latency_p95_delta_ms": None if q is None or loaded_p95 is None else round(loaded_p95 - q, 1),
                "mic_drops_under_load": loaded["frames_dropped"] + loaded["pacer_skipped"]
                + loaded["pacer_audio_skipped"] + loaded["client_missing_frames"],
                "quiet": quiet,
                "loaded": loaded,
                "server_log_errors": server.log_errors(),
            }
        finally:
            code = server.stop()
            log.info("server exit code %s, log %s", code, log_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-min", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--churn", type=int, default=0, help="churn mode: this many sessions in all")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--isolation", action="store_true", help="isolation mode: a mic session vs uploads")
    parser.add_argument("--phase-s", type=float, default=40.0, help="isolation: seconds per phase")
    parser.add_argument("--long-upload-s", type=float, default=300.0, help="isolation: the long upload")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for the server")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=CHILD_KILLED, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("aioice").setLevel(logging.WARNING)
    use_host_addresses(["127.0.0.1"])  # loopback only, for the clients
    count_video_without_decoding()
    if args.child:
        asyncio.run(child_clients(args.child, args.clients))
        return 0
    mode = churn if args.churn else isolation if args.isolation else soak
    result = asyncio.run(mode(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

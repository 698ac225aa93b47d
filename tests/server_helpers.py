"""Shared pieces of the server tests: a stand-in engine, a server on 127.0.0.1, an aiortc client.

The engine is the real one (realtime.timeline.session.LipSyncSession on a shared render worker) with a tiny flat
avatar and a renderer whose 'mouth' brightness follows the loudness of each frame's mel window, so the
tests check audio round trips and mouth movement fast and without a model.
"""
from __future__ import annotations

import asyncio
import fractions
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from bench.client import OfferRefused, PeerClient
from realtime.avatars.avatar import loop_index
from realtime.renderers.base import MouthPatch, MouthRenderer
from server.access.auth import RedactingAccessLogger
from server.app import create_app
from server.config import ServerConfig
from server.realtime_engine import RealtimeEngine

RATE = 16000


# -- a tiny avatar and a cheap renderer for the real engine -----------------------------------------


class TinyAvatar:
    """10 flat grey 64x64 frames with a fixed face box: what LipSyncSession needs of an Avatar."""

    loop = "pingpong"
    source = "tiny"

    def __init__(self, n: int = 10, size: int = 64, fps: float = 25.0) -> None:
        self.frames = np.full((n, size, size, 3), 90, dtype=np.uint8)
        self.boxes = np.array([[16, 60, 12, 52]] * n)
        self.mouth = None
        self.fps = fps

    def __len__(self) -> int:
        return len(self.frames)

    def frame_index(self, tick: int) -> int:
        return loop_index(tick, len(self.frames))


class LoudnessRenderer(MouthRenderer):
    """A 'mouth' whose brightness follows the loudness of the frame's mel window (no model)."""

    name = "loudness"

    def prepare(self, avatar) -> None:
        pass

    def render(self, avatar, frame_indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
        patches = []
        for i, mel in zip(frame_indices, mels, strict=True):
            y1, y2, x1, x2 = (int(v) for v in avatar.boxes[int(i)])
            level = int(np.clip(90 + (float(mel.mean()) + 4.0) * 50.0, 0, 255))
            image = np.full((y2 - y1, x2 - x1, 3), level, dtype=np.uint8)
            patches.append(MouthPatch(image=image, box=(y1, y2, x1, x2),
                                      alpha=np.ones((y2 - y1, x2 - x1), np.float32)))
        return patches


def tiny_engine(**kwargs) -> RealtimeEngine:
    return RealtimeEngine(TinyAvatar(), LoudnessRenderer(), info={"avatar": "tiny", "device": "cpu"}, **kwargs)


def mouth_level(image: np.ndarray) -> float:
    """Mean brightness inside TinyAvatar's face box (90 at rest)."""
    return float(image[20:56, 16:48].mean())


# -- the server ------------------------------------------------------------------------------------


@dataclass
class RunningServer:
    url: str
    app: web.Application
    runner: web.AppRunner
    engine: object

    def endpoint(self, path: str) -> str:
        return self.url.rstrip("/") + path

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_server(engine, capacity=None, **overrides) -> RunningServer:
    """`capacity`: a server.access.capacity.CapacityModel (injected session costs); None: --max-sessions as given."""
    config = ServerConfig(host="127.0.0.1", port=0, **overrides)
    app = create_app(config, engine, capacity)
    # The production runner's access log class: ?token= values never reach the log.
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0,
                           access_log_class=RedactingAccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return RunningServer(f"http://127.0.0.1:{port}/", app, runner, engine)


# -- the aiortc client -----------------------------------------------------------------------------


class PcmTrack(MediaStreamTrack):
    """A microphone stand-in: plays `samples` (16 kHz float32) in 20 ms frames in real time, then silence."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, rate: int = RATE) -> None:
        super().__init__()
        self._pcm = np.clip(samples * 32767, -32768, 32767).astype(np.int16)
        self._rate = rate
        self._n = rate // 50
        self._pos = 0
        self._start: float | None = None
        self.started_at: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = self.started_at = time.monotonic()
        wait = self._start + self._pos / self._rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = self._pcm[self._pos:self._pos + self._n]
        chunk = np.pad(chunk, (0, self._n - chunk.size))
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._pos
        frame.time_base = fractions.Fraction(1, self._rate)
        self._pos += self._n
        return frame


@dataclass
class Received:
    video: list[tuple[float, int, np.ndarray]] = field(default_factory=list)  # (arrival, pts, bgr)
    audio: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (arrival, mono float32 48k?)
    audio_rate: int = 0


class Client(PeerClient):
    """The bench harness's aiortc peer (bench/client.py) as the tests use it: offers (optionally) a
    microphone, keeps the received avatar video (BGR) and audio, asserts the offer's status."""

    def __init__(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        super().__init__(server.endpoint("/"), http)
        self.server = server
        self.received = Received()
        self.session_id: str | None = None  # None until an offer is answered
        self.answer: dict = {}

    def endpoint(self, path: str) -> str:
        return self.server.endpoint(path)

    def on_frame(self, kind: str, frame: Any, arrival: float) -> None:
        if kind == "video":
            self.received.video.append((arrival, frame.pts, frame.to_ndarray(format="bgr24")))
        else:
            data = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).astype(np.float32)
            self.received.audio_rate = frame.sample_rate
            self.received.audio.append((arrival, data.mean(axis=1) / 32768.0))

    async def connect(self, microphone: MediaStreamTrack | None = None, audio: bool = True,
                      options: dict | None = None, expect_status: int = 200) -> dict:
        try:
            self.answer = await super().connect(microphone, audio=audio, options=options or None)
        except OfferRefused as refused:
            self.answer = refused.body
            assert refused.status == expect_status, self.answer
            return self.answer
        assert expect_status == 200, self.answer
        self.token = self.answer["session_token"]
        return self.answer

    @property
    def auth(self) -> dict[str, str]:
        """Headers that authorise this client on its session's routes."""
        return {"Authorization": f"Bearer {self.token}"}

    def url(self, path: str = "", token: bool = False, **query: str) -> str:
        """The session's route `/sessions/{id}{path}`; `token=True` adds ?token= (WebSocket)."""
        url = self.server.endpoint(f"/sessions/{self.session_id}{path}")
        if token:
            query["token"] = self.token or ""
        if query:
            url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return url

    async def wait_for_video(self, frames: int, within_s: float = 15.0) -> None:
        deadline = time.monotonic() + within_s
        while len(self.received.video) < frames:
            assert time.monotonic() < deadline, f"got {len(self.received.video)} of {frames} frames"
            await asyncio.sleep(0.05)

    def audio_signal(self) -> np.ndarray:
        if not self.received.audio:
            return np.zeros(0, np.float32)
        return np.concatenate([a for _, a in self.received.audio])



def best_lag(reference: np.ndarray, signal: np.ndarray, max_lag: int) -> tuple[int, float]:
    """The lag (samples) at which `signal` best matches `reference`, and the normalised correlation."""
    ref = reference - reference.mean()
    n = ref.size
    lags = np.arange(max(0, min(max_lag, signal.size - n + 1)))
    if lags.size == 0:
        return 0, 0.0
    size = 1 << int(np.ceil(np.log2(signal.size + n)))
    corr = np.fft.irfft(np.fft.rfft(signal, size) * np.conj(np.fft.rfft(ref, size)), size)[lags]
    energy = np.concatenate([[0.0], np.cumsum(signal.astype(np.float64) ** 2)])
    ref_energy = float(np.dot(ref, ref))
    # The floor keeps silent stretches (where the cumulative sums cancel to noise) from scoring.
    window = np.sqrt(np.maximum(energy[lags + n] - energy[lags], 1e-3 * ref_energy))
    score = corr / (np.sqrt(ref_energy) * window + 1e-12)
    k = int(np.argmax(score))
    return int(lags[k]), float(score[k])


def echo_delays(sent: np.ndarray, received: np.ndarray, offset_s: float,
                piece_s: float = 0.5) -> list[tuple[float, float]]:
    """(correlation, delay in s) of each voiced piece of `sent` (16 kHz) found in `received` (16 kHz).

    Pieces, not the whole: when the input stalls on a loaded machine the engine re-anchors the rest of
    the utterance a frame later, so the echo is the speech with small gaps, not one shifted copy.
    `offset_s` is how much later `sent` started than `received` on the same clock."""
    n = int(piece_s * 16000)
    out = []
    for start in range(0, sent.size - n, n):
        piece = sent[start:start + n]
        if np.sqrt(np.mean(piece ** 2)) < 0.02:
            continue
        lag, corr = best_lag(piece, received, max_lag=received.size - piece.size)
        out.append((corr, lag / 16000 - offset_s - start / 16000))
    return out

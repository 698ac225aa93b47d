"""Playback events vs the audio a WebRTC client hears: event `t` against audio arrival, `position_s`
against the audio actually received.

    python bench/playback_events.py [--runs 3]

A chatbot-style scenario on loopback (127.0.0.1 only), the server in-process with the embedded default
avatar and the no-weights renderer: an aiortc client receives the avatar (audio + video); over the
/sessions/{id}/stream WebSocket the bot names and pushes two utterances faster than real time (a
400 Hz tone of 1.0 s, then a 600 Hz tone of 3.0 s: tones make the received audio's edges exact to a
few ms through Opus) and interrupts the second halfway. Per run:
  - `started_lag_ms` / `ended_lag_ms`: arrival of the first / last sample of each utterance at the client
    minus the event's `t` (both on this machine's clock): how far ahead of the audio the event's time is
    (the sender's packetisation, the network and aiortc's receive path);
  - `event_lead_ms`: client audio arrival minus when the client received the event message;
  - `position_error_ms`: `position_s` minus the duration of the utterance's tone in the received audio.
The machine may be shared: numbers are noisy. Last line: one JSON object.

`run_scenario` is also what tests/test_chatbot_events.py asserts on (with its tiny test engine).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import aiohttp
import av
import numpy as np

from bench.client import PeerClient

RATE = 16000
TONES = {"one": (400.0, 1.0), "two": (600.0, 3.0)}   # utterance -> (Hz, seconds)
AMPLITUDE = 0.3
ENVELOPE_S = 0.010   # a whole number of periods of every mixing product of 400 / 600 Hz


def tone(hz: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (AMPLITUDE * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@dataclass
class Heard:
    """Received audio: mono float samples at `rate` and the arrival time of each 20 ms frame."""
    rate: int = 0
    chunks: list[np.ndarray] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)

    def signal(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)

    def arrival_of(self, index: int) -> float:
        """When sample `index` of signal() arrived (its frame's arrival plus its offset in the frame)."""
        sizes = np.cumsum([len(c) for c in self.chunks])
        k = int(np.searchsorted(sizes, index, side="right"))
        start = int(sizes[k - 1]) if k else 0
        return self.arrivals[k] + (index - start) / self.rate


def tone_span(signal: np.ndarray, rate: int, hz: float) -> tuple[int, int] | None:
    """[first, last) sample where the `hz` tone is present (envelope above half its plateau)."""
    t = np.arange(signal.size) / rate
    mixed = signal * np.exp(-2j * np.pi * hz * t)
    n = round(ENVELOPE_S * rate)
    envelope = np.abs(np.convolve(mixed, np.ones(n) / n, mode="same"))
    loud = envelope > 0.25 * AMPLITUDE   # the plateau is AMPLITUDE / 2
    where = np.flatnonzero(loud)
    if where.size == 0:
        return None
    return int(where[0]), int(where[-1]) + 1


@dataclass
class ScenarioResult:
    events: list[dict]                 # as received over the WebSocket, with "received_at" (monotonic)
    heard: Heard
    spans: dict[str, tuple[int, int] | None]
    to_monotonic: float                # add to an event's Unix `t` to get this process's monotonic time

    def event(self, kind: str, utterance: str) -> dict:
        return next(e for e in self.events if e["type"] == kind and e.get("utterance") == utterance)

    def heard_s(self, utterance: str) -> float:
        span = self.spans[utterance]
        return 0.0 if span is None else (span[1] - span[0]) / self.heard.rate

    def lags_ms(self) -> dict[str, float]:
        """Client arrival of each utterance's first / last sample minus the event's t."""
        out: dict[str, float] = {}
        for name, span in self.spans.items():
            if span is None:
                continue
            for kind, index in (("speech_started", span[0]), ("speech_ended", span[1])):
                event = self.event(kind, name)
                t = event["t"] + self.to_monotonic
                out[f"{kind}.{name}.lag_ms"] = 1000 * (self.heard.arrival_of(index) - t)
                out[f"{kind}.{name}.lead_ms"] = 1000 * (self.heard.arrival_of(index) - event["received_at"])
        return out


class _Receiver(PeerClient):
    """The peer (bench/client.py) that hears the avatar: keeps the received audio, counts video frames."""

    def __init__(self, base: str, http: aiohttp.ClientSession) -> None:
        super().__init__(base, http)
        self.heard = Heard()
        self.video_frames = 0
        self.video_started = asyncio.Event()   # set after a few frames: the peer connection is up

    def on_frame(self, kind: str, frame: av.AudioFrame | av.VideoFrame, arrival: float) -> None:
        if kind == "video":
            self.video_frames += 1
            if self.video_frames >= 5:
                self.video_started.set()
            return
        if not isinstance(frame, av.AudioFrame):
            return
        data = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).astype(np.float32)
        self.heard.rate = frame.sample_rate
        self.heard.chunks.append(data.mean(axis=1) / 32768.0)
        self.heard.arrivals.append(arrival)


async def _wait_for(events: list[dict], kind: str, utterance: str, within_s: float) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        for e in events:
            if e["type"] == kind and e.get("utterance") == utterance:
                return e
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {kind} for {utterance!r} in {within_s} s; got {events}")
        await asyncio.sleep(0.01)


async def run_scenario(base: str, http: aiohttp.ClientSession, headers: dict | None = None,
                       interrupt_after_s: float = 1.5) -> ScenarioResult:
    """Two utterances over the WebSocket, the second interrupted `interrupt_after_s` after it started."""
    headers = headers or {}
    to_monotonic = time.monotonic() - time.time()
    receiver = _Receiver(base, http)
    try:
        await receiver.connect(headers=headers)   # the session's token, where the server has auth: .token
        session_id = receiver.session_id
        await asyncio.wait_for(receiver.video_started.wait(), 15)
        events: list[dict] = []
        url = base.rstrip("/") + f"/sessions/{session_id}/stream?rate={RATE}"
        if receiver.token:
            url += f"&token={receiver.token}"   # as a browser would: no headers on a WebSocket
        async with http.ws_connect(url, headers=headers) as ws:
            async def read() -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        events.append({**json.loads(msg.data), "received_at": time.monotonic()})

            reader = asyncio.ensure_future(read())
            for name, (hz, seconds) in TONES.items():
                await ws.send_str(json.dumps({"type": "start", "utterance": name}))
                pcm = (tone(hz, seconds) * 32767).astype(np.int16)
                for chunk in np.array_split(pcm, max(1, int(seconds * 10))):   # 100 ms chunks, at once
                    await ws.send_bytes(chunk.tobytes())
                await ws.send_str(json.dumps({"type": "end"}))
            await _wait_for(events, "speech_started", "two", within_s=10)
            await asyncio.sleep(interrupt_after_s)
            await ws.send_str(json.dumps({"type": "interrupt"}))
            await _wait_for(events, "speech_ended", "two", within_s=5)
            await asyncio.sleep(0.8)   # the last audio reaches the client
            reader.cancel()
        heard = receiver.heard
        signal = heard.signal()
        spans = {name: tone_span(signal, heard.rate, hz) for name, (hz, _) in TONES.items()}
        return ScenarioResult(events, heard, spans, to_monotonic)
    finally:
        await receiver.close()


async def _bench(runs: int) -> dict:
    from aiohttp import web

    from realtime.avatars.default_avatar import load_default_avatar
    from realtime.renderers.default import DefaultRenderer
    from server.app import create_app
    from server.config import ServerConfig
    from server.network.ice import use_host_addresses
    from server.realtime_engine import RealtimeEngine

    restore = use_host_addresses(["127.0.0.1"])
    engine = RealtimeEngine(load_default_avatar(), DefaultRenderer())
    runner = web.AppRunner(create_app(ServerConfig(host="127.0.0.1", port=0), engine), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    per_run = []
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(runs):
                result = await run_scenario(base, http)
                lags = result.lags_ms()
                two = result.event("speech_ended", "two")
                one = result.event("speech_ended", "one")
                per_run.append({
                    **{k: round(v, 1) for k, v in lags.items()},
                    "position_error_ms.one": round(1000 * (one["position_s"] - result.heard_s("one")), 1),
                    "position_error_ms.two": round(1000 * (two["position_s"] - result.heard_s("two")), 1),
                })
    finally:
        await runner.cleanup()
        engine.close()
        restore()
    keys = per_run[0].keys()
    return {"runs": runs, "median": {k: statistics.median(r[k] for r in per_run) for k in keys},
            "max_abs": {k: max(abs(r[k]) for r in per_run) for k in keys}, "per_run": per_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_bench(args.runs))))


if __name__ == "__main__":
    main()

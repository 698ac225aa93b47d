"""How soon the avatar talks: a real server (`run_server.py`, a subprocess) driven over WebRTC by an aiortc
client on loopback, per renderer, in one run.

    python bench/latency.py [--renderers default,wav2lip:training,wav2lip:official] [--trials 10]

Measured at the client (time.monotonic of the bench process; received media is timed when aiortc hands
the decoded frame over, i.e. after its jitter buffer, plus the onset's offset inside its 20 ms frame). The
client's receive buffers behave like a browser's on a clean loopback, not like aiortc's defaults: each audio
packet plays as it arrives (`bench.netimpair.PerPacketAudioBuffer`; `--client-audio-prefetch N` puts aiortc's
buffer back, which holds N packets and then one more until the next arrives), and a video frame is complete at its
marker bit (`bench.netimpair.MarkerJitterBuffer`; aiortc waits for the next frame's first packet, 40 ms). The microphone
stand-in sends 48 kHz frames, as a browser captures (aiortc's Opus encoder holds 16 kHz frames back 20 ms).
- push: a speech file (16 kHz wav, leading silence trimmed) is uploaded with POST /sessions/{id}/audio;
  from the POST's return to the first returned audio above the speech threshold (`push_audio_ms`) and
  to the first video frame whose mouth differs from every idle frame of the avatar loop (`push_mouth_ms`);
- ws_4x / ws_1x: the same speech as 20 ms s16 chunks over the PCM WebSocket, one every 5 ms (4x real
  time, a fast TTS) or every 20 ms (real time); from sending the chunk holding the speech onset to the
  first returned speech;
- mic: an aiortc microphone track that plays the speech in real time (a session with a microphone, no
  push); from the moment the track hands aiortc the frame holding the onset to the first returned speech;
- interrupt: during a long upload, POST /sessions/{id}/interrupt; from sending it to the first returned
  audio frame that is silent and stays silent (`interrupt_silence_ms`) and to the first video frame that
  matches the idle avatar again (`interrupt_rest_ms`).
Each measure: p50 and p95 over --trials trials (>= 10), plus every trial's value. Also the session's
look-ahead and delays as the server reports them (GET /sessions/{id}).

Wav2Lip runs with random weights (timing only: He init + calibrated BatchNorm, models/random_init.py, saved
like the released checkpoints), on the CPU, in the server's default configuration otherwise; `wav2lip:training`
and `wav2lip:official` choose --mel-alignment. The machine may be shared: /proc/loadavg is reported
before and after each renderer.

The last line printed is one JSON object: {"renderers": {NAME: {"push_audio_ms": {"p50", "p95",
"trials"}, ...}}, "loadavg": ...}.
"""
from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCRtpTransceiver
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.client import OfferRefused, PeerClient  # noqa: E402
from bench.common import Server, espeak_clip_16k, loadavg, pcm16, start_server, summary, wav_bytes  # noqa: E402
from bench.netimpair import MarkerJitterBuffer, PerPacketAudioBuffer  # noqa: E402

log = logging.getLogger("bench.latency")

TEXT = "Hello there, how are you today?"
RATE = 16000
SPEECH_RMS = 0.01       # a returned 20 ms frame louder than this carries speech (the clip's onset is ~0.05+)
SILENT_RMS = 0.002      # ... quieter than this is silence (Opus of digital silence is ~0)


# -- media --------------------------------------------------------------------------------------------

def wav_of(x: np.ndarray) -> bytes:
    return wav_bytes(pcm16(x), RATE)


def speech_onset(samples: np.ndarray, rms: float = SPEECH_RMS, block: int = 160) -> int | None:
    """First sample of the first 10 ms block louder than `rms`."""
    n = len(samples) // block
    if n == 0:
        return None
    blocks = samples[:n * block].reshape(n, block).astype(np.float64)
    loud = np.flatnonzero(np.sqrt(np.mean(blocks ** 2, axis=1)) > rms)
    return int(loud[0]) * block if loud.size else None


# -- the server --------------------------------------------------------------------------------------

def random_wav2lip_checkpoint(path: Path) -> Path:
    import torch

    from models.random_init import calibrated_random_
    from models.wav2lip import Wav2Lip

    torch.manual_seed(0)
    model = calibrated_random_(Wav2Lip(), lambda: (torch.rand(8, 1, 80, 16) * 8 - 4, torch.rand(8, 6, 96, 96)))
    torch.save({"state_dict": model.state_dict()}, path)
    return path


# -- the client --------------------------------------------------------------------------------------

class Microphone(MediaStreamTrack):
    """A microphone stand-in: 20 ms frames in real time, silence until `say(clip)`; remembers when it
    handed aiortc the frame holding the clip's first sample. Frames are 48 kHz, as a browser captures:
    aiortc's Opus encoder sends those in the call that gets them, while 16 kHz frames would each wait
    for the next one (server/media/opus_encoder.py)."""

    kind = "audio"
    rate = 48000

    def __init__(self) -> None:
        super().__init__()
        self._pos = 0
        self._start: float | None = None
        self._queue = np.zeros(0, np.int16)
        self.onset_sent_at: float | None = None
        self._onset_in_queue: int | None = None

    def say(self, clip: np.ndarray) -> None:
        self.onset_sent_at = None
        self._onset_in_queue = len(self._queue)
        up = np.interp(np.arange(len(clip) * self.rate // RATE) * RATE / self.rate, np.arange(len(clip)), clip)
        self._queue = np.concatenate([self._queue, pcm16(up)])

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pos / self.rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        n = self.rate // 50
        chunk, self._queue = self._queue[:n], self._queue[n:]
        if self._onset_in_queue is not None:
            if self._onset_in_queue < n:
                # The onset sample is "captured" (n - offset) samples before the frame is complete.
                self.onset_sent_at = time.monotonic() - (n - self._onset_in_queue) / self.rate
                self._onset_in_queue = None
            else:
                self._onset_in_queue -= n
        chunk = np.pad(chunk, (0, n - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pos
        frame.time_base = fractions.Fraction(1, self.rate)
        self._pos += n
        return frame


@dataclass
class Received:
    audio: list[tuple[float, np.ndarray, int]] = field(default_factory=list)  # (arrival, mono, rate)
    video: list[tuple[float, np.ndarray]] = field(default_factory=list)       # (arrival, mouth crop)


class Client(PeerClient):
    """The bench's peer (bench/client.py): keeps every received audio frame and a downscaled crop of the
    mouth in every video frame, with their arrival times."""

    def __init__(self, server: Server, http: aiohttp.ClientSession, mouth_box: tuple[int, int, int, int],
                 audio_prefetch: int) -> None:
        super().__init__(server.url, http)
        self.server = server
        self.audio_prefetch = audio_prefetch
        self.mouth_box = mouth_box
        self.received = Received()

    def on_frame(self, kind: str, frame: Any, arrival: float) -> None:
        if kind == "video":
            y1, y2, x1, x2 = self.mouth_box
            gray = frame.to_ndarray(format="gray")
            self.received.video.append((arrival, gray[y1:y2:2, x1:x2:2].astype(np.float32)))
        else:
            data = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1) / 32768.0
            self.received.audio.append((arrival, data.astype(np.float32), frame.sample_rate))

    def tune(self, transceiver: RTCRtpTransceiver) -> None:
        if transceiver.kind == "audio":
            set_audio_prefetch(transceiver.receiver, self.audio_prefetch)
        else:
            transceiver.receiver._RTCRtpReceiver__jitter_buffer = MarkerJitterBuffer(capacity=512, is_video=True)

    async def connect(self, microphone: MediaStreamTrack | None = None, **kwargs: Any) -> dict[str, Any]:
        try:
            answer = await super().connect(microphone, **kwargs)
        except OfferRefused as refused:
            raise SystemExit(f"bench/latency.py: offer refused: {refused.body}") from None
        deadline = time.monotonic() + 60
        while len(self.received.video) < 25 or not self.received.audio:
            if time.monotonic() > deadline:
                raise SystemExit("bench/latency.py: no media from the server")
            await asyncio.sleep(0.05)
        return answer

    async def upload(self, wav: bytes) -> float:
        """POST a wav to the session; returns the time the POST returned."""
        async with self.http.post(self.server.endpoint(f"/sessions/{self.session_id}/audio"), data=wav,
                                  headers={"Content-Type": "audio/wav", **self.auth}) as resp:
            await resp.read()
        return time.monotonic()

    async def metrics(self) -> dict:
        async with self.http.get(self.server.endpoint(f"/sessions/{self.session_id}"), headers=self.auth) as resp:
            return await resp.json()

    # -- what arrived ----------------------------------------------------------------------------
    def audio_onset_after(self, t0: float) -> float | None:
        """Play-out time of the first returned speech sample in a frame that arrived after t0."""
        for arrival, data, rate in self.received.audio:
            if arrival < t0:
                continue
            onset = speech_onset(data, block=max(len(data) // 4, 1))
            if onset is not None:
                return arrival + onset / rate
        return None

    def silence_after(self, t0: float, hold_s: float = 0.2) -> float | None:
        """Arrival of the first returned frame after t0 that is silent and followed by hold_s of silence."""
        frames = [(a, float(np.sqrt(np.mean(d.astype(np.float64) ** 2)))) for a, d, _ in self.received.audio
                  if a >= t0]
        for i, (arrival, rms) in enumerate(frames):
            if rms < SILENT_RMS and all(r < SILENT_RMS for a, r in frames[i:] if a <= arrival + hold_s):
                if frames[-1][0] >= arrival + hold_s:
                    return arrival
        return None

    def mouth_change(self, idle: np.ndarray, threshold: float, t0: float, moving: bool) -> float | None:
        """Arrival of the first video frame after t0 whose mouth differs from every idle frame by more than
        `threshold` (moving) or matches one of them again (not moving)."""
        for arrival, crop in self.received.video:
            if arrival < t0:
                continue
            distance = idle_distance(idle, crop)
            if (distance > threshold) == moving:
                return arrival
        return None


def set_audio_prefetch(receiver: Any, prefetch: int) -> None:
    """The client's audio jitter buffer: 0 hands each packet on as it arrives (a browser's adaptive buffer,
    NetEq, on a clean loopback); N >= 1 is aiortc's own buffer holding N packets (its default is 4 = 80 ms).
    This is the bench client's own setting (aiortc internals, aiortc 1.x), reported in the output; the
    server is untouched."""
    receiver._RTCRtpReceiver__jitter_buffer = (PerPacketAudioBuffer() if prefetch == 0
                                               else JitterBuffer(capacity=16, prefetch=prefetch))


def idle_distance(idle: np.ndarray, crop: np.ndarray) -> float:
    """Mean absolute difference of a mouth crop to the closest idle frame of the avatar loop."""
    return float(np.min(np.mean(np.abs(idle - crop[None]), axis=(1, 2))))


# -- the trials --------------------------------------------------------------------------------------

async def wait_until(predicate, timeout_s: float, step: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value is not None:
            return value
        await asyncio.sleep(step)
    return None


async def idle_reference(client: Client, seconds: float) -> tuple[np.ndarray, float]:
    """Mouth crops of the idle avatar over `seconds` (at least one loop), and the detection threshold: 3x
    the largest distance of later idle frames to that set (codec noise), at least 4 grey levels."""
    start = len(client.received.video)
    await asyncio.sleep(seconds)
    idle = np.stack([c for _, c in client.received.video[start:]])
    n0 = len(client.received.video)
    await asyncio.sleep(1.0)
    noise = [idle_distance(idle, c) for _, c in client.received.video[n0:]]
    return idle, max(4.0, 3.0 * max(noise, default=0.0))


async def settle(client: Client, seconds: float = 1.0) -> None:
    """Wait until the returned audio has been silent for `seconds`."""
    await wait_until(lambda: True if client.received.audio and all(
        np.sqrt(np.mean(d.astype(np.float64) ** 2)) < SILENT_RMS
        for a, d, _ in client.received.audio if a > time.monotonic() - seconds) else None, 30.0)


async def push_trials(client: Client, clip: np.ndarray, idle: np.ndarray, threshold: float, n: int) -> dict:
    body = wav_of(clip)
    audio, mouth = [], []
    for _ in range(n):
        await settle(client)
        t0 = await client.upload(body)
        heard = await wait_until(lambda t0=t0: client.audio_onset_after(t0), 10.0)
        seen = client.mouth_change(idle, threshold, t0, moving=True)
        if seen is None:
            seen = await wait_until(lambda t0=t0: client.mouth_change(idle, threshold, t0, moving=True), 5.0)
        audio.append(None if heard is None else 1000 * (heard - t0))
        mouth.append(None if seen is None else 1000 * (seen - t0))
        await asyncio.sleep(len(clip) / RATE)
    return {"push_audio_ms": summary(audio), "push_mouth_ms": summary(mouth),
            "push_mouth_minus_audio_ms": summary([None if a is None or m is None else m - a
                                                  for a, m in zip(audio, mouth, strict=True)])}


async def stream_trials(client: Client, clip: np.ndarray, speed: float, n: int) -> dict:
    url = client.server.endpoint(f"/sessions/{client.session_id}/stream?rate={RATE}&channels=1&format=s16"
                                 f"&token={client.token or ''}")
    chunk = RATE // 50
    pcm = pcm16(clip)
    values = []
    async with client.http.ws_connect(url) as ws:
        for _ in range(n):
            await settle(client)
            t_first = t0 = time.monotonic()
            for i, start in enumerate(range(0, len(pcm), chunk)):
                delay = t_first + i * 0.020 / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send_bytes(pcm[start:start + chunk].tobytes())
                if i == 0:
                    t0 = time.monotonic()
            await ws.send_str('{"type": "end"}')
            heard = await wait_until(lambda t0=t0: client.audio_onset_after(t0), 10.0)
            values.append(None if heard is None else 1000 * (heard - t0))
            await asyncio.sleep(len(clip) / RATE)
    return summary(values)


async def mic_trials(client: Client, mic: Microphone, clip: np.ndarray, n: int) -> dict:
    values = []
    for _ in range(n):
        await settle(client)
        mic.say(clip)
        sent = await wait_until(lambda: mic.onset_sent_at, 10.0)
        heard = await wait_until(lambda sent=sent: client.audio_onset_after(sent), 10.0) if sent else None
        values.append(None if heard is None or sent is None else 1000 * (heard - sent))
        await asyncio.sleep(len(clip) / RATE)
    return summary(values)


async def interrupt_trials(client: Client, clip: np.ndarray, idle: np.ndarray, threshold: float, n: int) -> dict:
    body = wav_of(np.tile(clip, 4))
    silence, rest = [], []
    for _ in range(n):
        await settle(client)
        t_push = await client.upload(body)
        await wait_until(lambda t_push=t_push: client.audio_onset_after(t_push), 10.0)
        await asyncio.sleep(0.8)
        t0 = time.monotonic()
        async with client.http.post(client.server.endpoint(f"/sessions/{client.session_id}/interrupt"),
                                    headers=client.auth) as resp:
            await resp.read()
        quiet = await wait_until(lambda t0=t0: client.silence_after(t0), 5.0)
        still = await wait_until(lambda t0=t0: client.mouth_change(idle, threshold, t0, moving=False), 5.0)
        silence.append(None if quiet is None else 1000 * (quiet - t0))
        rest.append(None if still is None else 1000 * (still - t0))
    return {"interrupt_silence_ms": summary(silence), "interrupt_rest_ms": summary(rest)}


async def bench_renderer(server: Server, clip: np.ndarray, mouth_box: tuple[int, int, int, int],
                         trials: int, loop_s: float, prefetch: int) -> dict:
    async with aiohttp.ClientSession() as http:
        client = Client(server, http, mouth_box, prefetch)
        await client.connect()
        await asyncio.sleep(2.0)                       # the encoder's bitrate ramps up
        idle, threshold = await idle_reference(client, loop_s + 0.5)
        result: dict[str, Any] = {"mouth_threshold": round(threshold, 2)}
        result.update(await push_trials(client, clip, idle, threshold, trials))
        session = (await client.metrics()).get("engine", {})
        result["ws_4x_ms"] = await stream_trials(client, clip, 4.0, trials)
        result["ws_1x_ms"] = await stream_trials(client, clip, 1.0, trials)
        result.update(await interrupt_trials(client, clip, idle, threshold, trials))
        result["session"] = {k: session.get(k) for k in ("latency_budget_ms", "lookahead_ms", "delay_frames",
                                                          "batch_frames", "utterance_delay_ms")}
        engine = (await client.metrics()).get("engine", {})
        result["session"]["quick_starts"] = engine.get("quick_starts")
        result["session"]["frames_dropped"] = engine.get("frames_dropped")
        result["session"]["frames_rendered"] = engine.get("frames_rendered")
        await client.close()

        mic = Microphone()
        client = Client(server, http, mouth_box, prefetch)
        await client.connect(microphone=mic)
        await asyncio.sleep(1.0)
        result["mic_ms"] = await mic_trials(client, mic, clip, trials)
        engine = (await client.metrics()).get("engine", {})
        result["mic_session"] = {k: engine.get(k) for k in ("utterance_delay_ms", "segments", "stalls",
                                                             "frames_starved", "audio_underrun_samples")}
        result["mic_session"]["engine_latency_ms"] = engine.get("latency_ms", {}).get("p50")
        await client.close()
    return result


def server_args(name: str, checkpoint: Path | None) -> list[str]:
    if name == "default":
        return []
    kind, _, alignment = name.partition(":")
    if kind != "wav2lip" or checkpoint is None:
        raise SystemExit(f"bench/latency.py: unknown renderer {name!r}")
    return ["--checkpoint", str(checkpoint), "--device", "cpu", "--mel-alignment", alignment or "training"]


def mouth_box() -> tuple[tuple[int, int, int, int], float]:
    """The default avatar's mouth region (y1, y2, x1, x2) over its whole loop, from its lip landmarks,
    and the seconds it takes to show every avatar frame once."""
    from realtime.avatars.default_avatar import load_default_avatar

    avatar = load_default_avatar()
    points = np.asarray(avatar.mouth, dtype=np.float32).reshape(-1, 2)
    x1, y1 = np.floor(points.min(axis=0)).astype(int) - 6
    x2, y2 = np.ceil(points.max(axis=0)).astype(int) + 6
    return (int(y1), int(y2), int(x1), int(x2)), len(avatar.frames) / float(avatar.fps or 25.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--renderers", default="default,wav2lip:training,wav2lip:official")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--client-audio-prefetch", type=int, default=0,
                        help="packets the bench client's audio jitter buffer holds before playing: 0 = each "
                             "as it arrives, as a browser on loopback (aiortc's own default is 4 = 80 ms)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.trials < 1:
        raise SystemExit("--trials must be >= 1")
    if args.client_audio_prefetch < 0:
        raise SystemExit("--client-audio-prefetch must be >= 0")
    clip = espeak_clip_16k(args.text)
    box, loop_s = mouth_box()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        names = [n.strip() for n in args.renderers.split(",") if n.strip()]
        checkpoint = random_wav2lip_checkpoint(Path(tmp) / "wav2lip_random.pth") if any(
            n.startswith("wav2lip") for n in names) else None
        for name in names:
            before = loadavg()
            server = start_server(server_args(name, checkpoint), Path(tmp) / f"server-{name}.log")
            try:
                res = asyncio.run(bench_renderer(server, clip, box, args.trials, loop_s,
                                                 args.client_audio_prefetch))
            finally:
                server.stop()
            res["loadavg_before"], res["loadavg_after"] = before, loadavg()
            results[name] = res
            log.info("%-18s push audio p50 %s p95 %s | mouth p50 %s p95 %s | ws 4x p50 %s p95 %s | "
                     "ws 1x p50 %s p95 %s | mic p50 %s p95 %s | interrupt silence p50 %s p95 %s, rest p50 %s "
                     "| L %s ms, look-ahead %s ms | load %s", name,
                     *(res[k][p] for k in ("push_audio_ms", "push_mouth_ms", "ws_4x_ms", "ws_1x_ms", "mic_ms",
                                           "interrupt_silence_ms") for p in ("p50", "p95")),
                     res["interrupt_rest_ms"]["p50"], res["session"]["latency_budget_ms"],
                     res["session"]["lookahead_ms"], res["loadavg_after"])
    sys.stdout.flush()
    print(json.dumps({"renderers": results, "clip_s": round(len(clip) / RATE, 2), "cpus": os.cpu_count(),
                      "client_audio_prefetch": args.client_audio_prefetch}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

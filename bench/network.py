"""The avatar over impaired links: a real server (`run_server.py`, a subprocess, the default avatar and
renderer) and an aiortc client talking through the user-space relay of bench/netimpair.py, per condition.

    python bench/network.py [--seconds 15] [--conditions clean,loss2_jitter30,burst5,link600k,outage3s]
                            [--sessions mic,push] [--chromium auto|yes|no]
                            [--server-repo PATH]   # e.g. a worktree of main, for the "before" figures

Conditions (both directions unless said): clean; loss2_jitter30 (2 % random loss, 30 +- 15 ms delay);
burst5 (5 % loss in bursts of 3 packets on average, Gilbert-Elliott); link600k (600 kbit/s token bucket,
200 ms queue, server -> client; the client -> server direction 600 kbit/s too); outage3s (a clean link,
everything dropped for 3 s in the middle).

Two aiortc sessions per condition (`--sessions`): a microphone session ("aiortc"): its microphone track
says a speech clip every ~3.5 s and the server returns it delayed with the talking avatar; and a push
session ("aiortc_push"): no microphone, the same clip every ~3.5 s over the session's PCM WebSocket in
real-time 20 ms chunks (a TTS streaming at 1x; `SpeakingPusher`). The WebSocket is TCP on loopback, not
through the relay: for the push session only the returned media cross the impaired link. The client's
receivers behave like a browser's where aiortc's differ (the server is untouched): video frames
complete at their marker bit and a hole is given up after 0.2 s with a PLI (`GiveUpJitterBuffer`),
audio plays on arrival and skips a lost packet (server/media/audio_jitter.py), and Opus is decoded with
FEC and concealment (server/media/opus_fec.py) as libwebrtc's NetEq does.

Figures per condition, over the measured window (`--seconds`, after 3 s of warm-up on the impaired
link), at the client:
- fps: video frames decoded per second;
- freeze_ms_total, longest_freeze_ms: inter-frame gaps longer than max(3 x 40 ms, 40 + 150 ms), as
  Chromium's freeze definition (the gaps' durations);
- concealed_pct: 20 ms audio frames the decoder had to invent (PLC) or that never came, over all;
- lip_lead_ms: per utterance, returned speech onset minus mouth-opening onset, both as arrival times
  (positive: the lips lead), the median;
- mic_to_audio_ms: from the microphone frame holding the onset (push: the WebSocket chunk holding it) to
  the returned speech onset, median;
- send_kbps: what the server sent (bytes entering the relay from the server) over the last 10 s;
- latency_delta_ms: mic_to_audio_ms minus the clean condition's (same session kind);
- mic_session / push_session: the server's engine figures (GET /sessions/{id}): segments, stalls,
  utterance_delay_ms, latency_p50_ms, and for the microphone live_jitter_ms, live_margin_ms and
  live_trimmed_samples (realtime/timeline/live_arrival.py); nack: the server's video NACK counters over
  the whole session (resent, refused: a keyframe instead, superseded: server/media/nack_policy.py);
- video_gave_up: holes the client's video buffer gave up on over the whole session, each followed by a
  PLI (the NACK or its retransmission was lost: aiortc's receiver NACKs a packet once per new gap).
outage3s adds survived (the session still open after it), video_resume_ms (from the link's return to
the next decoded frame) and frames_first_s (frames decoded in the second after it: no stale burst).
Chromium (`--chromium`, on when /usr/bin/chromium and Playwright are there): the page itself (Start, its
microphone faked from a wav of the clip and silence, looped by Chromium) through the same relay: a
Playwright route on POST /offer rewrites both SDPs. From `getStats()` deltas over the window: fps
(framesDecoded), freeze_ms_total (totalFreezesDuration), concealed_pct (concealedSamples /
totalSamplesReceived), jitter_buffer_ms, the selected candidate pair's rtt. From recorders in the page
(`RECORD_JS`): longest_freeze_ms from the presented frames (requestVideoFrameCallback presentation
times), mic_to_audio_ms from the microphone and the returned audio on one AudioContext clock (an
AudioWorklet), lip_lead_ms from that returned onset (mapped to performance time) and the first presented
frame whose mouth box leaves its idle shapes; latency_delta_ms against Chromium's clean figure
(docs/network.md "The bench" says what each includes).
link600k (both clients) adds send_kbps_per_s, send_fits_after_s (from when every later 2 s average fits
the link), video_width (full, min, last) and climb_back_s (after the window the link is widened: seconds
until full-size frames arrive again); and from the relay (`DownTrace`, `link_figures`): the audio
packets' queueing delay on the link (audio_link_delay_ms p50/p95/p99/max, audio_link_over_50ms_pct,
audio_link_dropped), what the server offered it by kind (offered_kbps: audio, video, rtx) and the three
largest video frames: size, how long the server took to hand them to
the link (send_span_ms), and the longest wait of an audio packet sent within 300 ms of their start.

The last line printed is one JSON object: {"conditions": {NAME: {"aiortc": {...}, "aiortc_push": {...},
"chromium": null}}, "loadavg": ..., "seconds": ...}; a session kind or "chromium" is null when it was not
run.
"""
from __future__ import annotations

import argparse
import asyncio
import fractions
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.client import OfferRefused, PeerClient  # noqa: E402
from bench.common import Server, espeak_clip_16k, loadavg, pcm16, start_server  # noqa: E402
from bench.netimpair import (  # noqa: E402
    GilbertElliott,
    GiveUpJitterBuffer,
    Impairment,
    Relay,
    negotiate_through,
    rewrite_candidates,
    rtp_payload_type,
    use_give_up_jitter_buffer,
)
from server.media import audio_jitter, opus_fec  # noqa: E402  (the client's receivers: a browser's behaviour)
from server.network.ice import use_host_addresses  # noqa: E402

log = logging.getLogger("bench.network")

RATE = 16000
TEXT = "Hello there, how are you today?"
SPEECH_RMS = 0.01
FRAME_S = 0.040
FREEZE_S = max(3 * FRAME_S, FRAME_S + 0.150)

CONDITIONS: dict[str, tuple[Impairment, Impairment]] = {
    "clean": (Impairment(), Impairment()),
    "loss2_jitter30": (Impairment(loss=0.02, delay_ms=30, jitter_ms=15),
                       Impairment(loss=0.02, delay_ms=30, jitter_ms=15)),
    "burst5": (Impairment(burst=GilbertElliott.for_loss(0.05, 3.0)),
               Impairment(burst=GilbertElliott.for_loss(0.05, 3.0))),
    "link600k": (Impairment(rate_kbps=600, queue_ms=200), Impairment(rate_kbps=600, queue_ms=200)),
    "outage3s": (Impairment(), Impairment()),
}


# -- the client's tracks ------------------------------------------------------------------------------

class SpeakingMicrophone(MediaStreamTrack):
    """48 kHz frames in real time: the clip every `period_s`, silence between; remembers when each onset
    was handed to aiortc."""

    kind = "audio"
    rate = 48000

    def __init__(self, clip: np.ndarray, period_s: float, first_s: float) -> None:
        super().__init__()
        up = np.interp(np.arange(len(clip) * 3) / 3, np.arange(len(clip)), clip)
        onset = int(np.flatnonzero(np.abs(up) > 0.02)[0]) if np.any(np.abs(up) > 0.02) else 0
        self._clip = pcm16(up)
        self._onset = onset
        self._period = round(period_s * 50) * (self.rate // 50)  # whole frames: the onset falls in one
        self._first = round(first_s * 50) * (self.rate // 50)
        self._pos = 0
        self._start: float | None = None
        self.onsets: list[float] = []

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pos / self.rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        n = self.rate // 50
        chunk = np.zeros(n, np.int16)
        rel = self._pos - self._first
        if rel >= 0:
            off = rel % self._period
            part = self._clip[off:off + n]
            chunk[:len(part)] = part
            if off <= self._onset < off + n:
                self.onsets.append(time.monotonic() - (n - (self._onset - off)) / self.rate)
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pos
        frame.time_base = fractions.Fraction(1, self.rate)
        self._pos += n
        return frame


class SpeakingPusher:
    """The push session's speaker: the clip over the session's PCM WebSocket (GET /sessions/{id}/stream,
    16 kHz s16) in 20 ms chunks, each sent once it has been "spoken" (a TTS streaming at real time), every
    `period_s`, with {"type": "end"} after each; remembers when each onset was sent (as
    SpeakingMicrophone does: the chunk's send time minus what follows the onset in it). Pauses are not
    sent: a push source sends its utterances only. The WebSocket is TCP on loopback, outside the relay:
    only the returned media cross the impaired link."""

    def __init__(self, clip: np.ndarray, period_s: float, first_s: float) -> None:
        self._pcm = pcm16(clip)
        loud = np.flatnonzero(np.abs(clip) > 0.02)
        self._onset = int(loud[0]) if loud.size else 0
        self._period, self._first = period_s, first_s
        self.onsets: list[float] = []

    async def run(self, http: aiohttp.ClientSession, url: str) -> None:
        chunk = RATE // 50
        async with http.ws_connect(url) as ws:
            drain = asyncio.ensure_future(self._drain(ws))   # the server's playback events: read, unused
            try:
                start = time.monotonic() + self._first
                k = 0
                while True:
                    for i, first in enumerate(range(0, len(self._pcm), chunk)):
                        wait = start + k * self._period + (i + 1) * 0.020 - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        await ws.send_bytes(self._pcm[first:first + chunk].tobytes())
                        if first <= self._onset < first + chunk:
                            self.onsets.append(time.monotonic() - (first + chunk - self._onset) / RATE)
                    await ws.send_str('{"type": "end"}')
                    k += 1
            finally:
                drain.cancel()

    @staticmethod
    async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
        async for _ in ws:
            pass


@dataclass
class Received:
    video: list[tuple[float, np.ndarray]] = field(default_factory=list)     # (arrival, mouth crop)
    audio: list[tuple[float, float, np.ndarray, int]] = field(default_factory=list)  # (arrival, pts s, mono, rate)
    widths: list[tuple[float, int]] = field(default_factory=list)              # (arrival, frame width)


decoders: list[Any] = []   # the client's Opus decoders (their fec_frames and concealed_frames)


def _recording_decoder(codec: Any) -> Any:
    decoder = opus_fec.get_decoder(codec)
    if codec.mimeType.lower() == "audio/opus":   # opus_fec's decoder: it counts FEC and PLC frames
        decoders.append(decoder)
    return decoder


class Client(PeerClient):
    """The harness's aiortc client (bench/client.py) with this bench's receive buffers (a browser's give-up
    video buffer, the server's own microphone buffer with FEC), its negotiation through the impairment
    relay, and what it records: the mouth crop, the frame widths, the audio with its pts and rate."""

    def __init__(self, server: Server, http: aiohttp.ClientSession, relay: Relay,
                 box: tuple[int, int, int, int]) -> None:
        super().__init__(server.url, http)
        self.server, self.relay, self.box = server, relay, box
        self.received = Received()
        self.full_size: tuple[int, int] | None = None
        self.video_buffer: GiveUpJitterBuffer | None = None

    def on_frame(self, kind: str, frame: Any, arrival: float) -> None:
        if kind == "video":
            y1, y2, x1, x2 = self.box
            self.received.widths.append((arrival, frame.width))
            if self.full_size is None:   # the first frames are the avatar's own size
                self.full_size = (frame.width, frame.height)
            if (frame.width, frame.height) != self.full_size:   # a thin link's smaller step
                frame = frame.reformat(width=self.full_size[0], height=self.full_size[1])
            gray = frame.to_ndarray(format="gray")
            self.received.video.append((arrival, gray[y1:y2:2, x1:x2:2].astype(np.float32)))
        else:
            data = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1) / 32768.0
            # (rate: 48 kHz from aiortc's decoder, 16 kHz where server/media/audio_jitter.py's buffer
            # marks the packets for the microphone's decoder, as it does on this client)
            self.received.audio.append((arrival, float(frame.pts * frame.time_base), data.astype(np.float32),
                                        int(frame.sample_rate)))

    async def connect(self, microphone: MediaStreamTrack | None = None, **kwargs: Any) -> dict[str, Any]:
        """A microphone session (`microphone`) or a push session (None: audio is received only), negotiated
        through the relay; an offer refused for capacity (503) is retried for ADMISSION_WAIT_S."""
        if microphone is not None:
            self.pc.addTrack(microphone)
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        self.video_buffer = use_give_up_jitter_buffer(self.pc)
        audio_jitter.install(self.pc)
        answers: list[dict[str, Any]] = []

        async def post(sdp: str) -> str:
            deadline = time.monotonic() + ADMISSION_WAIT_S
            while True:
                try:
                    answers.append(await self.offer(sdp))
                    return str(answers[-1]["sdp"])
                except OfferRefused as refused:
                    if refused.status == 503 and time.monotonic() < deadline:   # see ADMISSION_WAIT_S
                        await asyncio.sleep(float(refused.body.get("retry_after_s") or 1))
                        continue
                    raise SystemExit(f"bench/network.py: offer refused: {refused.body}") from None

        await negotiate_through(self.relay, self.pc, post)
        return answers[-1]

    async def alive(self) -> bool:
        async with self.http.get(self.server.endpoint(f"/sessions/{self.session_id}"), headers=self.auth) as resp:
            return resp.status == 200 and (await resp.json()).get("state") != "closed"

    def stream_url(self) -> str:
        return self.server.endpoint(f"/sessions/{self.session_id}/stream?rate={RATE}&channels=1&format=s16"
                                    f"&token={self.token or ''}")

    async def engine_stats(self) -> dict[str, Any]:
        """The server's engine figures for this session (GET /sessions/{id}): how often the input stalled
        (each stall re-places the input where its next audio arrives), its delay, and for a microphone
        the arrival jitter the engine saw and the delay it gave back (realtime/timeline/live_arrival.py);
        and its video retransmission counters over the whole session (server/media/nack_policy.py)."""
        async with self.http.get(self.server.endpoint(f"/sessions/{self.session_id}"), headers=self.auth) as resp:
            body = (await resp.json()) if resp.status == 200 else {}
        engine = body.get("engine", {})
        keys = ("segments", "stalls", "utterance_delay_ms", "live_jitter_ms", "live_margin_ms",
                "live_trimmed_samples")
        return {k: engine.get(k) for k in keys} | {
            "latency_p50_ms": (engine.get("latency_ms") or {}).get("p50"), "nack": body.get("nack")}

    async def close(self) -> None:
        if self.session_id:   # end it now, not when the server notices the silence (the next may wait)
            async with self.http.delete(self.server.endpoint(f"/sessions/{self.session_id}"),
                                        headers=self.auth) as resp:
                await resp.read()
        await super().close()


# -- figures ------------------------------------------------------------------------------------------

def freezes(arrivals: list[float]) -> tuple[float, float]:
    gaps = np.diff(np.asarray(arrivals)) if len(arrivals) > 1 else np.zeros(0)
    frozen = gaps[gaps > FREEZE_S]
    return float(frozen.sum() * 1000), float(frozen.max() * 1000) if frozen.size else 0.0


def audio_onset(received: list[tuple[float, float, np.ndarray, int]], after: float) -> float | None:
    for arrival, _, data, rate in received:
        if arrival < after:
            continue
        block = rate // 100   # 10 ms
        n = len(data) // block
        if n == 0:
            continue
        rms = np.sqrt(np.mean(data[:n * block].reshape(n, block).astype(np.float64) ** 2, axis=1))
        loud = np.flatnonzero(rms > SPEECH_RMS)
        if loud.size:
            return arrival + loud[0] * block / rate
    return None


def mouth_onset(video: list[tuple[float, np.ndarray]], idle: np.ndarray, threshold: float,
                after: float) -> float | None:
    for arrival, crop in video:
        if arrival >= after and float(np.min(np.mean(np.abs(idle - crop[None]), axis=(1, 2)))) > threshold:
            return arrival
    return None


def concealed_pct(received: list[tuple[float, float, np.ndarray, int]], t0: float, t1: float,
                  plc: int) -> float | None:
    """Invented (PLC) or never-received 20 ms frames over the frames the window should hold, from the
    client decoder's counter and the gaps left in the decoded timestamps (in seconds)."""
    window = [(pts, len(d) / rate) for a, pts, d, rate in received if t0 <= a < t1]
    if len(window) < 2:
        return None
    expected = (window[-1][0] + window[-1][1] - window[0][0]) / 0.020
    missing = max(0.0, expected - len(window))
    return round(100.0 * (missing + plc) / expected, 2)


def median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 1) if values else None


# -- one condition ------------------------------------------------------------------------------------

async def run_condition(server: Server, name: str, clip: np.ndarray, seconds: float, box: tuple[int, int, int, int],
                        seed: int, source: str = "mic") -> dict[str, Any]:
    """One session through the impaired link: `source` "mic" (the client's microphone track) or "push"
    (a push session: the clip over the PCM WebSocket, `SpeakingPusher`)."""
    up, down = CONDITIONS[name]
    relay = await Relay(up=up, down=down, seed=seed).start()
    trace = DownTrace(relay)
    period = max(3.5, len(clip) / RATE + 1.5)
    speaker: SpeakingMicrophone | SpeakingPusher
    speaker = (SpeakingMicrophone(clip, period_s=period, first_s=2.5) if source == "mic"
               else SpeakingPusher(clip, period_s=period, first_s=2.5))
    decoders.clear()
    result: dict[str, Any] = {}
    sent: list[tuple[float, int]] = []
    sampler = asyncio.ensure_future(sample_sent(relay, sent))
    pusher: asyncio.Future[None] | None = None
    async with aiohttp.ClientSession() as http:
        client = Client(server, http, relay, box)
        try:
            answer = await client.connect(speaker if isinstance(speaker, SpeakingMicrophone) else None)
            if isinstance(speaker, SpeakingPusher):
                pusher = asyncio.ensure_future(speaker.run(http, client.stream_url()))
            start = time.monotonic()
            while not client.received.video:
                if time.monotonic() - start > 30:
                    raise SystemExit(f"bench/network.py: no video in condition {name}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.0)   # the mic is silent until 2.5 s: the idle mouth
            idle = np.stack([c for _, c in client.received.video[-40:]])
            ref = [float(np.min(np.mean(np.abs(idle[np.arange(len(idle)) != i] - c[None]), axis=(1, 2))))
                   for i, c in enumerate(idle)]
            threshold = max(4.0, 3.0 * max(ref))
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            plc0 = sum(d.concealed_frames for d in decoders)
            fec0 = sum(d.fec_frames for d in decoders)
            outage_end = None
            if name == "outage3s":
                await asyncio.sleep(seconds / 2 - 1.5)
                relay.outage(3.0)
                await asyncio.sleep(3.0)
                outage_end = time.monotonic()
                await asyncio.sleep(seconds / 2 - 1.5)
            else:
                await asyncio.sleep(seconds)
            t1 = time.monotonic()
            plc = sum(d.concealed_frames for d in decoders) - plc0
            fec = sum(d.fec_frames for d in decoders) - fec0
            if outage_end is not None:
                result["survived"] = await client.alive()
            if pusher is not None and pusher.done():   # the WebSocket failed: say why, make up nothing
                raise SystemExit(f"bench/network.py: push stream ended in {name}: {pusher.exception()!r}")
            result[f"{source}_session"] = await client.engine_stats()
            # Holes the client's video buffer gave up on (each a PLI): a NACK or its retransmission lost.
            result["video_gave_up"] = None if client.video_buffer is None else client.video_buffer.gave_up
            video = [a for a, _ in client.received.video if t0 <= a < t1]
            freeze_total, freeze_longest = freezes(video)
            mic_delays, leads = [], []
            log.debug("onsets %s window %s %s", [round(o - t0, 2) for o in speaker.onsets], 0, round(t1 - t0, 2))
            for onset in speaker.onsets:
                if not t0 <= onset < t1 - 1.0:
                    continue
                if outage_end is not None and outage_end - 3.0 - 1.0 <= onset < outage_end:
                    continue
                heard = audio_onset(client.received.audio, onset)
                log.debug("onset %.2f heard %s", onset - t0, None if heard is None else round(heard - onset, 3))
                mouth = mouth_onset(client.received.video, idle, threshold, onset)
                if heard is not None and heard - onset < 2.0:
                    mic_delays.append(1000 * (heard - onset))
                    if mouth is not None and abs(heard - mouth) < 1.0:
                        leads.append(1000 * (heard - mouth))
            result.update({
                "fps": round(len(video) / (t1 - t0), 2),
                "freeze_ms_total": round(freeze_total, 1),
                "longest_freeze_ms": round(freeze_longest, 1),
                "concealed_pct": concealed_pct(client.received.audio, t0, t1, plc),
                "lip_lead_ms": median(leads),
                "mic_to_audio_ms": median(mic_delays),
                "send_kbps": kbps_over(sent, t1, min(10.0, t1 - t0)),
                "utterances": len(mic_delays),
                "plc_frames": plc,
                "fec_frames": fec,
            })
            if outage_end is not None:
                after = [a for a, _ in client.received.video if a >= outage_end]
                result["video_resume_ms"] = round(1000 * (after[0] - outage_end), 1) if after else None
                result["frames_first_s"] = len([a for a in after if a < outage_end + 1.0])
            result["relay"] = {d: {"dropped": relay.links[d].stats.dropped,
                                   "forwarded": relay.links[d].stats.forwarded} for d in ("up", "down")}
            if name == "link600k":
                first_video = client.received.video[0][0]
                result.update(send_fit(sent, first_video, t1, LINK_KBPS))
                result.update(link_figures(trace, str(answer["sdp"]), t0, t1))
                widths = [w for a, w in client.received.widths if t0 <= a < t1]
                result["video_width"] = {"full": client.full_size[0] if client.full_size else None,
                                         "min": min(widths) if widths else None,
                                         "last": widths[-1] if widths else None}

                async def widths_since(since: float) -> list[int]:
                    return [w for a, w in client.received.widths if a >= since]

                result["climb_back_s"] = await climb_back(
                    relay, widths_since, client.full_size[0] if client.full_size else 0)
        finally:
            sampler.cancel()
            if pusher is not None:
                pusher.cancel()
                await asyncio.gather(pusher, return_exceptions=True)
            await client.close()
            relay.close()
    if result.get("send_kbps") is not None:
        result["send_kbps"] = round(result["send_kbps"], 1)
    return result


ADMISSION_WAIT_S = 60.0
"""How long an offer answered 503 is retried (after its retry_after_s): the server's admission control
freezes new sessions for 10 s after late video ticks (server/access/capacity.py), which a loaded machine gives;
the bench measures one session at a time, not admission."""

LINK_KBPS = 600.0
CLIMB_S = 25.0


def send_fit(history: list[tuple[float, int]], start: float, t1: float, link_kbps: float) -> dict[str, Any]:
    """link600k: what the server offered the link, a second at a time from the first video frame, and the
    first second from which every later 2 s average fits the link (the target: within 5 s)."""
    per_s: list[float | None] = []   # None: fewer than two samples in that second (a late sampler)
    t = start
    while t + 1.0 <= t1:
        rate = kbps_over([h for h in history if t <= h[0] <= t + 1.0 + 1e-3], t + 1.0, 1.0 + 1e-3)
        per_s.append(None if rate is None else round(rate, 1))
        t += 1.0
    fits = None
    for i in range(len(per_s)):
        later = per_s[i:]
        pairs = [(a + b) / 2 for a, b in itertools.pairwise(later) if a is not None and b is not None]
        if pairs and all(p <= link_kbps for p in pairs):
            fits = float(i)
            break
    return {"send_kbps_per_s": per_s, "send_fits_after_s": fits}


class DownTrace:
    """Every RTP datagram the server sends into the link (the "down" direction), as the link takes it:
    (arrival, payload type, size, RTP timestamp, queueing delay on the link; None: dropped). The relay's
    own drop rule (none in these conditions) is taken for a hook that sees each datagram just before its
    link does."""

    def __init__(self, relay: Relay) -> None:
        self.rows: list[tuple[float, int, int, int, float | None]] = []
        link = relay.links["down"]
        admit = link.admit
        pending: list[tuple[int, int]] = []

        def see(data: bytes) -> bool:
            pt = rtp_payload_type(data)
            pending[:] = [] if pt is None else [(pt, int.from_bytes(data[4:8], "big"))]
            return False   # never drops

        def traced(now: float, size: int) -> float | None:
            at = admit(now, size)
            if pending:
                pt, ts = pending.pop()
                self.rows.append((now, pt, size, ts, None if at is None else at - now))
            return at

        relay.filters["down"] = see
        link.admit = traced  # type: ignore[method-assign]


def payload_types(sdp: str) -> tuple[int | None, set[int]]:
    """Opus' payload type and the RTX types (`apt=`) of an answer."""
    found = re.search(r"a=rtpmap:(\d+) opus/", sdp, re.IGNORECASE)
    return (int(found.group(1)) if found else None,
            {int(pt) for pt in re.findall(r"a=fmtp:(\d+) apt=\d+", sdp)})


def link_figures(trace: DownTrace, sdp: str, t0: float, t1: float) -> dict[str, Any]:
    """link600k, the cause of late audio: the audio packets' queueing delay on the link over the window
    (and how many waited more than 50 ms, or were dropped); what the server offered the link by kind
    (audio, video, retransmissions over RTX); and the three largest video frames (the packets of one RTP
    timestamp, RTX left out): their size, how long the server took to hand them to the link (first to
    last packet), and the longest an audio packet sent in the 300 ms from their first packet waited."""
    audio_pt, rtx_pts = payload_types(sdp)
    rows = [r for r in trace.rows if t0 <= r[0] < t1]
    audio = [r for r in rows if r[1] == audio_pt]
    delays = sorted(1000 * r[4] for r in audio if r[4] is not None)
    frames: dict[tuple[int, int], list[tuple[float, int]]] = {}
    for r in rows:
        if r[1] != audio_pt and r[1] not in rtx_pts:
            frames.setdefault((r[1], r[3]), []).append((r[0], r[2]))

    def kbps(kind: Callable[[int], bool]) -> float:
        return round(8 * sum(r[2] for r in rows if kind(r[1])) / max(t1 - t0, 1e-6) / 1000, 1)

    def pct(q: float) -> float | None:
        return round(delays[min(len(delays) - 1, int(q * len(delays)))], 1) if delays else None

    largest = []
    for packets in sorted(frames.values(), key=lambda f: -sum(size for _, size in f))[:3]:
        first, last = packets[0][0], packets[-1][0]
        behind = [1000 * r[4] for r in audio if first <= r[0] < first + 0.3 and r[4] is not None]
        largest.append({"kb": round(sum(size for _, size in packets) / 1000, 1), "packets": len(packets),
                        "send_span_ms": round(1000 * (last - first), 1),
                        "audio_delay_max_ms": round(max(behind), 1) if behind else None})
    return {"audio_link_delay_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
                                    "max": round(delays[-1], 1) if delays else None},
            "audio_link_over_50ms_pct": (round(100 * sum(d > 50 for d in delays) / len(delays), 2)
                                         if delays else None),
            "audio_link_dropped": len(audio) - len(delays),
            "offered_kbps": {"audio": kbps(lambda pt: pt == audio_pt), "rtx": kbps(lambda pt: pt in rtx_pts),
                             "video": kbps(lambda pt: pt != audio_pt and pt not in rtx_pts)},
            "largest_video_frames": largest}


async def climb_back(relay: Relay, widths_since: Callable[[float], Awaitable[list[int]]],
                     full_width: int) -> float | None:
    """link600k, after the measured window: the link widened (no impairment); seconds until the client
    gets full-size frames again (None: not within `CLIMB_S`, or the size never stepped down)."""
    relay.set_both(Impairment())
    widened = time.monotonic()
    while time.monotonic() - widened < CLIMB_S:
        seen = await widths_since(widened)
        if seen and seen[-1] >= full_width and min(seen) < full_width:
            return round(time.monotonic() - widened, 1)
        if seen and min(seen) >= full_width:
            return 0.0
        await asyncio.sleep(0.1)
    return None


async def sample_sent(relay: Relay, history: list[tuple[float, int]]) -> None:
    """Bytes the server offered to the link (entering the relay), sampled every 0.5 s."""
    while True:
        history.append((time.monotonic(), relay.links["down"].stats.bytes_received))
        await asyncio.sleep(0.5)


def kbps_over(history: list[tuple[float, int]], t1: float, seconds: float) -> float | None:
    window = [h for h in history if t1 - seconds <= h[0] <= t1]
    if len(window) < 2:
        return None
    (ta, ba), (tb, bb) = window[0], window[-1]
    return 8 * (bb - ba) / max(tb - ta, 1e-6) / 1000


# -- Chromium --------------------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")

STATS_JS = """async () => {
  const out = {video: {}, audio: {}, rtt_ms: null, pair: null};
  if (typeof session === 'undefined' || !session) return null;
  const report = await session.pc.getStats();
  const byId = {};
  report.forEach((s) => { byId[s.id] = s; });
  report.forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') out.video = {frames: s.framesDecoded || 0,
      dropped: s.framesDropped || 0, freezes: s.freezeCount || 0, freeze_s: s.totalFreezesDuration || 0};
    if (s.type === 'inbound-rtp' && s.kind === 'audio') out.audio = {concealed: s.concealedSamples || 0,
      total: s.totalSamplesReceived || 0, jb: s.jitterBufferDelay || 0, jbn: s.jitterBufferEmittedCount || 0};
    if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
      out.rtt_ms = typeof s.currentRoundTripTime === 'number' ? 1000 * s.currentRoundTripTime : null;
      const l = byId[s.localCandidateId], r = byId[s.remoteCandidateId];
      out.pair = (l ? l.candidateType : '?') + '/' + (r ? r.candidateType : '?');
    }
  });
  out.t = performance.now() / 1000;
  return out;
}"""


# Started once the page is connected: (1) the page's microphone stream and the returned audio track, side
# by side into one AudioWorklet (channel 0: the microphone, 1: the returned audio), which posts the level of
# every 128-sample render quantum with its AudioContext time: both on one clock, to the quantum; the
# context time is mapped to performance.now() by getOutputTimestamp() (the time that quantum is output);
# (2) requestVideoFrameCallback on the page's <video>: each presented frame's presentationTime, width,
# presentedFrames and the mouth box of that frame as 32x16 grey values (drawn from the video at the frame's
# own size, so a smaller step still covers the same face region).
RECORD_JS = """async (box) => {
  const video = document.getElementById('avatar');
  const ctx = new AudioContext();
  await ctx.resume();
  const code = `class Levels extends AudioWorkletProcessor {
    constructor() { super(); this.buf = []; }
    process(inputs) {
      const inp = inputs[0];
      if (inp && inp.length) {
        const a = inp[0], b = inp.length > 1 ? inp[1] : inp[0];
        let sa = 0, sb = 0;
        for (let i = 0; i < a.length; i++) { sa += a[i] * a[i]; sb += b[i] * b[i]; }
        this.buf.push(currentTime, Math.sqrt(sa / a.length), Math.sqrt(sb / b.length));
        if (this.buf.length >= 150) { this.port.postMessage(this.buf); this.buf = []; }
      }
      return true;
    }
  }
  registerProcessor('levels', Levels);`;
  await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([code], {type: 'application/javascript'})));
  const receiver = session.pc.getReceivers().find(r => r.track && r.track.kind === 'audio');
  const mic = ctx.createMediaStreamSource(session.micStream);
  const back = ctx.createMediaStreamSource(new MediaStream([receiver.track]));
  const merge = ctx.createChannelMerger(2);
  mic.connect(merge, 0, 0);
  back.connect(merge, 0, 1);
  const node = new AudioWorkletNode(ctx, 'levels', {numberOfInputs: 1, numberOfOutputs: 1, channelCount: 2,
    channelCountMode: 'explicit', channelInterpretation: 'discrete', outputChannelCount: [1]});
  const mute = ctx.createGain();
  mute.gain.value = 0;
  merge.connect(node);
  node.connect(mute);
  mute.connect(ctx.destination);
  window.__levels = [];
  window.__offsets = [];
  node.port.onmessage = (e) => {
    const ts = ctx.getOutputTimestamp();
    if (ts.performanceTime > 0 && ts.contextTime > 0) window.__offsets.push(ts.performanceTime - 1000 * ts.contextTime);
    for (const v of e.data) window.__levels.push(v);
  };
  const canvas = document.createElement('canvas');
  canvas.width = 32;
  canvas.height = 16;
  const g = canvas.getContext('2d', {willReadFrequently: true});
  window.__frames = [];
  window.__light = false;
  const onFrame = (now, meta) => {
    let grey = null;
    if (!window.__light) {
      const w = meta.width, h = meta.height;
      g.drawImage(video, box[0] * w, box[1] * h, (box[2] - box[0]) * w, (box[3] - box[1]) * h, 0, 0, 32, 16);
      const d = g.getImageData(0, 0, 32, 16).data;
      grey = new Array(512);
      for (let i = 0; i < 512; i++) {
        grey[i] = Math.round(0.299 * d[4 * i] + 0.587 * d[4 * i + 1] + 0.114 * d[4 * i + 2]);
      }
    }
    window.__frames.push([meta.presentationTime, meta.width, meta.presentedFrames, grey]);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
  window.__keep = [ctx, mic, back, merge, node, mute];
  return ctx.sampleRate;
}"""

TAKE_JS = """() => {
  const out = {levels: window.__levels, offsets: window.__offsets, frames: window.__frames};
  window.__levels = []; window.__frames = []; window.__light = true;
  return out;
}"""

LAST_WIDTH_JS = """() => { const f = window.__frames; const w = f.length ? f[f.length - 1][1] : null;
  window.__frames = []; return w; }"""

ONSET_LEVEL = 0.01   # rms of a 128-sample quantum, as bench/browser_latency.py's 256-sample blocks
QUIET_S = 0.5


def level_onsets(times: np.ndarray, level: np.ndarray) -> list[float]:
    """Context times where the level rises above ONSET_LEVEL after >= QUIET_S below it (the recording's
    start counts as loud, so a sound already going is not an onset)."""
    out: list[float] = []
    quiet_since: float | None = None
    for t, v in zip(times, level, strict=True):
        if v > ONSET_LEVEL:
            if quiet_since is not None and t - quiet_since >= QUIET_S:
                out.append(float(t))
            quiet_since = None
        elif quiet_since is None:
            quiet_since = float(t)
    return out


def presented_freezes(frames: list[list[Any]], t0_ms: float, t1_ms: float) -> tuple[float, float] | None:
    """(total, longest) freeze in ms from the presented frames' presentationTime: gaps longer than
    FREEZE_S, as for the aiortc client. A callback can be skipped while frames are still presented
    (presentedFrames then jumps by k > 1): such a gap is counted as k gaps of its length / k."""
    rows = [(f[0], f[2]) for f in frames if t0_ms <= f[0] <= t1_ms]
    if len(rows) < 2:
        return None
    total = longest = 0.0
    for (ta, na), (tb, nb) in itertools.pairwise(rows):
        k = max(1, int(nb) - int(na))
        gap = (tb - ta) / k
        if gap > 1000 * FREEZE_S:
            total += gap * k
            longest = max(longest, gap)
    return round(total, 1), round(longest, 1)


def chromium_av(data: dict[str, Any], t0_ms: float, t1_ms: float) -> dict[str, Any]:
    """mic_to_audio_ms (returned onset minus microphone onset, one AudioContext clock) and lip_lead_ms
    (returned onset, mapped to performance time, minus the first presented frame whose mouth leaves the
    idle shapes of the second before the microphone onset), medians over the utterances in the window."""
    levels = np.asarray(data["levels"], dtype=np.float64).reshape(-1, 3)
    offsets = data["offsets"]
    out: dict[str, Any] = {"mic_to_audio_ms": None, "lip_lead_ms": None, "utterances": 0}
    if levels.shape[0] < 10:
        return out
    offset = float(np.median(offsets)) if offsets else None
    mic, back = level_onsets(levels[:, 0], levels[:, 1]), level_onsets(levels[:, 0], levels[:, 2])
    frames = [(f[0], np.asarray(f[3], np.float32)) for f in data["frames"] if f[3] is not None]
    delays, leads = [], []
    for m in mic:
        if offset is not None and not t0_ms <= 1000 * m + offset < t1_ms - 1000:
            continue
        later = [b for b in back if m <= b < m + 1.5]
        if not later:
            continue
        delays.append(1000 * (later[0] - m))
        if offset is None:
            continue
        m_ms, heard_ms = 1000 * m + offset, 1000 * later[0] + offset
        idle = [g for t, g in frames if m_ms - 1000 <= t <= m_ms]
        if len(idle) < 5:
            continue
        stack = np.stack(idle)
        ref = [float(np.min(np.mean(np.abs(stack[np.arange(len(stack)) != i] - g[None]), axis=1)))
               for i, g in enumerate(stack)]
        threshold = max(4.0, 3.0 * max(ref))
        mouth = next((t for t, g in frames if m_ms < t < m_ms + 1500
                      and float(np.min(np.mean(np.abs(stack - g[None]), axis=1))) > threshold), None)
        if mouth is not None and abs(heard_ms - mouth) < 1000:
            leads.append(heard_ms - mouth)
    out.update({"mic_to_audio_ms": median(delays), "lip_lead_ms": median(leads), "utterances": len(delays)})
    if offset is None:
        out["lip_lead_note"] = "getOutputTimestamp gave no time: audio and video not on one clock"
    return out


def chromium_available() -> bool:
    if not CHROMIUM.exists():
        return False
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return False
    return True


def mic_wav(clip: np.ndarray, period_s: float, path: Path) -> Path:
    import wave

    pcm = pcm16(np.concatenate([clip, np.zeros(int(period_s * RATE) - len(clip), np.float32)]))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    return path


async def chromium_condition(browser: Any, server: Server, name: str, seconds: float, seed: int,
                             box: tuple[float, float, float, float]) -> dict[str, Any]:
    up, down = CONDITIONS[name]
    relay = await Relay(up=up, down=down, seed=seed).start()
    trace = DownTrace(relay)
    answer_sdp: list[str] = []
    sent: list[tuple[float, int]] = []
    sampler = asyncio.ensure_future(sample_sent(relay, sent))
    page = await browser.new_page(bypass_csp=True)   # the recorder's AudioWorklet module is a blob: URL

    async def offer_route(route: Any, request: Any) -> None:
        body = request.post_data_json
        body["sdp"], _ = rewrite_candidates(body["sdp"], relay.server_address)
        deadline = time.monotonic() + ADMISSION_WAIT_S
        while True:
            response = await route.fetch(post_data=json.dumps(body))
            answer = await response.json()
            if response.status != 503 or time.monotonic() >= deadline:   # see ADMISSION_WAIT_S
                break
            await asyncio.sleep(float(answer.get("retry_after_s") or 1))
        if response.status == 200:
            answer["sdp"], relay.server = rewrite_candidates(answer["sdp"], relay.client_address)
            answer_sdp.append(answer["sdp"])
        await route.fulfill(response=response, json=answer)

    result: dict[str, Any] = {}
    try:
        await page.route("**/offer", offer_route)
        await page.goto(server.url)
        await page.click("#start")
        await page.wait_for_function(
            "() => document.getElementById('status-state').textContent === 'connected'", timeout=30000)
        connected = time.monotonic()
        await page.evaluate(RECORD_JS, list(box))
        await asyncio.sleep(3.0)
        a = await page.evaluate(STATS_JS)
        t0 = time.monotonic()
        outage_end = None
        if name == "outage3s":
            await asyncio.sleep(seconds / 2 - 1.5)
            relay.outage(3.0)
            await asyncio.sleep(3.0)
            outage_end = time.monotonic()
            frames_at_end = (await page.evaluate(STATS_JS))["video"]["frames"]
            resume = None
            while time.monotonic() < outage_end + 5.0:
                now_frames = (await page.evaluate(STATS_JS))["video"]["frames"]
                if now_frames > frames_at_end + 1:
                    resume = time.monotonic() - outage_end
                    break
                await asyncio.sleep(0.05)
            result["video_resume_ms"] = None if resume is None else round(1000 * resume, 1)
            rest = seconds / 2 - 1.5 - (time.monotonic() - outage_end)
            await asyncio.sleep(max(0.0, rest))
        else:
            await asyncio.sleep(seconds)
        b = await page.evaluate(STATS_JS)
        t1 = time.monotonic()
        recorded = await page.evaluate(TAKE_JS)
        if outage_end is not None:
            result["survived"] = await page.evaluate(
                "async () => session ? (await fetch('/sessions/' + session.id, "
                "{headers: {Authorization: 'Bearer ' + session.token}})).status === 200 : false")
        dt = b["t"] - a["t"]
        dv = {k: b["video"].get(k, 0) - a["video"].get(k, 0) for k in b["video"]}
        da = {k: b["audio"].get(k, 0) - a["audio"].get(k, 0) for k in b["audio"]}
        presented = presented_freezes(recorded["frames"], 1000 * a["t"], 1000 * b["t"])
        av_figures = chromium_av(recorded, 1000 * a["t"], 1000 * b["t"])
        widths = [f[1] for f in recorded["frames"] if 1000 * a["t"] <= f[0] <= 1000 * b["t"]]
        full_width = recorded["frames"][0][1] if recorded["frames"] else None
        result.update({
            "fps": round(dv.get("frames", 0) / dt, 2),
            "freeze_ms_total": round(1000 * dv.get("freeze_s", 0), 1),
            "longest_freeze_ms": None if presented is None else presented[1],
            "freeze_ms_total_presented": None if presented is None else presented[0],
            "freezes": dv.get("freezes"),
            "frames_dropped": dv.get("dropped"),
            "concealed_pct": round(100 * da["concealed"] / da["total"], 2) if da.get("total") else None,
            "jitter_buffer_ms": round(1000 * da["jb"] / da["jbn"], 1) if da.get("jbn") else None,
            **av_figures,
            "send_kbps": kbps_over(sent, t1, min(10.0, t1 - t0)),
            "latency_delta_ms": None,   # set once the clean condition's figure is known
            "rtt_ms": None if b["rtt_ms"] is None else round(b["rtt_ms"], 1),
            "candidate_pair": b["pair"],
            "video_width": {"full": full_width, "min": min(widths) if widths else None,
                            "last": widths[-1] if widths else None},
        })
        if result["send_kbps"] is not None:
            result["send_kbps"] = round(result["send_kbps"], 1)
        result["relay"] = {d: {"dropped": relay.links[d].stats.dropped,
                               "forwarded": relay.links[d].stats.forwarded} for d in ("up", "down")}
        if name == "link600k":
            result.update(send_fit(sent, connected, t1, LINK_KBPS))
            result.update(link_figures(trace, answer_sdp[-1] if answer_sdp else "", t0, t1))
            seen: list[int] = []

            async def widths_since(_since: float) -> list[int]:
                width = await page.evaluate(LAST_WIDTH_JS)
                if width is not None:
                    seen.append(int(width))
                return seen

            result["climb_back_s"] = await climb_back(relay, widths_since, int(full_width or 0))
            result["survived_climb"] = await page.evaluate(
                "async () => session ? (await fetch('/sessions/' + session.id, "
                "{headers: {Authorization: 'Bearer ' + session.token}})).status === 200 : false")
        result["page"] = await page.evaluate(
            "() => [document.getElementById('status-state').textContent, "
            "document.getElementById('message').textContent]")
        if await page.is_enabled("#stop"):
            await page.click("#stop")
    finally:
        sampler.cancel()
        await page.close()
        relay.close()
    return result


async def run_chromium(server: Server, names: list[str], clip: np.ndarray, seconds: float,
                       tmp: Path) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    wav = mic_wav(clip, max(3.5, len(clip) / RATE + 1.5), tmp / "mic.wav")
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--allow-loopback-in-peer-connection",
            "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns"]
    results: dict[str, Any] = {}
    from realtime.avatars.default_avatar import load_default_avatar

    y1, y2, x1, x2 = mouth_box()
    height, width = load_default_avatar().frames[0].shape[:2]
    box = (x1 / width, y1 / height, x2 / width, y2 / height)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            for i, name in enumerate(names):
                before = loadavg()
                try:
                    res = await chromium_condition(browser, server, name, seconds, seed=200 + i, box=box)
                except Exception as exc:  # a figure that cannot be had is null, never made up
                    log.warning("chromium %s failed: %s", name, exc)
                    res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                res["loadavg"] = [before, loadavg()]
                results[name] = res
                log.info("chromium %-15s %s", name, json.dumps(res))
        finally:
            await browser.close()
    clean = (results.get("clean") or {}).get("mic_to_audio_ms")
    for res in results.values():
        m = res.get("mic_to_audio_ms")
        res["latency_delta_ms"] = None if clean is None or m is None else round(m - clean, 1)
    return results


# -- the server ---------------------------------------------------------------------------------------

def mouth_box() -> tuple[int, int, int, int]:
    from realtime.avatars.default_avatar import load_default_avatar

    avatar = load_default_avatar()
    points = np.asarray(avatar.mouth, dtype=np.float32).reshape(-1, 2)
    x1, y1 = np.floor(points.min(axis=0)).astype(int) - 6
    x2, y2 = np.ceil(points.max(axis=0)).astype(int) + 6
    return int(y1), int(y2), int(x1), int(x2)


async def run_all(server: Server, names: list[str], clip: np.ndarray, seconds: float,
                  sources: list[str]) -> dict[str, dict[str, Any]]:
    """{source: {condition: figures}}; latency_delta_ms against the same source's clean figure."""
    results: dict[str, dict[str, Any]] = {source: {} for source in sources}
    box = mouth_box()
    # A first session pays one-time costs (imports, first encoders, caches): not measured.
    await run_condition(server, "clean", clip, 8.0, box, seed=99)
    for i, name in enumerate(names):
        for source in sources:
            before = loadavg()
            res = await run_condition(server, name, clip, seconds, box, seed=100 + i, source=source)
            res["loadavg"] = [before, loadavg()]
            results[source][name] = res
            log.info("%-15s %-4s %s", name, source, json.dumps(res))
    for by_name in results.values():
        clean = by_name.get("clean", {}).get("mic_to_audio_ms")
        for res in by_name.values():
            m = res.get("mic_to_audio_ms")
            res["latency_delta_ms"] = None if clean is None or m is None else round(m - clean, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--sessions", default="mic,push",
                        help="aiortc sessions per condition: mic (its microphone track), push (PCM WebSocket)")
    parser.add_argument("--chromium", choices=("auto", "yes", "no"), default="auto",
                        help="also drive the page in /usr/bin/chromium through the relay (auto: if installed)")
    parser.add_argument("--server-repo", type=Path, default=REPO,
                        help="the checkout whose run_server.py serves (the client is always this one's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [n.strip() for n in args.conditions.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise SystemExit(f"bench/network.py: unknown conditions {unknown}; known: {list(CONDITIONS)}")
    sources = [s.strip() for s in args.sessions.split(",") if s.strip()]
    if not sources or any(s not in ("mic", "push") for s in sources):
        raise SystemExit(f"bench/network.py: --sessions takes mic and/or push, got {args.sessions!r}")
    if args.seconds < 8:
        raise SystemExit("--seconds must be >= 8")
    opus_fec.offer_inband_fec()
    use_host_addresses(["127.0.0.1"])   # the aiortc client offers loopback only (house rule)
    opus_fec.install_decoder(_recording_decoder)
    clip = espeak_clip_16k(TEXT)
    use_chromium = args.chromium == "yes" or (args.chromium == "auto" and chromium_available())
    browser_results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server([], Path(tmp) / "server.log", timeout_s=300.0, repo=args.server_repo.resolve())
        try:
            results = asyncio.run(run_all(server, names, clip, args.seconds, sources))
            if use_chromium:
                browser_results = asyncio.run(run_chromium(server, names, clip, args.seconds, Path(tmp)))
        finally:
            server.stop()
    sys.stdout.flush()
    print(json.dumps({"conditions": {n: {"aiortc": results.get("mic", {}).get(n),
                                         "aiortc_push": results.get("push", {}).get(n),
                                         "chromium": browser_results.get(n)} for n in names},
                      "seconds": args.seconds, "server_repo": str(args.server_repo), "cpus": os.cpu_count(),
                      "loadavg": loadavg()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The engine alone under a lossy, jittery microphone link, in simulated time: how much delay the link
adds to each utterance, with the old placement (`push_audio(live=False)`, what the engine did for the
microphone before realtime/timeline/live_arrival.py) and the new one (`live=True`, what the server does now).

    python bench/live_jitter.py [--seeds 8] [--utterances 6] [--jitter-ms 15] [--loss 0.02]

No network, no threads, no wall time: the driver plays the server's part (20 ms output pulls, a video
frame every 40 ms) and delivers the microphone's 20 ms chunks when a seeded link model says: a fixed
30 ms path delay, normal jitter clipped at 2.5 sigma with order kept (bench/netimpair.py's model), and a
lost chunk arriving with the next one (the microphone decoder rebuilds it from the next packet's FEC
data, server/media/opus_fec.py). bench/network.py's loss2_jitter30 applies the same model to the uplink, but
on a live server whose own scheduling adds jitter that varies with the machine's load; here the engine's
share is isolated and the result is the same on any machine.

The default avatar and the built-in renderer (its 75 ms look-ahead), the engine's default config
(L = 160 ms: the compute budget is not fitted, as no render time passes in simulated time; the server
fits it to ~134 ms). Speech: the espeak clip of bench/common.py, `--utterances` times, 1.8 s pauses.

Figures, per seed and summarised (ms): added_ms = each utterance's onset delay minus the same
utterance's on the clean link (fixed 30 ms, no jitter, no loss), for the old and the new placement;
stalls; trimmed_ms (pause time given back); frames_dropped. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realtime.timeline.clock import ManualClock  # noqa: E402
from realtime.timeline.session import LipSyncSession  # noqa: E402

SR = 16000
CHUNK = 320             # 20 ms
LOUD = 0.02             # an utterance's onset: its first sample louder than this


def arrivals(n: int, *, delay_ms: float, jitter_ms: float = 0.0, loss: float = 0.0, seed: int = 0,
             extra: dict[int, float] | None = None) -> list[float]:
    """When each of n chunks (chunk i recorded by (i + 1) x 20 ms) reaches the engine, in seconds.
    `extra`: chunk index -> additional delay in seconds (a one-off late burst)."""
    rng = random.Random(seed)
    times = []
    for i in range(n):
        j = max(-2.5, min(2.5, rng.gauss(0.0, 1.0))) * jitter_ms if jitter_ms else 0.0
        times.append((i + 1) * 0.02 + (delay_ms + j) / 1000 + (extra or {}).get(i, 0.0))
    for i in range(1, n):            # order kept: a queue delays, it does not reorder
        times[i] = max(times[i], times[i - 1])
    lost = [rng.random() < loss for _ in range(n)]
    for i in range(n - 2, -1, -1):   # a lost packet's audio comes with the next packet (FEC)
        if lost[i]:
            times[i] = times[i + 1]
    return times


def mic_input(clip: np.ndarray, utterances: int, lead_s: float = 1.0, pause_s: float = 1.8) -> np.ndarray:
    """Silence, then the clip and a pause, `utterances` times, as whole 20 ms chunks."""
    parts = [np.zeros(int(lead_s * SR), np.float32)]
    for _ in range(utterances):
        parts += [clip, np.zeros(int(pause_s * SR), np.float32)]
    audio = np.concatenate(parts)
    return np.concatenate([audio, np.zeros(-len(audio) % CHUNK, np.float32)])


def run_live(make_session: Callable[[ManualClock], LipSyncSession], audio: np.ndarray, times: list[float], *,
             live: bool = True) -> tuple[LipSyncSession, np.ndarray]:
    """Push `audio` chunk by chunk at `times` (seconds; the output clock starts at 0) and pull the output
    until everything played. Returns the session and the output audio (output sample j at j / 16 kHz)."""
    clock = ManualClock()
    session = make_session(clock)
    end = max(times) + 1.0
    events: list[tuple[float, int, int]] = [(t, 0, i) for i, t in enumerate(times)]  # pushes first at a tie
    events += [(k * 0.02, 1, k) for k in range(int(end / 0.02) + 1)]
    heapq.heapify(events)
    out: list[np.ndarray] = []
    while events:
        t, kind, i = heapq.heappop(events)
        clock.set(t)
        if kind == 0:
            session.push_audio(audio[i * CHUNK:(i + 1) * CHUNK], SR, live=live)
        else:
            out.append(session.next_audio(CHUNK))
            if i % 2 == 0:
                session.next_video_frame()
    return session, np.concatenate(out)


def onsets(audio: np.ndarray) -> list[int]:
    """The first loud sample of each utterance of the input."""
    loud = np.flatnonzero(np.abs(audio) > LOUD)
    return [int(loud[0])] + [int(b) for a, b in itertools.pairwise(loud) if b - a > SR]


def onset_delays(audio: np.ndarray, out: np.ndarray) -> list[float]:
    """Per utterance: when its onset played minus when it was recorded (ms)."""
    onsets_in = onsets(audio)
    loud_out = np.flatnonzero(np.abs(out) > LOUD)
    onsets_out = [int(loud_out[0])] + [int(b) for a, b in itertools.pairwise(loud_out) if b - a > SR // 2]
    if len(onsets_in) != len(onsets_out):
        raise AssertionError(f"utterances in {onsets_in} and out {onsets_out} do not pair up")
    return [1000.0 * (o - i) / SR for i, o in zip(onsets_in, onsets_out, strict=True)]


def speech_whole(audio: np.ndarray, out: np.ndarray) -> bool:
    """Every sample of sound played once, in order (the pauses here are digital silence)."""
    return bool(np.array_equal(out[out != 0], audio[audio != 0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--utterances", type=int, default=6)
    parser.add_argument("--jitter-ms", type=float, default=15.0)
    parser.add_argument("--loss", type=float, default=0.02)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.utterances < 2:
        raise SystemExit("bench/live_jitter.py: --seeds >= 1 and --utterances >= 2")

    from bench.common import espeak_clip_16k
    from realtime.avatars.default_avatar import load_default_avatar
    from realtime.config import EngineConfig
    from realtime.renderers.default import DefaultRenderer
    from realtime.scheduling.scheduler import InlineRenderWorker

    avatar = load_default_avatar()
    renderer = DefaultRenderer()

    def make_session(clock: ManualClock) -> LipSyncSession:
        return LipSyncSession(avatar, InlineRenderWorker(renderer, clock=ManualClock()), EngineConfig(), clock=clock)

    audio = mic_input(espeak_clip_16k("Hello there, how are you today?"), args.utterances)
    n = len(audio) // CHUNK
    clean_session, clean_out = run_live(make_session, audio, arrivals(n, delay_ms=30))
    clean = onset_delays(audio, clean_out)
    rows = []
    for seed in range(args.seeds):
        times = arrivals(n, delay_ms=30, jitter_ms=args.jitter_ms, loss=args.loss, seed=seed)
        row: dict[str, object] = {"seed": seed}
        for name, live in (("old", False), ("new", True)):
            session, out = run_live(make_session, audio, times, live=live)
            m = session.metrics()
            row[name] = {"added_ms": [round(d - c, 1) for d, c in zip(onset_delays(audio, out), clean, strict=True)],
                         "stalls": m.stalls, "trimmed_ms": round(1000 * m.live_trimmed_samples / SR, 1),
                         "frames_dropped": m.frames_dropped, "speech_whole": speech_whole(audio, out)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def summary(name: str) -> dict[str, float]:
        last = [r[name]["added_ms"][-1] for r in rows]          # type: ignore[index]
        every = [a for r in rows for a in r[name]["added_ms"][1:]]  # type: ignore[index]
        return {"last_utterance_added_ms_median": round(statistics.median(last), 1),
                "last_utterance_added_ms_max": round(max(last), 1),
                "added_ms_after_the_first_median": round(statistics.median(every), 1),
                "added_ms_after_the_first_max": round(max(every), 1)}

    print(json.dumps({"clean_onset_delay_ms": round(clean[0], 1), "latency_budget_ms": clean_session.latency_ms,
                      "jitter_ms": args.jitter_ms, "loss": args.loss, "seeds": args.seeds,
                      "utterances": args.utterances, "old": summary("old"), "new": summary("new"),
                      "speech_whole": all(r[k]["speech_whole"] for r in rows for k in ("old", "new"))}),  # type: ignore[index]
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Issue #25 item 1, the engine side, in simulated time: what one pushed chunk costs does not grow with what
is queued, the queue of utterances and segments is capped, queue events are coalesced, a fast real TTS is
never refused, and a source faster than real time is logged rate-limited and counted.

The cost is counted in calls (the planner's per-segment pass, the tracker's per-utterance sums), not timed,
so the tests hold on a loaded machine."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from server_helpers import TinyAvatar

from realtime.config import EngineConfig
from realtime.timeline import playback as playback_module
from realtime.timeline.clock import ManualClock
from realtime.timeline.playback import QueueChanged, SpeechEnded, SpeechStarted
from realtime.timeline.session import LipSyncSession, QueueLimit

RATE = 16000
BLOCK = 320
ONE_SAMPLE = np.zeros(1, dtype=np.int16)


class Player:
    """A session pulled in 20 ms audio blocks (as the server's audio track does), on a ManualClock."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.clock = ManualClock(100.0)
        self.session = LipSyncSession(TinyAvatar(), None, config=config, clock=self.clock)
        self.events: list = []
        self.session.playback.subscribe(self.events.append)
        self.pulled = 0

    def block(self) -> np.ndarray:
        self.clock.set(100.0 + self.pulled / RATE)
        out = self.session.next_audio(BLOCK)
        self.pulled += BLOCK
        return out

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds * RATE / BLOCK)):
            self.block()

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def tiny_utterance(p: Player, name: str) -> None:
    """The attack's unit: one sample, then end of utterance (35 KB made 1 200 of them over a WebSocket)."""
    p.session.push_audio(ONE_SAMPLE, RATE, utterance=name)
    p.session.end_of_audio()


class CallCounter:
    def __init__(self) -> None:
        self.calls = 0

    def wrap(self, fn):
        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return counted


def test_each_push_costs_the_same_however_many_utterances_are_queued(monkeypatch):
    """On main, every push planned every queued segment and summed every queued utterance (twice): 250
    queued cost 250x what one did, and 1 200 held the server's loop for 12.7 s. Now a push touches the
    segments near the playout horizon and the utterance at the front of the queue only."""
    p = Player()
    p.run(0.1)
    plans, sums = CallCounter(), CallCounter()
    monkeypatch.setattr(p.session._planner, "plan", plans.wrap(p.session._planner.plan))
    monkeypatch.setattr(playback_module._Utterance, "played", sums.wrap(playback_module._Utterance.played))
    cost: dict[int, tuple[int, int]] = {}
    for i in range(250):
        before = (plans.calls, sums.calls)
        tiny_utterance(p, f"u{i}")
        _ = p.session.playback.queued_samples, p.session.playback.speaking
        cost[i] = (plans.calls - before[0], sums.calls - before[1])
    assert cost[249][0] <= max(cost[5][0], 4), cost[249]   # planner passes per push: constant
    assert cost[249][1] <= max(cost[5][1], 4), cost[249]   # per-utterance sums per push: constant
    assert p.session.playback.queued_utterances == 250
    # Pulling the output is constant too: one 20 ms block with 250 utterances queued.
    before = (plans.calls, sums.calls)
    p.block()
    assert plans.calls - before[0] <= 4 and sums.calls - before[1] <= 4
    # And the queue still plays out exactly, in order.
    p.run(12.0)
    ended = p.of(SpeechEnded)
    assert [e.utterance for e in ended] == [f"u{i}" for i in range(250)]
    assert all(e.position_s == 1 / RATE and not e.interrupted for e in ended)
    assert p.session.playback.queued_utterances == 0 and p.session.playback.queued_samples == 0


def test_queued_utterances_are_capped_and_a_refusal_queues_nothing():
    config = EngineConfig(max_queued_utterances=20)
    p = Player(config)
    for i in range(19):
        tiny_utterance(p, f"u{i}")
    p.session.push_audio(ONE_SAMPLE, RATE, utterance="open")   # the 20th, still open
    head = p.session.push_audio(np.zeros(0, np.int16), RATE)   # the input head (an empty push is a no-op)
    segments = len(p.session._segments)
    with pytest.raises(QueueLimit, match="utterances"):
        p.session.push_audio(ONE_SAMPLE, RATE, utterance="one-too-many")
    assert p.session.playback.queued_utterances == 20 and len(p.session._segments) == segments
    assert p.session.push_audio(np.zeros(0, np.int16), RATE) == head
    # More audio for the open utterance is not a new utterance: never refused by this cap.
    for _ in range(50):
        p.session.push_audio(np.full(160, 100, np.int16), RATE, utterance="open")
    p.session.end_of_audio()
    with pytest.raises(QueueLimit):
        p.session.push_audio(ONE_SAMPLE, RATE, utterance="next")
    p.run(2.0)   # the queue plays out: room again
    p.session.push_audio(ONE_SAMPLE, RATE, utterance="later")
    assert p.session.playback.current == "later"
    assert [e.utterance for e in p.of(SpeechEnded)] == [f"u{i}" for i in range(19)] + ["open"]


def test_queued_segments_are_capped():
    """Untracked audio (no utterance: the integrations may push so) ended again and again: one segment each."""
    p = Player(EngineConfig(max_queued_segments=8))
    with pytest.raises(QueueLimit, match="segments"):
        for _ in range(1000):   # those within the look-ahead are planned (and gone) at once: a few more fit
            p.session.push_audio(ONE_SAMPLE, RATE)
            p.session.end_of_audio()
    assert len(p.session._segments) == 8
    p.run(2.0)
    p.session.push_audio(ONE_SAMPLE, RATE)


def test_a_fast_tts_is_never_refused_and_plays_exactly():
    """One utterance of 30 s in 10 ms chunks at 10x real time (3 000 pushes), with the output pulled as it
    goes: nothing refused, every sample played, and the queue events stay at most two per block."""
    p = Player()
    p.run(0.1)
    speech = (np.sin(np.arange(30 * RATE) * 0.05) * 8000).astype(np.int16)
    chunk = RATE // 100
    blocks = 0
    for start in range(0, len(speech), chunk * 10 * 2):   # 20 ms of output per 200 ms of input
        for c in range(start, min(start + chunk * 20, len(speech)), chunk):
            p.session.push_audio(speech[c:c + chunk], RATE, utterance="answer")
        p.block()
        blocks += 1
    p.session.end_of_audio()
    p.run(31.0)
    blocks += round(31.0 * RATE / BLOCK)
    ended = p.of(SpeechEnded)
    assert [(e.utterance, e.position_s, e.interrupted) for e in ended] == [("answer", 30.0, False)]
    assert [e.utterance for e in p.of(SpeechStarted)] == ["answer"]
    assert len(p.of(QueueChanged)) <= 2 * blocks
    assert p.session.metrics().audio_refused_samples == 0


def test_queue_events_are_coalesced_between_blocks():
    """1 000 pushes between two output blocks: one queue event at once, the rest folded into one that goes
    out with the next block, carrying the queue as it then is."""
    p = Player()
    p.run(0.1)
    n0 = len(p.of(QueueChanged))
    for _ in range(1000):
        p.session.push_audio(np.full(16, 1000, np.int16), RATE, utterance="burst")
    assert len(p.of(QueueChanged)) == n0 + 1
    p.block()
    queue = p.of(QueueChanged)[n0:]
    assert len(queue) == 2
    assert queue[-1].queued_s == pytest.approx(p.session.playback.queued_s, abs=1e-9)
    assert queue[-1].queued_s == pytest.approx(1000 * 16 / RATE, abs=BLOCK / RATE)


def test_a_source_faster_than_real_time_is_logged_rate_limited_and_counted(caplog):
    """A microphone whose RTP comes faster than real time fills the input buffer; on main every refused
    20 ms chunk logged a WARNING (unbounded log noise a stranger controls). Now: one line, and a counter."""
    p = Player(EngineConfig(max_buffered_s=1.0))
    frame = np.full(RATE // 50, 500, np.int16)
    caplog.set_level(logging.WARNING)
    for _ in range(150):   # 3 s of audio, all at once
        p.session.push_audio(frame, RATE)
    stats = p.session.metrics()
    assert stats.audio_refused_chunks >= 99 and stats.audio_refused_samples >= 99 * len(frame)
    full = [r for r in caplog.records if "audio buffer full" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in full]

"""Playback events in simulated time: a LipSyncSession (no renderer) on a ManualClock, audio pulled in
20 ms blocks as the server's audio track does; events are checked against the output audio itself."""
from __future__ import annotations

import numpy as np
import pytest
from server_helpers import TinyAvatar

from realtime.timeline.clock import ManualClock
from realtime.timeline.playback import (
    EventType,
    PlaybackTracker,
    QueueChanged,
    SpeechEnded,
    SpeechStarted,
    new_utterance_id,
    valid_utterance_id,
)
from realtime.timeline.session import LipSyncSession

RATE = 16000
BLOCK = 320


def tone(seconds: float, value: float) -> np.ndarray:
    """A constant, recognisable 'utterance' (DC level `value`): which output samples carry it is exact."""
    return np.full(int(seconds * RATE), value, dtype=np.float32)


class Player:
    def __init__(self) -> None:
        self.clock = ManualClock(100.0)
        self.session = LipSyncSession(TinyAvatar(), None, clock=self.clock)
        self.events: list = []
        self.session.playback.subscribe(self.events.append)
        self.out: list[np.ndarray] = []

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds * RATE / BLOCK)):
            j = sum(len(b) for b in self.out)
            self.clock.set(100.0 + j / RATE)
            self.out.append(self.session.next_audio(BLOCK))

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.out)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def test_two_utterances_play_in_order_with_exact_positions():
    p = Player()
    p.run(0.1)
    p.session.push_audio(tone(1.0, 0.25), RATE, utterance="a")
    p.session.end_of_audio()
    p.session.push_audio(tone(0.5, 0.5), RATE, utterance="b")
    p.session.end_of_audio()
    p.run(2.5)
    kinds = [(type(e).__name__, getattr(e, "utterance", None)) for e in p.events if not isinstance(e, QueueChanged)]
    assert kinds == [("SpeechStarted", "a"), ("SpeechEnded", "a"), ("SpeechStarted", "b"), ("SpeechEnded", "b")]
    audio = p.audio
    for name, level, seconds in (("a", 0.25, 1.0), ("b", 0.5, 0.5)):
        carried = np.flatnonzero(np.isclose(audio, level, atol=1e-4))
        started = next(e for e in p.of(SpeechStarted) if e.utterance == name)
        ended = next(e for e in p.of(SpeechEnded) if e.utterance == name)
        assert ended.position_s == seconds and ended.interrupted is False
        assert carried.size == int(seconds * RATE)
        # t is when the first / one-past-last sample leaves on the output timeline (sample j at 100 + j/RATE).
        assert started.t == pytest.approx(100.0 + carried[0] / RATE, abs=1e-9)
        assert ended.t == pytest.approx(100.0 + (carried[-1] + 1) / RATE, abs=1e-9)
    queue = [e.queued_s for e in p.of(QueueChanged)]
    assert queue[:2] == [1.0, 1.5] and queue[-1] == 0.0


def test_interrupt_reports_exactly_what_was_played():
    p = Player()
    p.run(0.1)
    p.session.push_audio(tone(2.0, 0.25), RATE, utterance="long")
    p.run(1.0)
    before = p.audio.size
    p.session.interrupt()
    p.run(0.5)
    ended = p.of(SpeechEnded)
    assert len(ended) == 1 and ended[0].interrupted is True and ended[0].utterance == "long"
    played = np.count_nonzero(np.isclose(p.audio[:before], 0.25, atol=1e-4))
    assert ended[0].position_s * RATE == played
    assert np.all(np.abs(p.audio[before + 80:]) == 0.0)  # after the 5 ms fade: silence
    assert 0.5 < ended[0].position_s < 1.0
    assert p.session.playback.queued_s == 0.0 and p.of(QueueChanged)[-1].queued_s == 0.0


def test_utterance_dropped_before_it_started_ends_at_zero():
    p = Player()
    p.session.push_audio(tone(1.0, 0.25), RATE, utterance="first")
    p.session.end_of_audio()
    p.session.push_audio(tone(1.0, 0.5), RATE, utterance="second")
    p.session.end_of_audio()
    p.run(0.6)
    p.session.interrupt()
    ended = {e.utterance: e for e in p.of(SpeechEnded)}
    assert ended["first"].interrupted and 0.0 < ended["first"].position_s < 1.0
    assert ended["second"].interrupted and ended["second"].position_s == 0.0
    assert [e.utterance for e in p.of(SpeechStarted)] == ["first"]


def test_stalled_stream_counts_only_utterance_samples():
    """A TTS slower than real time: the engine re-anchors the rest a frame later (silence in between);
    position_s counts the utterance's samples, not the gap."""
    p = Player()
    p.run(0.1)
    p.session.push_audio(tone(0.3, 0.25), RATE, utterance="slow")
    p.run(0.8)  # far past the stall threshold: the segment is closed
    p.session.push_audio(tone(0.3, 0.25), RATE, utterance="slow")
    p.session.end_of_audio()
    p.run(1.0)
    ended = p.of(SpeechEnded)
    assert ended[0].position_s == pytest.approx(0.6) and not ended[0].interrupted
    assert np.count_nonzero(np.isclose(p.audio, 0.25, atol=1e-4)) == int(0.6 * RATE)


def test_microphone_audio_makes_no_events():
    p = Player()
    p.session.push_audio(tone(0.5, 0.25), RATE)
    p.run(1.0)
    assert p.events == []


def test_empty_utterance_ends_when_finished():
    tracker = PlaybackTracker(delay_samples=5120)
    events: list = []
    tracker.subscribe(events.append)
    tracker.on_input("x", 0, 0, now=1.0)
    tracker.finish(now=1.0)
    assert events == []  # no input at all: nothing was opened
    tracker.on_input("y", 0, 160, now=1.0)
    tracker.on_interrupt(0, now=2.0)
    assert [e for e in events if isinstance(e, SpeechEnded)] == [SpeechEnded("y", 0.0, True, 2.0)]


def test_json_shapes_and_ids():
    assert SpeechStarted("u1", 5.0).as_json(1000.0) == {"type": "speech_started", "utterance": "u1", "t": 1005.0}
    assert SpeechEnded("u1", 1.25, True, 5.0).as_json() == {
        "type": "speech_ended", "utterance": "u1", "position_s": 1.25, "interrupted": True, "t": 5.0}
    assert QueueChanged(0.5, 2.0).as_json() == {"type": "queue", "queued_s": 0.5, "t": 2.0}
    assert SpeechStarted("u", 0).type is EventType.SPEECH_STARTED
    assert valid_utterance_id(new_utterance_id())
    assert not valid_utterance_id("has space") and not valid_utterance_id("") and not valid_utterance_id(5)
    assert not valid_utterance_id("x" * 200)

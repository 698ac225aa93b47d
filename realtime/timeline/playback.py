"""Playback events from the session's output timeline: when each utterance is actually played.

A chatbot needs to know when the avatar has finished speaking and how much of an utterance was heard
before a barge-in. `queued_s` from wall-clock arithmetic cannot say that: the engine delays every sample
by L, opens a new segment a frame later after an input stall, and drops the queue on interrupt. This
module follows the audio the session hands out instead (`LipSyncSession.next_audio`), sample by sample.

Timelines (realtime/timeline/clock.py): input sample n is played as output sample n + L. An utterance is a named
set of input spans (several when its source stalled and the engine re-anchored it a frame later); its
played amount at output position j is the part of its spans below j - L. So `position_s` is exact to the
sample on the output timeline (the video shows the same samples one frame at a time, so it is exact to
one frame for the picture too).

Events (dataclasses; `as_json()` gives the wire shapes of the push API):
    SpeechStarted(utterance, t)                          first sample of the utterance handed out
    SpeechEnded(utterance, position_s, interrupted, t)   last sample handed out, or cut by interrupt();
                                                         an utterance dropped before it started gets only
                                                         this, with position_s 0
    QueueChanged(queued_s, t)                            utterance audio not yet played, on a step change:
                                                         audio queued, the queue ran empty, interrupt
`t` is when the sample leaves on the session clock (`clock`, default time.monotonic), on the output
schedule: origin + (output sample) / 16000, where the origin is the earliest `now - j / 16000` seen over
the blocks pulled (the pullers pace blocks at origin + j / 16000 and wake late, never early; taking each
pull's own `now` instead put events out of order by the wake-up jitter, 10-15 ms on a loaded machine).
Events are delivered to subscribers synchronously, from the thread that calls the session (the server's
event loop), at most one audio block (20 ms) before `t`. Queue events are coalesced: input emits one only
if none went out since the latest block was pulled; otherwise the change goes out with the next block, so a
source pushing thousands of chunks between two blocks makes at most two queue events per block.

Cost: every hook is constant time per call, whatever the queue holds (a stranger controls how many
utterances are queued): totals are kept as running counts, and only the utterances at the front of the
queue (the one playing, the next to start) and the last one (where input goes) are ever looked at.
Utterances and their spans are in input order and never overlap, so nothing behind the front can start or
end before it does. `queued_utterances` lets the caller cap the queue (realtime/timeline/session.py does).

Who calls what (the session does; see the hooks in realtime/timeline/session.py):
    on_input(utterance, start, n)   push_audio of n samples at input index `start` tagged `utterance`
                                    (None: untracked audio such as a microphone)
    finish()                        end_of_audio(): the current utterance is complete
    on_output(j, n, now)            next_audio handed out output samples [j, j + n) at `now`
    on_interrupt(j, now)            interrupt() with output samples [0, j) handed out
"""
from __future__ import annotations

import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import numpy as np

from realtime.config import SAMPLE_RATE

log = logging.getLogger(__name__)

MAX_UTTERANCE_ID_CHARS = 128


def new_utterance_id() -> str:
    return "u-" + secrets.token_urlsafe(6)


def valid_utterance_id(value: object) -> bool:
    """Printable, short, no spaces: safe to echo back in JSON and logs."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_UTTERANCE_ID_CHARS and value.isprintable()
            and not any(c.isspace() for c in value))


class EventType(str, Enum):
    SPEECH_STARTED = "speech_started"
    SPEECH_ENDED = "speech_ended"
    QUEUE = "queue"


@dataclass(frozen=True)
class SpeechStarted:
    utterance: str
    t: float
    type: EventType = EventType.SPEECH_STARTED

    def as_json(self, t_offset: float = 0.0) -> dict[str, Any]:
        return {"type": self.type.value, "utterance": self.utterance, "t": round(self.t + t_offset, 4)}


@dataclass(frozen=True)
class SpeechEnded:
    utterance: str
    position_s: float   # how much of the utterance was played (exact to a sample, 1/16000 s)
    interrupted: bool
    t: float
    type: EventType = EventType.SPEECH_ENDED

    def as_json(self, t_offset: float = 0.0) -> dict[str, Any]:
        return {"type": self.type.value, "utterance": self.utterance, "position_s": round(self.position_s, 5),
                "interrupted": self.interrupted, "t": round(self.t + t_offset, 4)}


@dataclass(frozen=True)
class QueueChanged:
    queued_s: float
    t: float
    type: EventType = EventType.QUEUE

    def as_json(self, t_offset: float = 0.0) -> dict[str, Any]:
        return {"type": self.type.value, "queued_s": round(self.queued_s, 3), "t": round(self.t + t_offset, 4)}


PlaybackEvent = SpeechStarted | SpeechEnded | QueueChanged
Listener = Callable[[PlaybackEvent], None]


class _State(Enum):
    PENDING = 0    # queued, nothing played yet
    PLAYING = 1    # first sample handed out


@dataclass
class _Utterance:
    id: str
    spans: deque[list[int]] = field(default_factory=deque)   # [start, end) on the input timeline, in order
    total: int = 0            # samples in every span, including those already dropped from `spans`
    dropped: int = 0          # samples of spans dropped once wholly played (a long stalled stream has many)
    complete: bool = False
    state: _State = _State.PENDING

    def add(self, start: int, n: int) -> None:
        if self.spans and self.spans[-1][1] == start:
            self.spans[-1][1] = start + n
        else:
            self.spans.append([start, start + n])
        self.total += n

    def played(self, x: int) -> int:
        """Samples of the utterance below input index x."""
        out = self.dropped
        for a, b in self.spans:
            if a >= x:
                break
            out += min(b, x) - a
        return out

    def drop_played(self, x: int) -> None:
        """Forget spans wholly below x (the last one stays: it says where the utterance ends)."""
        while len(self.spans) > 1 and self.spans[0][1] <= x:
            a, b = self.spans.popleft()
            self.dropped += b - a


class PlaybackTracker:
    def __init__(self, delay_samples: int, sample_rate: int = SAMPLE_RATE) -> None:
        self._L = int(delay_samples)
        self._rate = sample_rate
        self._utterances: deque[_Utterance] = deque()   # in input order; finished ones are removed
        self._open: _Utterance | None = None      # the one new input is appended to
        self._listeners: list[Listener] = []
        self._out = 0                             # output samples handed out so far
        self._origin: float | None = None         # session-clock time of output sample 0
        self._total = 0                           # samples of every utterance in `_utterances` (running)
        self._last_queued = 0
        self._queue_sent = False                  # a queue event went out since the latest block
        self._queue_dirty = False                 # a change is waiting for the next block
        # Offsets within the last output block that carry utterance audio: [lo, hi), or None.
        self.last_block_voiced: tuple[int, int] | None = None

    # -- subscribers --------------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` for every event from now on; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _emit(self, event: PlaybackEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken subscriber must not stop the media
                log.exception("playback listener failed")

    # -- state ----------------------------------------------------------------------------------------
    @property
    def queued_samples(self) -> int:
        """Utterance samples not handed out yet. Constant time: only the utterance at the front can be
        partly played (every later one starts after it ends)."""
        if not self._utterances:
            return 0
        return self._total - self._utterances[0].played(self._out - self._L)

    @property
    def queued_utterances(self) -> int:
        """Utterances queued or playing (the open one included)."""
        return len(self._utterances)

    @property
    def queued_s(self) -> float:
        return self.queued_samples / self._rate

    @property
    def current(self) -> str | None:
        """The utterance new input is appended to, if it is still open."""
        return self._open.id if self._open is not None else None

    @property
    def speaking(self) -> bool:
        return bool(self._utterances) and self._utterances[0].state is _State.PLAYING

    # -- hooks ----------------------------------------------------------------------------------------
    def on_input(self, utterance: str | None, start: int, n: int, now: float) -> None:
        if utterance is None or n <= 0:
            return
        if self._open is None or self._open.id != utterance:
            self.finish(now)
            self._open = _Utterance(utterance)
            self._utterances.append(self._open)
        self._open.add(start, n)
        self._total += n
        self._queue_changed(now, coalesce=True)

    def finish(self, now: float) -> None:
        """The open utterance gets no more input. One that never got any ends here, position 0."""
        u, self._open = self._open, None
        if u is None:
            return
        u.complete = True
        if not u.spans:
            if self._utterances and self._utterances[-1] is u:   # the open one is always the last
                self._utterances.pop()
            self._emit(SpeechEnded(u.id, 0.0, False, now))
        else:
            self._advance(now, self._out, 0)

    def on_output(self, j: int, n: int, now: float) -> None:
        """Output samples [j, j + n) were handed out at `now` (the time sample j leaves)."""
        self._out = j + n
        origin = now - j / self._rate
        self._origin = origin if self._origin is None else min(self._origin, origin)
        self.last_block_voiced = self._voiced(j, n)
        self._queue_sent = False
        self._advance(now, j, n)
        if self._queue_dirty:
            self._queue_changed(now)

    def last_block_pcm16(self, audio: np.ndarray) -> bytes | None:
        """What a framework adapter forwards of the block just handed out (`audio`, float samples): the
        utterance audio as int16 PCM, or None when the block carries none. It runs from the block's start,
        with the silence before an utterance's first sample (an utterance starts where it was placed,
        between ticks), so a transport that plays blocks back to back keeps that sample's place relative
        to the images; it ends at the utterance's last sample."""
        if self.last_block_voiced is None:
            return None
        _, hi = self.last_block_voiced
        return np.clip(audio[:hi] * 32767.0, -32768, 32767).astype(np.int16).tobytes()

    def on_input_moved(self, from_x: int, delta: int) -> None:
        """The session moved its input from index `from_x` on by `delta` samples (a start from silence
        that plays sooner, realtime/timeline/utterance_start.py): the spans there follow, so positions and event
        times stay exact. Only the latest spans are there: walked from the back."""
        for u in reversed(self._utterances):
            for span in reversed(u.spans):
                if span[0] < from_x:
                    return
                span[0] += delta
                span[1] += delta

    def on_interrupt(self, j: int, now: float) -> None:
        """interrupt() after output samples [0, j) were handed out: every queued utterance ends here, at
        the time the last handed-out sample leaves."""
        x = j - self._L
        if self._origin is not None:
            now = self._origin + j / self._rate
        for u in self._utterances:   # once per utterance, each ending here: bounded by the caller's cap
            self._emit(SpeechEnded(u.id, u.played(x) / self._rate, True, now))
        self._utterances.clear()
        self._total = 0
        self._open = None
        self._queue_changed(now)

    # -- internals --------------------------------------------------------------------------------------
    def _advance(self, now: float, j: int, n: int) -> None:
        """Events for samples up to output position j + n, in sample order: from the front of the queue,
        stopping at the first utterance that neither starts nor ends (none behind it can)."""
        x_end = j + n - self._L
        while self._utterances:
            u = self._utterances[0]
            if u.state is _State.PENDING:
                if u.spans[0][0] >= x_end:
                    break
                u.state = _State.PLAYING
                self._emit(SpeechStarted(u.id, self._time_of(u.spans[0][0], now)))
            u.drop_played(x_end)
            last = u.spans[-1][1]
            if not (u.complete and last <= x_end):
                break
            self._utterances.popleft()
            self._total -= u.total
            self._emit(SpeechEnded(u.id, u.total / self._rate, False, self._time_of(last, now)))
        if self._last_queued and not self.queued_samples:
            self._queue_changed(now)

    def _time_of(self, x: int, now: float) -> float:
        """When input sample x leaves on the output schedule (`now` before any block was pulled)."""
        if self._origin is None:
            return now
        return self._origin + (x + self._L) / self._rate

    def _voiced(self, j: int, n: int) -> tuple[int, int] | None:
        x0, x1 = j - self._L, j + n - self._L
        lo, hi = n, 0
        for u in self._utterances:
            for a, b in u.spans:
                if a >= x1:
                    return (lo, hi) if hi > lo else None   # in order: nothing later is in the block
                if b > x0:
                    lo, hi = min(lo, max(a, x0) - x0), max(hi, min(b, x1) - x0)
        return (lo, hi) if hi > lo else None

    def _queue_changed(self, now: float, coalesce: bool = False) -> None:
        """A queue event when the queue changed; with `coalesce` (input), deferred to the next block when
        one already went out since the latest block."""
        queued = self.queued_samples
        if queued == self._last_queued:
            self._queue_dirty = False
            return
        if coalesce and self._queue_sent:
            self._queue_dirty = True
            return
        self._last_queued = queued
        self._queue_sent, self._queue_dirty = True, False
        self._emit(QueueChanged(queued / self._rate, now))

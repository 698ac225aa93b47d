"""Where an utterance that starts from silence begins on the output: the per-utterance delay.

A session's input -> output mapping is fixed (input sample n plays at output sample n + L, L = look-ahead
+ jitter + compute budget; realtime/timeline/clock.py), so audio and video of one utterance are sample-exact. What
may differ between utterances is where on the input timeline an utterance is placed, i.e. how long after
its first sample arrived it starts playing:

- look-ahead placement (always possible): the first sample plays L after the output clock reached it,
  the delay a stream arriving in real time needs, because each frame must wait for its window's future
  audio;
- quick placement: when the audio already received runs ahead of real time by the renderer's look-ahead
  plus the jitter allowance (an upload, `say`, a TTS stream faster than real time) or the utterance is
  complete, every frame's window is (or will be, even if the source now slows to real time) complete
  the compute budget before its tick, so the utterance may start the compute budget after the first
  output sample not yet shown or played.

The choice is made once per utterance, at a start from silence, and never moves afterwards: until then
the utterance is pending (its audio is stored, nothing is rendered); `choose_start` is asked again at
every push and output pull, and settles on the look-ahead placement as soon as waiting could no longer
save a frame. Everything here is a pure function of integers on the output timeline (samples).
"""
from __future__ import annotations

from dataclasses import dataclass

from realtime.timeline.clock import Timeline


@dataclass(frozen=True)
class PendingStart:
    """An utterance whose start is not decided yet (all positions in output samples)."""

    opened_out: int          # output position when its first audio arrived
    lookahead_start: int     # where its first sample plays with the look-ahead delay
    earliest: int            # where the audio queued before it ends (it may not start earlier)


def choose_start(pending: PendingStart, *, received: int, ended: bool, now_out: int, next_free: int,
                 timeline: Timeline, jitter: int) -> int | None:
    """The output sample where the utterance's first sample plays, or None to decide later (the session
    starts its frames at the frame at or before it; realtime/timeline/session.py).

    received: samples of it stored so far; ended: it is complete (end_of_audio or a stall);
    now_out: the output position now; next_free: the first output sample not yet shown or played;
    jitter: the input jitter allowance in samples."""
    quick = max(next_free + timeline.budget_samples, pending.earliest)
    if quick >= pending.lookahead_start:
        return pending.lookahead_start   # waiting longer cannot make it start sooner
    ahead = received - (now_out - pending.opened_out)   # samples beyond what real time would have brought
    if ended or ahead >= timeline.lookahead_samples + jitter:
        return quick
    return None


__all__ = ["PendingStart", "choose_start"]

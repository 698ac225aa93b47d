"""A live input (the microphone) over a lossy, jittery link, in simulated time: the engine's added delay
stays bounded and comes back down when the link is clean again, and no speech is lost or doubled.

The driver (bench/live_jitter.py) plays the server's part: every 20 ms of output it pulls 20 ms of
audio (and a video frame every 40 ms); the microphone's 20 ms chunks arrive when a seeded link model
delivers them: a fixed path delay, normal jitter clipped at 2.5 sigma with order kept (jitter comes
from queues, as bench/netimpair.py models it), and lost packets that arrive with the next one (the
microphone decoder rebuilds a lost frame from the next packet's FEC data: server/media/opus_fec.py).
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from bench import live_jitter
from bench.live_jitter import arrivals, mic_input, onset_delays, onsets
from realtime.config import EngineConfig
from realtime.renderers.base import AudioNeeds, RendererTraits
from realtime.scheduling.scheduler import InlineRenderWorker
from realtime.timeline.clock import ManualClock
from realtime.timeline.live_arrival import LiveArrival, WindowExtreme
from realtime.timeline.session import LipSyncSession
from tests.test_engine import FakeAvatar, RecordingRenderer

SR = 16000
CHUNK = 320             # 20 ms


class FirstColumnsRenderer(RecordingRenderer):
    """Reads the first 5 mel columns of each window, as the built-in renderer does: a 75 ms look-ahead
    and a short delay (L = 160 ms here), so the stall threshold's L / 2 cap is the server's."""

    traits = RendererTraits(audio_needs=AudioNeeds(columns=5))


def make_session(clock: ManualClock) -> LipSyncSession:
    return LipSyncSession(FakeAvatar(), InlineRenderWorker(FirstColumnsRenderer(), clock=ManualClock()),
                          EngineConfig(), clock=clock)


def run_live(audio: np.ndarray, times: list[float], *, live: bool = True) -> tuple[LipSyncSession, np.ndarray]:
    return live_jitter.run_live(make_session, audio, times, live=live)


def assert_speech_whole(audio: np.ndarray, out: np.ndarray) -> None:
    """Every sample of sound played once, in order: only silence was inserted (a stall) or left out (a
    shortened pause). The pauses here are digital silence, so the sound is the non-zero samples."""
    np.testing.assert_array_equal(out[out != 0], audio[audio != 0])


@pytest.fixture(scope="module")
def mic(speech_16k) -> np.ndarray:
    return mic_input(speech_16k, utterances=5)


@pytest.fixture(scope="module")
def clean_delays(mic) -> list[float]:
    session, out = run_live(mic, arrivals(len(mic) // CHUNK, delay_ms=30))
    assert_speech_whole(mic, out)
    assert session.metrics().live_trimmed_samples == 0
    return onset_delays(mic, out)


# --- the sliding window -----------------------------------------------------------------------------

@pytest.mark.parametrize("largest", [True, False])
def test_window_extreme_is_the_extreme_of_the_window(largest):
    rng = random.Random(3)
    extreme = WindowExtreme(span=500, largest=largest)
    pushed: list[tuple[int, int]] = []
    t = 0
    for _ in range(2000):
        t += rng.randrange(0, 120)
        v = rng.randrange(-1000, 1000)
        extreme.push(t, v)
        pushed.append((t, v))
        inside = [x for when, x in pushed if when >= t - 500]
        assert extreme.value() == (max(inside) if largest else min(inside))
    assert len(extreme._items) <= 500 // 1 + 1
    extreme.clear()
    assert extreme.value() is None


# --- a clean link: nothing changes ------------------------------------------------------------------

def test_clean_microphone_is_unchanged_by_live(mic, clean_delays):
    """On a clean link (fixed path delay, no jitter) a live input plays exactly as before: same output,
    same delay for every utterance, nothing given back, one segment."""
    times = arrivals(len(mic) // CHUNK, delay_ms=30)
    live, out_live = run_live(mic, times, live=True)
    plain, out_plain = run_live(mic, times, live=False)
    np.testing.assert_array_equal(out_live, out_plain)
    m = live.metrics()
    assert m.live_trimmed_samples == 0 and m.segments == plain.metrics().segments == 1
    assert onset_delays(mic, out_live) == clean_delays
    assert len(set(clean_delays)) == 1


# --- loss and jitter: no ratchet --------------------------------------------------------------------

JITTERY = dict(delay_ms=30, jitter_ms=15, loss=0.02)   # bench/network.py's loss2_jitter30, up the link


def lateness_ms(times: list[float], upto_s: float) -> float:
    """The latest any chunk recorded before `upto_s` arrived, over the clean link's arrival (ms)."""
    clean = arrivals(len(times), delay_ms=30)
    return max(1000 * (t - c) for t, c in zip(times, clean, strict=True) if c - 0.03 < upto_s)


@pytest.mark.parametrize("seed", [0, 3, 6, 9])
def test_jittery_lossy_microphone_keeps_the_delay_it_needs(mic, clean_delays, seed):
    """2 % loss (FEC: a lost chunk comes with the next) and 30 +- 15 ms jitter. Before, each late burst
    that passed the 40 ms stall threshold closed the segment and the input was placed anew where the
    late audio landed (rounded up to a frame) for the rest of the session: +36..+50 ms on these seeds
    after the first utterance. Now the threshold covers the jitter the link shows, so the delay of every
    utterance is what its first one had, at most the link's own worst lateness over the clean link."""
    times = arrivals(len(mic) // CHUNK, **JITTERY, seed=seed)
    session, out = run_live(mic, times)
    assert_speech_whole(mic, out)
    delays = onset_delays(mic, out)
    for d, clean, onset in zip(delays, clean_delays, onsets(mic), strict=True):
        assert d <= delays[0] + 1.0, delays                       # no ratchet
        assert d - clean <= lateness_ms(times, onset / SR) + 1.0, (delays, clean_delays)
    assert session.metrics().frames_dropped <= 2


def test_delay_added_by_a_late_burst_is_given_back_in_the_next_pause(mic, clean_delays):
    """One 150 ms hole on a clean link: the input stalls and resumes 150 ms late (and rounded up to a
    frame); before, every later utterance kept the +70 ms. Now, once a whole window arrived on time, the
    next pause plays shorter by the unused delay and the next utterance is back at the clean delay;
    no sound is lost or doubled."""
    n = len(mic) // CHUNK
    hole = 60   # the chunk recorded at 1.2 s, in the silence before the first utterance's end
    times = arrivals(n, delay_ms=30, extra={hole: 0.15})
    session, out = run_live(mic, times)
    assert_speech_whole(mic, out)
    delays = onset_delays(mic, out)
    assert delays[1:] == pytest.approx(clean_delays[1:], abs=0.5), (delays, clean_delays)
    m = session.metrics()
    assert m.stalls >= 2 and m.live_trimmed_samples > 0
    # Pushed audio (not live) keeps the delay the stall gave it: nothing is given back there.
    plain, out_plain = run_live(mic, times, live=False)
    assert plain.metrics().live_trimmed_samples == 0
    assert onset_delays(mic, out_plain)[-1] >= clean_delays[-1] + 60


def test_jittery_link_that_turns_clean_returns_to_the_clean_delay(mic, clean_delays):
    """Loss and jitter for the first half, a clean link after: the last utterance plays with the clean
    link's delay (the extra taken for the jitter given back in the pauses)."""
    n = len(mic) // CHUNK
    jittery = arrivals(n, **JITTERY, seed=8)
    clean = arrivals(n, delay_ms=30)
    half = n // 2
    times = jittery[:half] + [max(c, jittery[half - 1]) for c in clean[half:]]
    _, out = run_live(mic, times)
    assert_speech_whole(mic, out)
    delays = onset_delays(mic, out)
    assert delays[-1] == pytest.approx(clean_delays[-1], abs=0.5), (delays, clean_delays)
    assert max(delays) > clean_delays[0] + 10   # the jitter did cost delay while it lasted


def test_live_arrival_never_gives_back_more_than_a_pause_allows():
    """Units: nothing before a whole window since the input started, nothing from a loud chunk or just after
    speech, at most half of a quiet chunk, and never more than the smallest margin of the window."""
    live = LiveArrival(window=1600, jitter=320, min_quiet=1920, quiet_rms=10 ** (-50 / 20))
    quiet, loud = np.zeros(320, np.float32), np.full(320, 0.1, np.float32)
    live.restart(0)
    head = 0
    position = 320 + 800   # every chunk arrives 800 samples (50 ms) earlier than the allowance needs
    for k in range(4):     # loud, then the window is not full yet
        assert live.note(loud if k < 2 else quiet, head, position) == 0
        head, position = head + 320, position + 320
    trims = []
    for _ in range(20):
        trim = live.note(quiet, head, position)
        trims.append(trim)
        head, position = head + 320 - trim, position + 320
    assert all(0 <= t <= 160 for t in trims)
    assert sum(trims) == live.trimmed <= 800 + 320   # the margin (plus the allowance it measured from)
    assert trims[-1] == 0   # all given back: the latest chunks have no margin left
    assert live.note(loud, head, position) == 0
    assert live.note(quiet, head + 320, position + 320) == 0   # quiet, but right after speech




def test_the_server_declares_its_microphone_live_and_pushed_speech_not():
    """Only the microphone's pauses may be shortened: pushed speech (uploads, TTS) keeps every sample."""
    from server.media.audio_input import AudioInput

    calls: list[bool] = []

    class Spy(LipSyncSession):
        def push_audio(self, samples, sample_rate, channels=1, *, utterance=None, live=False):
            calls.append(live)
            return super().push_audio(samples, sample_rate, channels, utterance=utterance, live=live)

    audio_input = AudioInput(Spy(FakeAvatar(), None, clock=ManualClock()))
    audio_input.microphone(np.zeros(960, np.int16), 48000, 1)
    audio_input.push(np.zeros(320, np.int16), 16000)
    audio_input.push(np.zeros(320, np.int16), 16000, utterance="u1", complete=True)
    assert calls == [True, False, False]


def test_a_new_placement_moves_the_windows_margins_with_it():
    """A stall places the continuing input `jump` later: every chunk of the window would have had that
    much more margin, and the late chunk that caused it keeps what it needed."""
    live = LiveArrival(window=1600, jitter=320, min_quiet=0, quiet_rms=10 ** (-50 / 20))
    live.restart(0)
    live.note(np.full(320, 0.1, np.float32), 0, 320)        # on time: margin 0
    assert live.margin == 0
    live.moved(640)                                          # placed 40 ms later
    assert live.margin == 640
    live.note(np.full(320, 0.1, np.float32), 640 + 320, 320 + 320 + 600)   # the late one: margin 40
    assert live.margin == 40

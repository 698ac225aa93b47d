"""AudioInput: the one way audio enters a session's engine, from the microphone or the push API.

The engine queues audio pushed faster than real time, so pushed audio (an upload, `say`, PCM chunks
from a TTS) goes straight in. Microphone frames arrive in real time; while pushed audio is playing they
are dropped, so the bot's speech is never delayed behind (or mixed with) the microphone, and the
microphone picks up where the pushed audio ends (as played: counted on the engine's output timeline).
`interrupt()` drops what the engine has queued.
"""
from __future__ import annotations

import logging

import numpy as np

from realtime.timeline.session import QueueLimit
from server.engine import EngineSession

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class AudioInput:
    def __init__(self, engine: EngineSession, max_queued_s: float = 300.0) -> None:
        self._engine = engine
        self.max_queued_s = max_queued_s
        self.mic_frames = 0
        self.mic_dropped = 0
        self.pushed_s = 0.0
        self.interrupts = 0

    # -- sources -----------------------------------------------------------------------------------

    def microphone(self, samples: np.ndarray, sample_rate: int, channels: int) -> None:
        self.mic_frames += 1
        if self.speaking:
            self.mic_dropped += 1
            return
        try:
            self._engine.push_audio(samples, sample_rate, channels)
        except QueueLimit:   # the session's segment cap (a microphone that keeps stalling): drop the frame
            self.mic_dropped += 1

    def push(self, samples: np.ndarray, sample_rate: int, channels: int = 1, *,
             complete: bool = False, utterance: str | None = None) -> float:
        """Queue interleaved PCM (int16 or float32) of the utterance named `utterance` (for the
        playback events); `complete` marks its end. Returns its duration in seconds."""
        if sample_rate <= 0 or channels <= 0:
            raise ValueError("sample rate and channels must be positive")
        samples = np.asarray(samples).reshape(-1)
        frames = samples.shape[0] // channels
        duration = frames / sample_rate
        if frames == 0:
            return 0.0
        if self.queued_s + duration > self.max_queued_s:
            raise QueueFull(f"more than {self.max_queued_s:g} s of audio would be queued; "
                            "interrupt or wait")
        if utterance is None:
            self._engine.push_audio(samples[: frames * channels], sample_rate, channels)
        else:
            self._engine.push_audio(samples[: frames * channels], sample_rate, channels, utterance=utterance)
        self.pushed_s += duration
        if complete:
            self.end_of_audio()
        return duration

    def end_of_audio(self) -> None:
        """The current utterance is complete: its last frames are made now, not after a stall."""
        self._engine.end_of_audio()

    def interrupt(self) -> None:
        self.interrupts += 1
        self._engine.interrupt()

    # -- state -------------------------------------------------------------------------------------

    @property
    def queued_s(self) -> float:
        """Pushed audio that has not played yet, exact from the engine's output timeline
        (realtime/timeline/playback.py)."""
        return float(self._engine.playback.queued_s)

    @property
    def speaking(self) -> bool:
        return self.queued_s > 0.0

"""`InputSegment`: a contiguous run of input audio and its streaming features (mel columns, speech track).

A segment is fed its samples in order (`feed`), closed with `flush` (the offline end padding of the mel,
the end of the VAD), and read per output frame: `window` gives the (80, 16) mel window of a frame once its
columns are final, `frame_count` the official number of frames once flushed. Columns and VAD decisions
no longer needed are discarded as the frames are planned, so a long segment stays small.
"""
from __future__ import annotations

import math

import numpy as np

from realtime.audio.mel import MEL_STEP, N_MELS, SILENCE, StreamingMel
from realtime.audio.vad import SpeechDetector, SpeechTrack
from realtime.config import EngineConfig
from realtime.timeline.utterance_start import PendingStart


class InputSegment:
    """A contiguous run of input audio and its streaming features."""

    def __init__(self, start: int, first_frame: int, config: EngineConfig, delay_samples: int,
                 pending: PendingStart | None = None) -> None:
        self.start = start              # input-timeline index of the segment's first sample
        self.first_frame = first_frame  # output frame that shows it
        self.delay_samples = delay_samples  # its delay (the latency reference of its frames)
        self.pending = pending          # a start from silence not decided yet: stored, not fed
        self.last_speech = False        # was the last planned frame speech (the next one starts none)
        self.end: int | None = None     # length in samples, once the segment is closed
        self.fed = 0                    # samples given to the mel / VAD so far
        self.flushed = False
        self.mel = StreamingMel()
        self.speech = SpeechTrack(SpeechDetector(config.vad_aggressiveness, config.vad_block_ms,
                                                 config.energy_gate_dbfs))
        self._cols = np.zeros((N_MELS, 0), dtype=np.float32)  # mel columns kept (from _col_base on)
        self._col_base = 0
        self.next_frame = 0             # next segment frame to plan

    def feed(self, samples: np.ndarray) -> None:
        if len(samples):
            self._add(self.mel.push(samples))
            self.speech.push(samples)
            self.fed += len(samples)

    def flush(self) -> None:
        self._add(self.mel.flush())
        self.speech.end()
        self.flushed = True

    def _add(self, cols: np.ndarray) -> None:
        if cols.shape[1]:
            self._cols = np.concatenate([self._cols, cols], axis=1)

    def frame_count(self, samples_per_frame: float) -> int | None:
        """The official frame count of the closed segment (None while it is open). The epsilon keeps a
        length that is a whole number of frames from rounding up through float error."""
        if not self.flushed:
            return None
        return math.ceil((self.end or 0) / samples_per_frame - 1e-9)

    def window(self, start_col: int, columns: int = MEL_STEP) -> np.ndarray | None:
        """The (80, 16) window starting at `start_col` (clamped at the end once flushed), or None while
        its first `columns` columns (what the renderer reads) are not final. Columns before the audio
        (a negative start), past a short flushed segment, or past `columns` read as silence."""
        total = self.mel.columns_emitted
        if self.flushed:
            start_col = min(start_col, max(total - MEL_STEP, 0))
        elif start_col + columns > total:
            return None
        out = np.full((N_MELS, MEL_STEP), SILENCE, dtype=np.float32)
        lo, hi = max(start_col, 0), min(start_col + columns, total)
        if hi > lo:
            out[:, lo - start_col:hi - start_col] = self._cols[:, lo - self._col_base:hi - self._col_base]
        return out

    def discard_columns_before(self, col: int) -> None:
        col = min(col, self.mel.columns_emitted - MEL_STEP)
        drop = col - self._col_base
        if drop > 0:
            self._cols = self._cols[:, drop:]
            self._col_base += drop

    def covers(self, sample: int) -> bool:
        """Does input sample `sample` fall inside this segment (open segments extend forever)?"""
        return self.start <= sample and (self.end is None or sample < self.start + self.end)

"""The mouth-renderer protocol: a batch of (avatar frame, mel window) in, one mouth patch per frame out.

The engine (realtime/session.py, realtime/scheduler.py) only talks to this protocol, so the Wav2Lip
renderer, the no-weights default renderer and later models plug in without touching it.

Contract
- `prepare(avatar)` runs once per avatar before the first `render` (cache avatar-constant work there,
  e.g. Wav2Lip's face crops / encoder features). It may be slow; it never runs on the asyncio loop.
- `render(avatar, frame_indices, mels)` gets `frame_indices` (B,) int avatar frame indices and
  `mels` (B, 80, 16) float32 official mel windows, and returns exactly B `MouthPatch`es, in order.
  It runs on the render worker thread (never on the asyncio loop) and must not keep references to
  the `mels` array after returning.
- Optional: a renderer with `mixes_avatars = True` also has `render_mixed(avatars, frame_indices, mels)`
  (one avatar per frame), so a worker batches the frames of sessions on different avatars together.
- A patch covers the region `box` of the avatar frame; the compositor (realtime/compositor.py)
  resizes `image` to the box and blends it with `alpha` (or a default feathered lower-face mask).
- Optional attribute `audio_needs: AudioNeeds`: which part of each frame's window the renderer reads.
  It sets how much future audio a frame waits for (the look-ahead, hence the delay of a live stream):
  the engine sizes its timeline from it (realtime/clock.py). Without it: the whole official window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np

from realtime.mel import HOP, MEL_STEP, N_FFT, SAMPLE_RATE

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2) in avatar-frame pixels


def int_box(values: Iterable[Any]) -> Box:
    """Four numbers (a row of an avatar's float or int box array) as an int (y1, y2, x1, x2) box."""
    y1, y2, x1, x2 = (int(v) for v in values)
    return y1, y2, x1, x2


@dataclass
class MouthPatch:
    image: np.ndarray  # (h, w, 3) uint8 BGR
    box: Box  # the compositor resizes image to the box
    # (h, w) float32 in [0, 1] in image space; None = the compositor's default feathered lower-face mask
    alpha: np.ndarray | None = None


@dataclass(frozen=True)
class AudioNeeds:
    """The part of a frame's (80, 16) mel window a renderer reads.

    columns: the leading columns it reads (the engine may fill the rest with silence);
    offset_frames: the window of frame i starts at frame i + offset_frames (0: official inference;
    -1: Wav2Lip's training alignment, see realtime.mel.MelAlignment).
    """

    columns: int = MEL_STEP
    offset_frames: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.columns <= MEL_STEP:
            raise ValueError(f"columns must be 1..{MEL_STEP}, got {self.columns}")
        if self.offset_frames > 0:
            raise ValueError("a window may start before its frame, not after it")

    def lookahead_samples(self, fps: float) -> int:
        """Samples after a frame's own time that its window needs: the last column read (start +
        columns - 1) is final once 200 (start + columns - 1) + 400 samples have arrived, and the start
        column is at most (frame + offset_frames) x 80 / fps."""
        last_column_end = (self.columns - 1) * HOP + N_FFT // 2
        return max(0, math.ceil(last_column_end + self.offset_frames * SAMPLE_RATE / fps - 1e-9))


OFFICIAL_WINDOW = AudioNeeds()


def audio_needs_of(renderer: object) -> AudioNeeds:
    """A renderer's declared needs, or the whole official window when it declares none."""
    needs = getattr(renderer, "audio_needs", None)
    return needs if isinstance(needs, AudioNeeds) else OFFICIAL_WINDOW


@runtime_checkable
class MouthRenderer(Protocol):
    name: str

    def prepare(self, avatar) -> None:  # per-avatar precompute, once
        ...

    def render(self, avatar, frame_indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
        # mels (B, 80, 16) float32; batch in, one patch per frame out
        ...

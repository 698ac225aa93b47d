"""The mouth-renderer contract: a batch of (avatar frame, mel window) in, one mouth patch per frame out.

The engine (realtime/timeline/session.py, realtime/scheduling/scheduler.py) only talks to `MouthRenderer`,
so the Wav2Lip renderer, the no-weights default renderer, the remote render tier and later models plug in without
touching it. What a renderer can do beyond `render` is declared as data (`RendererTraits`) and read, never
probed: the base class gives every optional hook a default that does nothing.

Contract
- `prepare(avatar)` runs once per avatar before the first `render` (cache avatar-constant work there,
  e.g. Wav2Lip's face crops / encoder features). It may be slow; it never runs on the asyncio loop.
- `render(avatar, frame_indices, mels)` gets `frame_indices` (B,) int avatar frame indices and
  `mels` (B, 80, 16) float32 official mel windows, and returns exactly B `MouthPatch`es, in order.
  It runs on the render worker thread (never on the asyncio loop) and must not keep references to
  the `mels` array after returning.
- `traits.mixes_avatars`: the renderer also implements `render_mixed(avatars, frame_indices, mels)`
  (one avatar per frame), so a worker batches the frames of sessions on different avatars together.
- `traits.wants_deadline`: the worker calls `render_before(..., deadline_in_s)` (the time left until
  the batch is due) instead of `render`.
- A patch covers the region `box` of the avatar frame; the compositor (realtime/renderers/compositor.py)
  resizes `image` to the box and blends it with `alpha` (or a default feathered lower-face mask).
- `traits.audio_needs`: which part of each frame's window the renderer reads. It sets how much future
  audio a frame waits for (the look-ahead, hence the delay of a live stream): the engine sizes its
  timeline from it (realtime/timeline/clock.py). Default: the whole official window.
- Hooks with defaults: `prepare_steps` (prepare in slices between batches; default: `prepare` in one
  piece), `warmup_context` (wraps warm-up renders), `release` (drop an avatar's data), `describe`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from realtime.audio.mel import HOP, MEL_STEP, N_FFT, SAMPLE_RATE
from realtime.avatars.avatar import Avatar

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
    -1: Wav2Lip's training alignment, see realtime.audio.mel.MelAlignment).
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


@dataclass(frozen=True)
class RendererTraits:
    """What a renderer declares about itself; the render worker and the engine read it as it is."""

    mixes_avatars: bool = False     # render_mixed: one call may render several avatars' frames
    wants_deadline: bool = False    # render(..., deadline_in_s=): the replica orders batches by it
    audio_needs: AudioNeeds = OFFICIAL_WINDOW  # the part of each mel window it reads (the look-ahead)
    rows_from: int = 0              # generates patch rows [rows_from, 96) only; 0: whole patches
    device: str = "cpu"             # where it renders (a label: "cpu", "cuda:0", "ray")


class MouthRenderer:
    """Base of every mouth renderer: `render` is the one required method; the rest are declared hooks."""

    name: str = ""                  # for logs and metrics ("" : the class name)
    traits: RendererTraits = RendererTraits()

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def prepare(self, avatar: Avatar) -> None:
        """Per-avatar precompute, once, before its first render (off the event loop)."""

    def prepare_steps(self, avatar: Avatar) -> Iterator[None]:
        """`prepare` in slices the render worker runs between batches; default: in one piece."""
        self.prepare(avatar)
        yield from ()

    def warmup_context(self) -> contextlib.AbstractContextManager[Any]:
        """Entered around the worker's warm-up renders (e.g. cuDNN autotuning)."""
        return contextlib.nullcontext()

    def release(self, avatar: Avatar) -> None:
        """Drop a removed avatar's prepared data."""

    def describe(self) -> dict[str, str]:
        """Runtime facts for logs and /healthz (runtime, precision, ...)."""
        return {}

    def render(self, avatar: Avatar, frame_indices: np.ndarray, mels: np.ndarray) -> Sequence[MouthPatch | None]:
        """mels (B, 80, 16) float32 -> B patches in order (None: this frame could not be rendered)."""
        raise NotImplementedError

    def render_before(self, avatar: Avatar, frame_indices: np.ndarray, mels: np.ndarray,
                      deadline_in_s: float) -> Sequence[MouthPatch | None]:
        """`render` for a batch due in `deadline_in_s`; called instead of it with traits.wants_deadline."""
        return self.render(avatar, frame_indices, mels)

    def render_mixed(self, avatars: list[Avatar], frame_indices: np.ndarray,
                     mels: np.ndarray) -> Sequence[MouthPatch | None]:
        """`render` with one avatar per frame; only with traits.mixes_avatars."""
        raise NotImplementedError(f"{self.label} does not mix avatars (traits.mixes_avatars is False)")

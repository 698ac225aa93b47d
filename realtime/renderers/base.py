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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np

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


@runtime_checkable
class MouthRenderer(Protocol):
    name: str

    def prepare(self, avatar) -> None:  # per-avatar precompute, once
        ...

    def render(self, avatar, frame_indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
        # mels (B, 80, 16) float32; batch in, one patch per frame out
        ...

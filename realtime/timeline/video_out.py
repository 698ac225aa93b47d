"""What the session returns per video tick: `VideoOut` and its `FrameState`, plus the deferred compose.

`VideoOut.image` is made on first access from values fixed when the frame was made (the mouth patch, the
paste mode and strength), so the paste runs on whichever thread reads the image (the server's worker
thread, off its event loop) and a frame nobody looks at costs nothing. `compositor.paste` is looked up
per call (bench/encoded_sessions.py times it by replacing it on the module).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable

import numpy as np

from realtime.renderers import compositor
from realtime.renderers.base import MouthPatch


class FrameState(StrEnum):
    """What a video frame shows. A StrEnum: its members equal their strings ("rendered", ...), as before."""
    RENDERED = "rendered"   # a fresh mouth, rendered for this frame's audio
    HELD = "held"           # speech, but the render missed its tick: the last mouth is shown again
    IDLE = "idle"           # the avatar loop with the mouth at rest (possibly fading out the last mouth)


RENDERED, HELD, IDLE = FrameState.RENDERED, FrameState.HELD, FrameState.IDLE  # the short names


@dataclass
class VideoOut:
    pts_index: int               # k: pts = k / fps on the output timeline
    pts: float                   # seconds
    state: FrameState
    speech: bool                 # the speech decision for this frame
    dropped: bool                # a speech frame whose render was not ready in time
    avatar_index: int            # which avatar frame is underneath
    audio_start: int | None      # input-timeline sample of this frame's own audio time (None: no audio)
    mel: np.ndarray | None       # (80, 16) window this frame's mouth is made from (None: no audio)
    mouth_alpha: float           # strength the mouth patch was pasted with (0 = untouched avatar)
    compose: Callable[[], np.ndarray] = field(repr=False, compare=False)  # makes `image`
    _image: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> np.ndarray:
        """(H, W, 3) uint8 BGR, read-only (may be the avatar's own frame). The mouth is pasted on first
        access, from values fixed when the frame was made: the server reads it on a worker thread, so
        the paste stays off its event loop, and a frame nobody looks at (a skipped tick) costs nothing."""
        if self._image is None:
            self._image = self.compose()
        return self._image


def composed_image(base: np.ndarray, patch: MouthPatch, mode: str, strength: float) -> np.ndarray:
    """`base` with `patch` pasted at `strength`, read-only."""
    image = compositor.paste(base, patch, mode, strength=strength)
    image.flags.writeable = False
    return image


def unchanged_image(base: np.ndarray) -> np.ndarray:
    """A read-only view of `base` (the avatar's own frame, no mouth)."""
    image = base.view()
    image.flags.writeable = False
    return image

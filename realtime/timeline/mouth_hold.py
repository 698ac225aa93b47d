"""`MouthHold`: which mouth a frame shows when it has no fresh render of its own, and how strongly.

The mouth alpha (`gain`) ramps by 1 / ramp_frames per frame, up on each rendered frame and down on each
idle one, so a mouth never pops in or out. A speech frame whose render missed its tick re-shows the last
rendered mouth (at most `max_hold_frames` in a row), moved with the avatar's face box; otherwise the last
mouth fades out over the idle frames.
"""
from __future__ import annotations

from realtime.avatars.avatar import Avatar
from realtime.renderers import compositor
from realtime.renderers.base import MouthPatch
from realtime.timeline.video_out import HELD, IDLE, FrameState


class MouthHold:
    def __init__(self, avatar: Avatar, ramp_frames: int, max_hold_frames: int) -> None:
        self._avatar = avatar
        self._gain_step = 1.0 / ramp_frames
        self._max_hold_frames = max_hold_frames
        self.gain = 0.0                 # current mouth alpha
        self._held: tuple[MouthPatch, int] | None = None  # last rendered patch and its avatar frame
        self._hold_count = 0            # frames the held mouth has been re-shown in a row

    def rendered(self, patch: MouthPatch, avatar_index: int) -> None:
        """A frame shows its own fresh mouth: remember it and ramp the alpha up."""
        self._held = (patch, avatar_index)
        self._hold_count = 0
        self.gain = min(1.0, self.gain + self._gain_step)

    def hold_or_fade(self, avatar_index: int) -> tuple[FrameState, MouthPatch | None]:
        """A speech frame without its own mouth: re-show the last one (bounded), else fade to rest."""
        if self._held is not None and self._hold_count < self._max_hold_frames and self.gain > 0:
            self._hold_count += 1
            return HELD, self._moved_held(avatar_index)
        return IDLE, self.fade(avatar_index)

    def fade(self, avatar_index: int) -> MouthPatch | None:
        """An idle frame: the last mouth one ramp step weaker, or None once it is gone."""
        self.gain = max(0.0, self.gain - self._gain_step)
        if self.gain <= 0.0 or self._held is None:
            self._held = None
            self.gain = 0.0
            return None
        return self._moved_held(avatar_index)

    def reset(self) -> None:
        """Barge-in: no mouth, at once."""
        self.gain = 0.0
        self._held = None
        self._hold_count = 0

    def _moved_held(self, avatar_index: int) -> MouthPatch | None:
        """The held mouth shifted by how far the face box moved between its frame and this one."""
        if self._held is None:
            return None
        patch, from_index = self._held
        boxes = self._avatar.boxes
        if from_index == avatar_index:
            return patch
        dy = int(boxes[avatar_index][0]) - int(boxes[from_index][0])
        dx = int(boxes[avatar_index][2]) - int(boxes[from_index][2])
        return compositor.shifted(patch, dy, dx)

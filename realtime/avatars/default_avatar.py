"""The embedded default avatar (realtime/assets): an H.264 clip plus its shipped face track, so it needs
no detector and no cache. Built by scripts/make_default_avatar.py (a photo with idle motion and blinks).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from realtime.avatars.avatar import Avatar, AvatarConfig, AvatarError
from realtime.avatars.avatar_decode import iter_video, stack_frames

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_AVATAR = ASSETS / "default_avatar.mp4"
DEFAULT_AVATAR_TRACK = ASSETS / "default_avatar.npz"


def close_loop(frames: np.ndarray, ramp: int = 25) -> np.ndarray:
    """Spread the codec's drift over the last `ramp` frames so the last frame equals the first.

    For clips whose first and last frames show the same pose (the default avatar's motion is periodic)
    the only seam left after H.264 is coding noise: the first frame is a keyframe, the last one ends a
    long chain of predicted frames. Ramping the difference away (< 0.1 grey level per frame) makes the
    forward loop as seamless as the ping-pong one."""
    ramp = min(ramp, len(frames) - 1)
    if ramp < 1:
        return frames
    residual = frames[-1].astype(np.float32) - frames[0].astype(np.float32)
    for k in range(ramp):
        i = len(frames) - ramp + k
        frames[i] = np.clip(frames[i] - residual * ((k + 1) / ramp) + 0.5, 0, 255).astype(np.uint8)
    return frames


def decode_default_frames() -> np.ndarray:
    """The default avatar's frames exactly as the app uses them (decoded, loop closed)."""
    _fps, _expected, frames_iter = iter_video(DEFAULT_AVATAR, AvatarConfig(max_seconds=3600.0))
    return close_loop(stack_frames(list(frames_iter)))


def load_default_avatar(loop: str = "pingpong") -> Avatar:
    """The embedded avatar (realtime/assets): an H.264 clip plus its shipped face track, so it needs no
    detector and no cache. Its boxes/landmarks were computed on exactly these decoded frames."""
    if not DEFAULT_AVATAR.is_file() or not DEFAULT_AVATAR_TRACK.is_file():
        raise AvatarError(f"{DEFAULT_AVATAR}: the embedded default avatar is missing; "
                          "rebuild it with: python scripts/make_default_avatar.py")
    with np.load(DEFAULT_AVATAR_TRACK, allow_pickle=False) as track:
        boxes = track["boxes"].astype(np.int32)
        mouth = track["mouth"].astype(np.float32) if "mouth" in track else None
        masks = track["masks"] if "masks" in track else None
        fps = float(track["fps"])
    frames = decode_default_frames()
    if len(frames) != len(boxes):
        raise AvatarError(f"{DEFAULT_AVATAR}: {len(frames)} frames but {len(boxes)} boxes; "
                          "rebuild it with: python scripts/make_default_avatar.py")
    return Avatar(frames=frames, boxes=boxes, mouth=mouth, fps=fps, loop=loop, source=DEFAULT_AVATAR.name,
                  masks=masks)

"""Photo animation: a still gets a few seconds of subtle idle motion (head sway, breathing) so it never
looks frozen; the embedded default avatar is made the same way (scripts/make_default_avatar.py).

The motion signals are built so the clip loops seamlessly both ping-pong and forward.
"""
from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

from realtime.avatars.avatar import Progress


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    out: np.ndarray = x * x * (3 - 2 * x)
    return out


def idle_motion(n_frames: int, face_height: float, amplitude: float = 1.0) -> np.ndarray:
    """(n, 4) per-frame head roll (radians), shift x, shift y (px) and breathing rise (px).

    Only cos(k*pi*t/(n-1)) with even k: each signal is at rest (zero velocity) at both ends and
    equal at the first and last frame, so the clip loops seamlessly ping-pong and forward."""
    if n_frames <= 1:
        return np.zeros((max(n_frames, 0), 4))
    u = np.pi * np.arange(n_frames) / (n_frames - 1)
    a = amplitude
    roll = np.radians(1.0 * a) * (0.75 * np.cos(2 * u) + 0.25 * np.cos(6 * u))
    shift_x = 0.012 * a * face_height * (np.cos(4 * u) - 0.3 * np.cos(2 * u))
    shift_y = 0.006 * a * face_height * np.cos(6 * u)
    rise = 0.008 * a * face_height * (1 - np.cos(4 * u)) / 2  # breathing: shoulders and head rise
    return np.stack([roll, shift_x, shift_y, rise], axis=1)


def motion_weights(shape: tuple[int, int], box: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Soft masks: head (moves with the head) and body (rises with breathing); the neck pivot."""
    h, w = shape
    x1, y1, x2, y2 = (float(v) for v in box)
    fh = y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - 0.12 * fh
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    # Ellipse around face and hair; full weight inside, fading to 0 well outside it.
    r = np.sqrt(((xs - cx) / (0.95 * fh)) ** 2 + ((ys - cy) / (1.05 * fh)) ** 2)
    head = 1.0 - smoothstep((r - 0.9) / 0.7)
    pivot = (cx, y2 + 0.35 * fh)
    below = smoothstep((ys - (y2 - 0.2 * fh)) / (0.6 * fh))
    across = 1.0 - smoothstep((np.abs(xs - cx) - 1.2 * fh) / (0.8 * fh))
    body = np.maximum(head, below * across)
    return head.astype(np.float32), body.astype(np.float32), pivot


def animate_still(image: np.ndarray, face_box: np.ndarray, n_frames: int, amplitude: float = 1.0,
                  progress: Progress | None = None,
                  base: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    """(n, H, W, 3) uint8: the photo with a slow head sway and breathing (smooth local warps).

    `base(i)`, when given, supplies frame i's picture before the motion (e.g. with blinks painted in)."""
    h, w = image.shape[:2]
    fh = float(face_box[3] - face_box[1])
    head, body, (px, py) = motion_weights((h, w), face_box)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n_frames, h, w, 3), np.uint8)
    bottom_rise = smoothstep((h - ys) / max(1.0, h - py))  # breathing fades to 0 at the frame bottom
    for i, (roll, sx, sy, rise) in enumerate(idle_motion(n_frames, fh, amplitude).tolist()):
        c, s = math.cos(roll), math.sin(roll)
        # Forward displacement of a head point under a rotation about the neck pivot plus a shift;
        # sampling at p - d(p) is its inverse to first order (displacements are a few pixels).
        dx = (c - 1) * (xs - px) - s * (ys - py) + sx
        dy = s * (xs - px) + (c - 1) * (ys - py) + sy
        map_x = (xs - head * dx).astype(np.float32)
        map_y = (ys - head * dy + body * rise * bottom_rise).astype(np.float32)
        source = image if base is None else base(i)
        out[i] = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if progress is not None:
            progress(i + 1, n_frames)
    return out

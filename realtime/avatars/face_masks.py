"""Lower-face masks in 96x96 crop coordinates, from the face-mesh landmarks: the paste alpha for a mouth
patch (255 = face below the nose, feathered inside the face outline)."""
from __future__ import annotations

import cv2
import numpy as np

from realtime.avatars.avatar import CROP_SIZE


def lower_face_masks(landmarks: np.ndarray, boxes: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """(N, size, size) uint8: the face outline below the nose, feathered, in each frame's crop."""
    from models.face_detection.face_mesh import FACE_OVAL, NOSE_BOTTOM

    out = np.zeros((len(boxes), size, size), np.uint8)
    ramp = max(2, size // 16)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        pts = landmarks[i]
        sx, sy = size / max(1, x2 - x1), size / max(1, y2 - y1)
        poly = _to_crop(pts[list(FACE_OVAL)], x1, y1, sx, sy)
        mask: np.ndarray = np.zeros((size, size), np.float32)
        cv2.fillPoly(mask, [np.round(poly * 4).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=2)
        nose_y = float(_to_crop(pts[[NOSE_BOTTOM]], x1, y1, sx, sy)[0, 1])
        rows = np.clip((np.arange(size) - nose_y) / ramp + 0.5, 0, 1)  # soft edge under the nose
        mask *= rows[:, None]
        # Keep the feather inside the outline, then soften: the patch fades out before the cheek edge.
        mask = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=max(1, size // 48))
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=size / 48)
        out[i] = np.clip(mask * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def _to_crop(points: np.ndarray, x1: float, y1: float, sx: float, sy: float) -> np.ndarray:
    """Frame pixel coordinates -> crop coordinates (a box at (x1, y1) scaled by (sx, sy))."""
    return np.stack([(points[:, 0] - x1) * sx, (points[:, 1] - y1) * sy], axis=1)

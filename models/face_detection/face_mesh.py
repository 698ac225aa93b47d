"""MediaPipe's 468-point face mesh run through OpenCV's TFLite importer; the ROI maths is ours.

The mesh network sees a 192x192 crop of the face, rotated so the eyes are level and 1.5x larger than
the face, and returns 468 (x, y, z) points in crop pixels plus a face-presence logit. Mapping the crop
back to the image is one affine transform, so landmarks come back in image pixels (pixel-index
convention: the centre of the top-left pixel is (0, 0), as cv2 drawing uses).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

INPUT_SIZE = 192
ROI_SCALE = 1.5            # MediaPipe's margin around the face for the mesh crop
PRESENCE_THRESHOLD = 0.5   # sigmoid(face flag) below this: the crop holds no face

# Eye outer corners (subject's right eye = image left, then the left eye): the ROI rotation.
EYE_CORNERS = (33, 263)

# The face outline of the canonical mesh, clockwise from the top of the forehead.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
# Mouth points in the realtime.avatars.avatar.MOUTH_POINTS order: left corner (image left), right corner,
# upper lip top (outer), upper lip bottom (inner), lower lip top (inner), lower lip bottom (outer), chin.
MOUTH = (61, 291, 0, 13, 14, 17, 152)
# Lip contours (for masks and the default avatar's mouth work).
UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
UPPER_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LOWER_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
NOSE_BOTTOM = 2


@dataclass(frozen=True)
class Roi:
    """A square, rotated face region: centre and side in image pixels, angle in radians (eye line)."""
    cx: float
    cy: float
    size: float
    angle: float

    def crop_to_image(self) -> np.ndarray:
        """2x3 affine: crop pixel-index coordinates -> image pixel-index coordinates."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        k = self.size / INPUT_SIZE
        a = np.array([[k * c, -k * s], [k * s, k * c]])
        # Continuous coordinates: P = centre + A (X - 192/2); index = continuous - 0.5 on both sides.
        t = np.array([self.cx, self.cy]) - a @ np.array([INPUT_SIZE / 2, INPUT_SIZE / 2])
        t = t + a @ np.array([0.5, 0.5]) - 0.5
        return np.hstack([a, t[:, None]])


def roi_from_points(points: np.ndarray, eye_a: np.ndarray, eye_b: np.ndarray,
                    scale: float = ROI_SCALE) -> Roi:
    """Square ROI around `points`, rotated so the line eye_a -> eye_b is horizontal."""
    angle = math.atan2(float(eye_b[1] - eye_a[1]), float(eye_b[0] - eye_a[0]))
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])  # image -> face-aligned frame
    local = points @ rot.T
    lo, hi = local.min(0), local.max(0)
    centre = ((lo + hi) / 2) @ rot  # back to the image frame
    side = float((hi - lo).max()) * scale
    return Roi(float(centre[0]), float(centre[1]), side, angle)


def roi_from_detection(box: np.ndarray, keypoints: np.ndarray) -> Roi:
    """ROI from a BlazeFace box (x1, y1, x2, y2) and its eye keypoints, as MediaPipe builds it."""
    corners = np.array([[box[0], box[1]], [box[2], box[3]]], dtype=np.float64)
    angle = math.atan2(float(keypoints[1, 1] - keypoints[0, 1]), float(keypoints[1, 0] - keypoints[0, 0]))
    centre = corners.mean(0)
    side = float(max(box[2] - box[0], box[3] - box[1])) * ROI_SCALE
    return Roi(float(centre[0]), float(centre[1]), side, angle)


def roi_from_landmarks(landmarks: np.ndarray) -> Roi:
    """ROI for the next frame from this frame's mesh (MediaPipe's tracking step)."""
    return roi_from_points(landmarks, landmarks[EYE_CORNERS[0]], landmarks[EYE_CORNERS[1]])


class FaceMesh:
    """`run(frame_bgr, roi)` -> ((468, 2) float32 image pixels, presence score in [0, 1])."""

    def __init__(self, model_path: Path) -> None:
        self.net = cv2.dnn.readNetFromTFLite(str(model_path))
        self._names = list(self.net.getUnconnectedOutLayersNames())

    def run(self, image_bgr: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
        to_image = roi.crop_to_image()
        crop = cv2.warpAffine(image_bgr, to_image, (INPUT_SIZE, INPUT_SIZE),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        blob = cv2.dnn.blobFromImage(crop, scalefactor=1 / 255.0, swapRB=True)  # RGB in [0, 1]
        self.net.setInput(blob)
        outs = self.net.forward(self._names)
        coords = next(o for o in outs if o.size == 468 * 3).reshape(468, 3)[:, :2]
        logit = float(next(o for o in outs if o.size == 1).reshape(-1)[0])
        score = 1.0 / (1.0 + math.exp(-max(-80.0, min(80.0, logit))))
        # Model coordinates use the pixel-edge convention (0..192): shift to pixel indices, then map.
        pts = np.hstack([coords - 0.5, np.ones((468, 1), np.float32)]) @ to_image.T
        return pts.astype(np.float32), score

"""Per-frame face detectors behind one interface: `detect(frame_bgr, previous) -> FaceResult | None`.

- `mesh` (default): BlazeFace finds the face, the 468-point face mesh refines it and gives the lips;
  on video the mesh tracks from the previous frame's landmarks (MediaPipe's own scheme), so BlazeFace
  only runs when the track is lost. The box is derived from the mesh (see `box_from_landmarks`).
- `haar`: OpenCV's bundled frontal-face cascade; always available, no landmarks. A fallback.
- `s3fd`: the official Wav2Lip detector from a user-supplied s3fd.pth; lips from the mesh when present.

All boxes are (x1, y1, x2, y2) float pixels, unpadded, in the S3FD convention the Wav2Lip checkpoints
were trained on: cheek to cheek, mid-forehead to the chin.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from models.face_detection import face_mesh as fm
from models.face_detection.blazeface import FULL_RANGE_SPEC, SHORT_RANGE_SPEC, BlazeFace, weighted_nms
from models.face_detection.model_files import (
    FACE_MESH,
    FULL_RANGE,
    INSTALL_HINT,
    SHORT_RANGE,
    find_model,
    mesh_models_available,
)

log = logging.getLogger(__name__)

DETECTORS = ("auto", "mesh", "haar", "s3fd")

# Eyebrow top points (subject's right, left) of the mesh: the box top sits halfway between the brow
# line and the mesh's forehead top (point 10), where S3FD / WIDER-style face boxes put it.
_BROWS = (105, 334)
_FOREHEAD = 10
_CHIN = 152


class DetectorError(Exception):
    """A detector that cannot be used as asked (missing model files, bad weights); says the fix."""


@dataclass
class FaceResult:
    box: np.ndarray                    # (4,) float32 x1, y1, x2, y2, unpadded
    score: float
    landmarks: np.ndarray | None = None  # (468, 2) float32 face mesh in image pixels

    @property
    def mouth(self) -> np.ndarray | None:
        """(7, 2) float32 mouth points (realtime.avatars.avatar.MOUTH_POINTS order), None without a mesh."""
        return None if self.landmarks is None else self.landmarks[list(fm.MOUTH)].copy()


class FaceDetector(Protocol):
    name: str
    gives_landmarks: bool

    def detect(self, image_bgr: np.ndarray, previous: FaceResult | None = None) -> FaceResult | None: ...


def box_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """S3FD-style face box from the mesh: oval extents across, chin at the bottom, mid-forehead on top."""
    oval = landmarks[list(fm.FACE_OVAL)]
    x1, x2 = float(oval[:, 0].min()), float(oval[:, 0].max())
    y2 = float(oval[:, 1].max())
    brow = float(landmarks[list(_BROWS), 1].mean())
    y1 = (brow + float(landmarks[_FOREHEAD, 1])) / 2
    return np.array([x1, min(y1, y2 - 1), x2, y2], np.float32)


def _tile_starts(length: int, side: int) -> list[int]:
    """Tile origins along one axis: half-overlapping tiles that cover the whole length."""
    if side >= length:
        return [0]
    starts = list(range(0, length - side + 1, side // 2))
    if starts[-1] + side < length:
        starts.append(length - side)
    return starts


def _pick(boxes: list[np.ndarray], previous: FaceResult | None) -> int:
    """Which of several faces: the one nearest the previous frame's, else the largest (index 0)."""
    if previous is None or len(boxes) == 1:
        return 0
    centre = (previous.box[:2] + previous.box[2:]) / 2
    return int(np.argmin([np.linalg.norm((b[:2] + b[2:]) / 2 - centre) for b in boxes]))


class MeshDetector:
    name = "mesh"
    gives_landmarks = True
    REFINE_MOVE = 0.01  # re-run the mesh when its crop moved by more than this fraction of its size
    TILE = 320          # px: tile side for the small-face search
    # A tile search costs ~0.1 s; on frames without any face (a cut, a blank) run it on every 5th
    # frame only, so a faceless stretch costs little more than a normal search.
    TILE_COOLDOWN = 4

    def __init__(self) -> None:
        short, mesh = find_model(*SHORT_RANGE), find_model(FACE_MESH)
        if short is None or mesh is None:
            raise DetectorError(f"the face-mesh detector's model files are not installed: {INSTALL_HINT}")
        self.short = BlazeFace(short, SHORT_RANGE_SPEC)
        full = find_model(*FULL_RANGE)
        # Full range (192 px input) finds small, distant faces the short-range model misses.
        self.full = BlazeFace(full, FULL_RANGE_SPEC) if full is not None else None
        self.mesh = fm.FaceMesh(mesh)
        self._tile_wait = 0

    def mesh_at(self, image: np.ndarray, roi: fm.Roi) -> FaceResult | None:
        """The mesh on `roi` (twice: the second crop is centred on the first answer); None: no face."""
        landmarks, score = self.mesh.run(image, roi)
        if score < fm.PRESENCE_THRESHOLD:
            return None
        # A second pass from the mesh's own ROI centres and levels the crop: steadier landmarks.
        landmarks2, score2 = self.mesh.run(image, fm.roi_from_landmarks(landmarks))
        if score2 >= fm.PRESENCE_THRESHOLD:
            landmarks, score = landmarks2, score2
        return FaceResult(box_from_landmarks(landmarks), score, landmarks)

    def find(self, image: np.ndarray, previous: FaceResult | None = None) -> FaceResult | None:
        """Full search: BlazeFace (short range, then full range) then the mesh on the chosen face;
        then, for small faces, short range on overlapping tiles (rate-limited: see TILE_COOLDOWN)."""
        for detector in (self.short, self.full):
            if detector is None:
                continue
            faces = detector.detect(image)
            if faces:
                face = faces[_pick([f.box for f in faces], previous)]
                result = self.mesh_at(image, fm.roi_from_detection(face.box, face.keypoints))
                if result is not None:
                    self._tile_wait = 0
                    return result
        if self._tile_wait > 0:
            self._tile_wait -= 1
            return None
        result = self._find_in_tiles(image)
        self._tile_wait = 0 if result is not None else self.TILE_COOLDOWN
        return result

    def _find_in_tiles(self, image: np.ndarray) -> FaceResult | None:
        """Faces under ~12% of the frame height are too small for BlazeFace on the whole (letterboxed
        128 px) frame; on tiles a third of that size they are found down to ~40 px."""
        h, w = image.shape[:2]
        side = int(max(self.TILE, 0.45 * min(h, w)))
        if side >= max(h, w):
            return None
        boxes, keypoints, scores = [], [], []
        for y in _tile_starts(h, side):
            for x in _tile_starts(w, side):
                for face in self.short.detect(image[y:y + side, x:x + side]):
                    boxes.append([*face.box, x, y, x, y])
                    keypoints.append([*face.keypoints, x, y])
                    scores.append(face.score)
        if not boxes:
            return None
        merged = weighted_nms(np.array(boxes), np.array(keypoints), np.array(scores, np.float32))
        merged.sort(key=lambda m: -(m[0][2] - m[0][0]) * (m[0][3] - m[0][1]))
        for box, kps, _score in merged:
            result = self.mesh_at(image, fm.roi_from_detection(box, kps))
            if result is not None:
                return result
        return None

    def detect(self, image: np.ndarray, previous: FaceResult | None = None) -> FaceResult | None:
        if previous is not None and previous.landmarks is not None:
            roi = fm.roi_from_landmarks(previous.landmarks)
            landmarks, score = self.mesh.run(image, roi)
            if score >= fm.PRESENCE_THRESHOLD:
                # The mesh's answer shifts a little with where the face sits in its crop: when the head
                # moved, run it again on a crop centred on where the face is now (a fixed point).
                again = fm.roi_from_landmarks(landmarks)
                moved = math.hypot(again.cx - roi.cx, again.cy - roi.cy) + abs(again.size - roi.size)
                if moved > self.REFINE_MOVE * roi.size:
                    landmarks2, score2 = self.mesh.run(image, again)
                    if score2 >= fm.PRESENCE_THRESHOLD:
                        landmarks, score = landmarks2, score2
                return FaceResult(box_from_landmarks(landmarks), score, landmarks)
        return self.find(image, previous)


class HaarDetector:
    """OpenCV's frontal-face cascade. Its boxes sit higher than S3FD's (hairline to above the chin):
    shifted down by a fixed fraction measured against the mesh box on frontal faces."""
    name = "haar"
    gives_landmarks = False
    SHIFT_DOWN = 0.11
    WORK_HEIGHT = 480  # detect on a downscaled copy: the cascade's cost grows with the pixel count

    def __init__(self) -> None:
        # cv2.data exists at runtime (opencv-python ships the cascades) but opencv's stubs omit it.
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"  # type: ignore[attr-defined]
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise DetectorError(f"OpenCV's face cascade {path} is missing: reinstall opencv-python-headless 4.x")

    def detect(self, image: np.ndarray, previous: FaceResult | None = None) -> FaceResult | None:
        if previous is not None:
            # Tracking: search a window around the last face at nearby sizes only (~10x faster).
            found = self._near(image, previous.box)
            if found is not None:
                return found
        return self._search(image, 0, 0, previous, None)

    def _near(self, image: np.ndarray, box: np.ndarray) -> FaceResult | None:
        h, w = image.shape[:2]
        size = float(box[3] - box[1])
        x0, y0 = int(max(0, box[0] - size)), int(max(0, box[1] - size))
        x1, y1 = int(min(w, box[2] + size)), int(min(h, box[3] + size))
        return self._search(image[y0:y1, x0:x1], x0, y0, None, size)

    def _search(self, image: np.ndarray, ox: int, oy: int, previous: FaceResult | None,
                expected: float | None) -> FaceResult | None:
        scale = min(1.0, self.WORK_HEIGHT / image.shape[0])
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))
        lo, hi = (24, 24), (0, 0)  # (0, 0): no upper limit
        if expected is not None:  # the previous face's size, in the work image's pixels
            side = expected * scale
            lo, hi = (int(side * 0.7),) * 2, (int(side * 1.5) + 1,) * 2
        found, _, levels = self.cascade.detectMultiScale3(gray, scaleFactor=1.1, minNeighbors=5, minSize=lo,
                                                           maxSize=hi, outputRejectLevels=True)
        if len(found) == 0:
            return None
        # The largest hit is often a false positive on clothing; the cascade's confidence is not.
        weights = np.asarray(levels, np.float64).reshape(-1)
        best = float(weights.max())
        order = [i for i in np.argsort(-weights) if weights[i] >= best - 0.5 * abs(best)]
        boxes = [np.array([found[i][0], found[i][1], found[i][0] + found[i][2], found[i][1] + found[i][3]],
                          np.float32) / scale + [ox, oy, ox, oy] for i in order]
        box = boxes[_pick(boxes, previous)].astype(np.float32)
        box[[1, 3]] += self.SHIFT_DOWN * (box[3] - box[1])
        return FaceResult(box, 1.0, None)


class S3fdDetector:
    """The official detector's boxes; lips from the face mesh when its model files are installed."""
    name = "s3fd"

    def __init__(self, weights: str | Path, device: str = "cpu") -> None:
        from models.face_detection.s3fd import S3FD  # torch loads only for this detector

        try:
            self.s3fd = S3FD(weights, device)
        except ValueError as exc:
            raise DetectorError(str(exc)) from None
        self.mesh = MeshDetector() if mesh_models_available() else None
        self.gives_landmarks = self.mesh is not None

    def detect(self, image: np.ndarray, previous: FaceResult | None = None) -> FaceResult | None:
        dets = self.s3fd.detect(image)
        if len(dets) == 0:
            return None
        det = dets[_pick([d[:4] for d in dets], previous)]
        result = FaceResult(det[:4].astype(np.float32), float(det[4]), None)
        if self.mesh is not None:
            x1, y1, x2, y2 = det[:4]
            roi = fm.Roi((x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * fm.ROI_SCALE, 0.0)
            meshed = self.mesh.mesh_at(image, roi)
            if meshed is not None:
                result.landmarks = meshed.landmarks
        return result


def create_detector(kind: str = "auto", s3fd_weights: str | Path | None = None,
                    device: str = "cpu") -> FaceDetector:
    """`auto`: the mesh detector when its model files are installed, else the Haar cascade (warned)."""
    if kind not in DETECTORS:
        raise DetectorError(f"unknown detector {kind!r}: choose one of {', '.join(DETECTORS)}")
    if kind == "s3fd":
        if s3fd_weights is None:
            raise DetectorError("the s3fd detector needs the official weights: pass --s3fd-weights s3fd.pth")
        return S3fdDetector(s3fd_weights, device)
    if kind == "mesh" or (kind == "auto" and mesh_models_available()):
        return MeshDetector()
    if kind == "auto":
        log.warning("face mesh models not found, using OpenCV's Haar cascade (no lip landmarks): %s",
                    INSTALL_HINT)
    return HaarDetector()

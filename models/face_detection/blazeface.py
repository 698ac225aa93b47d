"""BlazeFace (MediaPipe's face detector) run through OpenCV's TFLite importer; pre/post-processing ours.

The network regresses, for each of a fixed grid of anchors, a box and 6 keypoints (right eye, left eye,
nose tip, mouth centre, right ear, left ear, subject's sides) relative to the anchor, plus a logit.
OpenCV's `cv2.dnn.readNetFromTFLite` runs the file bit-for-bit close to LiteRT (max abs diff ~1e-4 on the
outputs), so no TFLite runtime is needed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlazeFaceSpec:
    input_size: int
    # (stride, anchors per grid cell): MediaPipe merges its SSD layers that share a stride.
    layers: tuple[tuple[int, int], ...]
    min_score: float


# MediaPipe's SSD anchor options for the two models (fixed_anchor_size, offset 0.5).
SHORT_RANGE_SPEC = BlazeFaceSpec(128, ((8, 2), (16, 6)), 0.5)
FULL_RANGE_SPEC = BlazeFaceSpec(192, ((4, 1),), 0.6)


@dataclass
class FaceBox:
    box: np.ndarray        # (4,) float32 x1, y1, x2, y2 in image pixels
    keypoints: np.ndarray  # (6, 2) float32 x, y in image pixels
    score: float


def make_anchors(spec: BlazeFaceSpec) -> np.ndarray:
    """(A, 2) anchor centres in [0, 1], in the order the model emits them (row, column, anchor)."""
    parts = []
    for stride, per_cell in spec.layers:
        n = spec.input_size // stride
        ys, xs = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        parts.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(parts).astype(np.float32)


def letterbox(image_bgr: np.ndarray, size: int) -> tuple[np.ndarray, float, float, float]:
    """Fit the image into a size x size square (aspect kept, zero border) as the model expects.

    Returns the RGB float input in [-1, 1] (1, 3, size, size) and (scale, pad_x, pad_y) to map back:
    image = (square_pixel - pad) / scale.
    """
    h, w = image_bgr.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    # INTER_AREA: large frames shrink to 128 px; linear would alias and cost detections.
    small = cv2.resize(image_bgr, (nw, nh), interpolation=cv2.INTER_AREA)
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    square = np.zeros((size, size, 3), np.uint8)
    square[pad_y:pad_y + nh, pad_x:pad_x + nw] = small
    blob = cv2.dnn.blobFromImage(square, scalefactor=1 / 127.5, mean=(127.5, 127.5, 127.5), swapRB=True)
    return blob, scale, float(pad_x), float(pad_y)


def decode(raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray,
           spec: BlazeFaceSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model outputs -> (boxes (K, 4) x1y1x2y2, keypoints (K, 6, 2), scores (K,)) in [0, 1] square units."""
    logits = np.clip(raw_scores.reshape(-1).astype(np.float64), -100, 100)
    scores = 1.0 / (1.0 + np.exp(-logits))
    keep = scores >= spec.min_score
    if not keep.any():
        return np.zeros((0, 4), np.float32), np.zeros((0, 6, 2), np.float32), np.zeros(0, np.float32)
    reg = raw_boxes.reshape(len(anchors), -1)[keep] / spec.input_size
    anc = anchors[keep]
    cx, cy = reg[:, 0] + anc[:, 0], reg[:, 1] + anc[:, 1]
    w, h = reg[:, 2], reg[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keypoints = reg[:, 4:16].reshape(-1, 6, 2) + anc[:, None, :]
    return boxes.astype(np.float32), keypoints.astype(np.float32), scores[keep].astype(np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix1, iy1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    ix2, iy2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                 iou: float = 0.3) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe-style blending NMS: overlapping anchors are averaged (score-weighted), which is far
    steadier frame to frame than keeping a single winning anchor."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    out = []
    remaining = np.arange(len(scores))
    while len(remaining):
        overlap = _iou(boxes[remaining[0]], boxes[remaining]) > iou
        group = remaining[overlap]
        weights = scores[group][:, None]
        box = (boxes[group] * weights).sum(0) / weights.sum()
        kps = (keypoints[group] * weights[:, :, None]).sum(0) / weights.sum()
        out.append((box, kps, float(scores[group[0]])))
        remaining = remaining[~overlap]
    return out


class BlazeFace:
    """`detect(frame_bgr)` -> faces (largest first) in image pixels."""

    def __init__(self, model_path: Path, spec: BlazeFaceSpec) -> None:
        self.spec = spec
        self.net = cv2.dnn.readNetFromTFLite(str(model_path))
        self.anchors = make_anchors(spec)
        names = self.net.getUnconnectedOutLayersNames()
        # Output order differs between model files: pick by shape (16 regressors vs 1 logit).
        self._names = list(names)

    def _run(self, blob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.net.setInput(blob)
        outs = self.net.forward(self._names)
        raw_boxes = next(o for o in outs if o.size == len(self.anchors) * 16)
        raw_scores = next(o for o in outs if o.size == len(self.anchors))
        return raw_boxes, raw_scores

    def detect(self, image_bgr: np.ndarray) -> list[FaceBox]:
        blob, scale, pad_x, pad_y = letterbox(image_bgr, self.spec.input_size)
        boxes, kps, scores = decode(*self._run(blob), self.anchors, self.spec)
        size = self.spec.input_size
        faces = []
        for box, k, score in weighted_nms(boxes, kps, scores):
            box_px = (box * size - [pad_x, pad_y, pad_x, pad_y]) / scale
            k_px = (k * size - [pad_x, pad_y]) / scale
            faces.append(FaceBox(box_px.astype(np.float32), k_px.astype(np.float32), score))
        faces.sort(key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        return faces

"""Build the embedded default avatar (realtime/assets/default_avatar.mp4 + default_avatar.npz).

Source portrait: NASA astronaut Eileen Collins, "astronaut.png" as shipped inside the scikit-image wheel
(skimage/data/astronaut.png, 512x512; NASA Great Images database, public domain -- "no known copyright
restrictions"). scikit-image is needed only here, never at run time:

    .venv/bin/pip install scikit-image && .venv/bin/python scripts/make_default_avatar.py

Steps: close the smile's open lips (the mouth must be at rest for lip-sync), paint in two eye blinks,
add a slow head sway and breathing (realtime.avatars.still_animation.animate_still: seamless ping-pong and forward),
encode H.264, then decode that file and run the face pipeline on the decoded frames, so the shipped
boxes / mouth points / masks match exactly what `load_default_avatar()` will decode.
"""
from __future__ import annotations

import argparse
import logging
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.face_detection import create_detector
from models.face_detection import face_mesh as fm
from realtime.avatars.avatar import AvatarConfig
from realtime.avatars.default_avatar import DEFAULT_AVATAR, DEFAULT_AVATAR_TRACK, decode_default_frames
from realtime.avatars.face_masks import lower_face_masks
from realtime.avatars.face_tracking import finish_track, track_faces
from realtime.avatars.still_animation import animate_still

log = logging.getLogger("make_default_avatar")

FPS = 25
SECONDS = 8.0
BLINKS = (40, 130)  # first frame of each blink (ping-pong plays each twice per cycle, mirrored)
BLINK_SHAPE = (0.35, 0.8, 1.0, 1.0, 0.75, 0.4, 0.15)  # lid closure per frame of a ~0.3 s blink

RIGHT_EYE_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)  # subject's right = image left
RIGHT_EYE_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
LEFT_EYE_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
LEFT_EYE_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)


def load_portrait() -> np.ndarray:
    try:
        from skimage import data
    except ImportError:
        sys.exit("scikit-image is needed to build the default avatar: .venv/bin/pip install scikit-image")
    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])  # RGB -> BGR


def _contour_profile(points: np.ndarray, xs: np.ndarray) -> np.ndarray:
    order = np.argsort(points[:, 0])
    return np.interp(xs, points[order, 0], points[order, 1])


def _vertical_warp(image: np.ndarray, x_range: tuple[int, int], map_rows) -> np.ndarray:
    """Remap columns x_range with per-column source rows: map_rows(x) -> source y for every output y."""
    h, w = image.shape[:2]
    map_x, map_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    for x in range(max(0, x_range[0]), min(w, x_range[1] + 1)):
        map_y[:, x] = map_rows(x, map_y[:, x])
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def close_mouth(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Pull the upper lip down and the lower lip up until they meet, hiding the teeth."""
    upper = landmarks[list(fm.UPPER_INNER)]
    lower = landmarks[list(fm.LOWER_INNER)]
    x0, x1 = int(np.floor(upper[:, 0].min())), int(np.ceil(upper[:, 0].max()))
    reach = 0.6 * float(np.linalg.norm(landmarks[fm.MOUTH[1]] - landmarks[fm.MOUTH[0]]))  # rows affected

    def rows(x: int, y: np.ndarray) -> np.ndarray:
        u = float(_contour_profile(upper, np.array([x]))[0]) - 1.0  # teeth edges are soft: 1 px margin
        lo = float(_contour_profile(lower, np.array([x]))[0]) + 1.0
        if lo <= u:
            return y
        # Fade the closure out over the last few pixels towards the corners: no crease at the ends.
        fade = min(1.0, (x - x0) / 4.0, (x1 - x) / 4.0)
        m = (u + lo) / 2
        u_t, lo_t = m - (m - u) * fade, m + (lo - m) * fade  # source rows that land on the seam
        r = reach / 3
        src = y.copy()
        top = (y >= u - r) & (y < m)
        src[top] = (u - r) + (y[top] - (u - r)) * (u_t - (u - r)) / (m - (u - r))
        bottom = (y >= m) & (y <= lo + r)
        src[bottom] = lo_t + (y[bottom] - m) * ((lo + r) - lo_t) / ((lo + r) - m)
        return src

    closed = _vertical_warp(image, (x0, x1), rows)
    # A faint shadow where the lips meet, as on a real closed mouth.
    seam = np.zeros(image.shape[:2], np.float32)
    mid = (upper + lower) / 2
    cv2.polylines(seam, [np.round(mid[np.argsort(mid[:, 0])] * 4).astype(np.int32)], False, 1.0, 1,
                  cv2.LINE_AA, shift=2)
    seam = cv2.GaussianBlur(seam, (0, 0), 0.8)
    seam = 1.0 - 0.25 * seam / max(seam.max(), 1e-6)
    return np.clip(closed * seam[:, :, None], 0, 255).astype(np.uint8)


def blink(image: np.ndarray, landmarks: np.ndarray, amount: float) -> np.ndarray:
    """Lower both upper lids by `amount` of the eye opening (lid skin stretches down over the eye)."""
    if amount <= 0:
        return image
    out = image
    for upper_idx, lower_idx in ((RIGHT_EYE_UPPER, RIGHT_EYE_LOWER), (LEFT_EYE_UPPER, LEFT_EYE_LOWER)):
        upper, lower = landmarks[list(upper_idx)], landmarks[list(lower_idx)]
        x0, x1 = int(np.floor(upper[:, 0].min())) - 1, int(np.ceil(upper[:, 0].max())) + 1
        height = float((lower[:, 1].max() - upper[:, 1].min()))

        def rows(x: int, y: np.ndarray, upper=upper, lower=lower, x0=x0, x1=x1, height=height) -> np.ndarray:
            u = float(_contour_profile(upper, np.array([x]))[0])
            lo = float(_contour_profile(lower, np.array([x]))[0]) + 0.5
            fade = min(1.0, (x - x0) / 2.0, (x1 - x) / 2.0)
            drop = max(0.0, lo - u) * amount * max(fade, 0.0)
            reach = 1.5 * height
            src = y.copy()
            lid = (y >= u - reach) & (y <= u + drop)
            src[lid] = (u - reach) + (y[lid] - (u - reach)) * reach / (reach + drop)
            return src

        out = _vertical_warp(out, (x0, x1), rows)
    return out


def blink_amounts(n: int) -> np.ndarray:
    amounts = np.zeros(n)
    for start in BLINKS:
        for k, a in enumerate(BLINK_SHAPE):
            if start + k < n:
                amounts[start + k] = a
    return amounts


def encode(frames: np.ndarray, path: Path, crf: int, gop: int) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # One keyframe for the whole clip: a keyframe every second "pumps" visibly (a step several
        # times the idle motion's own frame-to-frame change), and nobody seeks in an avatar.
        stream.options = {"crf": str(crf), "preset": "veryslow", "g": str(gop), "tune": "film"}
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crf", type=int, default=14, help="x264 quality (lower = better, larger)")
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--gop", type=int, default=300, help="keyframe interval (default: one keyframe)")
    parser.add_argument("--preview", type=Path, help="also write a PNG contact sheet here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    portrait = load_portrait()
    detector = create_detector("mesh")
    face = detector.detect(portrait)
    if face is None:
        sys.exit("no face found in the portrait")
    rest = close_mouth(portrait, face.landmarks)
    face = detector.detect(rest, face)  # landmarks of the closed mouth for the blinks
    n = round(args.seconds * FPS)
    amounts = blink_amounts(n)
    frames = animate_still(rest, face.box, n, base=lambda i: blink(rest, face.landmarks, amounts[i]))
    encode(frames, DEFAULT_AVATAR, args.crf, args.gop)
    log.info("wrote %s (%.0f KB)", DEFAULT_AVATAR, DEFAULT_AVATAR.stat().st_size / 1024)

    # Track the frames exactly as load_default_avatar() will decode them.
    decoded = decode_default_frames()
    config = AvatarConfig()
    track = track_faces(decoded, detector, len(decoded))
    if not track.found.all():
        sys.exit(f"the face was lost on {int((~track.found).sum())} frames of the default avatar")
    result = finish_track(track, config, decoded.shape[2], decoded.shape[1], str(DEFAULT_AVATAR))
    masks = lower_face_masks(result.landmarks, result.boxes)
    np.savez_compressed(DEFAULT_AVATAR_TRACK, boxes=result.boxes, mouth=result.mouth, masks=masks,
                        fps=np.float64(FPS))
    log.info("wrote %s (%.0f KB): %d frames, box %s", DEFAULT_AVATAR_TRACK,
             DEFAULT_AVATAR_TRACK.stat().st_size / 1024, len(decoded), result.boxes[0].tolist())
    if args.preview:
        picks = [*np.linspace(0, len(decoded) - 1, 6).astype(int).tolist(), BLINKS[0] + 2]
        sheet = np.concatenate([decoded[i] for i in picks], axis=1)
        cv2.imwrite(str(args.preview), sheet)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline lip-sync: a face video (or photo) + a speech file -> a synced mp4, as the official tool does.

The pipeline follows the official inference exactly (mel windows per frame, crop, 96x96 input with the
lower half masked, batched generator, uint8 truncation, linear resize, hard paste) so that its output
can be compared with the official tool's; `paste="feather"` swaps in the streaming engine's seamless
blend. Decoding and encoding stay inside PyAV (no temporary AVI, no ffmpeg executable).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch

from models.wav2lip import Wav2Lip, faces_to_input, mels_to_input, to_model, to_uint8
from realtime.audio.mel import MelAlignment, mel_windows, melspectrogram
from realtime.config import SAMPLE_RATE
from realtime.media_io import MediaError, Mp4Writer, iter_video_frames, load_audio, probe_video
from realtime.renderers.base import int_box

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2)


@dataclass
class RenderOptions:
    box: Box | None = None           # fixed face box; None = detect on every frame
    pads: Box = (0, 10, 0, 0)        # top, bottom, left, right (official default)
    smooth: bool = True              # official 5-box temporal smoothing of detections
    fps: float = 25.0                # for a still image
    batch_size: int = 32
    max_height: int | None = None    # downscale taller inputs (None: keep, like the official tool)
    paste: str = "official"          # "official" hard paste, or "feather"
    output_audio_rate: int = 48000
    mel_alignment: MelAlignment = MelAlignment.OFFICIAL  # official inference, or one frame earlier (training)


def _read_frames(face: Path, needed: int, max_height: int | None) -> list[np.ndarray]:
    """The first `needed` frames (a video shorter than the audio is looped by index later)."""
    frames: list[np.ndarray] = []
    for frame in iter_video_frames(face, max_height=max_height):
        frames.append(frame)
        if len(frames) >= needed:
            break
    if not frames:
        raise MediaError(f"{face}: the video holds no frames")
    return frames


def _fixed_box(box: Box, shape: tuple[int, ...], face: Path) -> Box:
    y1, y2, x1, x2 = (int(v) for v in box)
    h, w = shape[:2]
    y1, x1 = max(0, y1), max(0, x1)
    y2 = h if y2 == -1 else min(h, y2)
    x2 = w if x2 == -1 else min(w, x2)
    if y2 - y1 < 8 or x2 - x1 < 8:
        raise MediaError(f"{face}: --box {box} leaves no usable face area in a {w}x{h} frame")
    return y1, y2, x1, x2


def _face_boxes(frames: list[np.ndarray], options: RenderOptions, face: Path) -> np.ndarray:
    if options.box is not None:
        return np.array([_fixed_box(options.box, frames[0].shape, face)] * len(frames), dtype=np.int32)
    from realtime.avatars.avatar import AvatarConfig
    from realtime.avatars.face_tracking import detect_face_boxes  # detector loads only when needed

    config = AvatarConfig(pads=options.pads, smooth=options.smooth)
    boxes, _mouth = detect_face_boxes(frames, config, source=str(face))
    return np.asarray(boxes, dtype=np.int32)


def predict_mouths(model: Wav2Lip, crops: np.ndarray, mels: np.ndarray) -> np.ndarray:
    """Generator on (B, 96, 96, 3) BGR crops and (B, 80, 16) windows -> (B, 96, 96, 3) uint8, official cast."""
    with torch.inference_mode():
        pred = model(to_model(mels_to_input(mels), model), to_model(faces_to_input(crops), model))
    return to_uint8(pred)


def paste_official(frame: np.ndarray, mouth: np.ndarray, box: Box) -> None:
    y1, y2, x1, x2 = box
    frame[y1:y2, x1:x2] = cv2.resize(mouth, (x2 - x1, y2 - y1))


def render_video(face: str | Path, audio: str | Path, model: Wav2Lip, output: str | Path,
                 options: RenderOptions | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Render `output` (H.264 + AAC mp4). Returns a summary (frames, fps, size, seconds)."""
    options = options or RenderOptions()
    face, audio, output = Path(face), Path(audio), Path(output)
    info = probe_video(face)
    fps = options.fps if info.is_image else info.fps
    wav = load_audio(audio, SAMPLE_RATE)
    windows = mel_windows(melspectrogram(wav), fps, options.mel_alignment)
    n_out = len(windows)
    frames = _read_frames(face, n_out, options.max_height)
    boxes = _face_boxes(frames, options, face)
    log.info("%s: %d frames at %.3f fps from %d source frames, %.2f s of audio",
             output.name, n_out, fps, len(frames), len(wav) / SAMPLE_RATE)
    height, width = frames[0].shape[:2]
    compositor = _feather_paste() if options.paste == "feather" else None
    out_audio = load_audio(audio, options.output_audio_rate)
    with Mp4Writer(output, width, height, fps, audio=out_audio, audio_rate=options.output_audio_rate) as writer:
        for start in range(0, n_out, options.batch_size):
            idx = [i % len(frames) for i in range(start, min(n_out, start + options.batch_size))]
            crops = np.stack([cv2.resize(_crop(frames[i], boxes[i]), (96, 96)) for i in idx])
            mouths = predict_mouths(model, crops, windows[start:start + len(idx)])
            for i, mouth in zip(idx, mouths, strict=True):
                frame = frames[i].copy()
                box = int_box(boxes[i])
                if compositor is None:
                    paste_official(frame, mouth, box)
                else:
                    frame = compositor(frame, mouth, box)
                writer.write(frame)
            if progress:
                progress(min(n_out, start + len(idx)), n_out)
    return {"frames": n_out, "fps": fps, "width": width - width % 2, "height": height - height % 2,
            "seconds": n_out / fps}


def _crop(frame: np.ndarray, box: Sequence[int]) -> np.ndarray:
    y1, y2, x1, x2 = (int(v) for v in box)
    return frame[y1:y2, x1:x2]


def _feather_paste() -> Callable[[np.ndarray, np.ndarray, Box], np.ndarray]:
    from realtime.renderers.base import MouthPatch
    from realtime.renderers.compositor import paste

    def blend(frame: np.ndarray, mouth: np.ndarray, box: Box) -> np.ndarray:
        return paste(frame, MouthPatch(image=mouth, box=box), mode="feather")

    return blend

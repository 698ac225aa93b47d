"""Preparing an avatar from a video, a photo or a prepared folder, with the on-disk cache.

A file is decoded (avatar_decode.py), its face tracked (face_tracking.py), a photo animated first
(still_animation.py), lower-face masks built (face_masks.py); the result is cached by content hash and
parameters (avatar_cache.py: raw .npy, memory-mapped, so a second start takes milliseconds).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from realtime.avatars import avatar_cache
from realtime.avatars.avatar import (
    CROP_SIZE,
    LOOP_MODES,
    MOUTH_POINTS,
    Avatar,
    AvatarConfig,
    AvatarError,
    Progress,
)
from realtime.avatars.avatar_decode import check_file, iter_video, native_height, read_still, stack_frames
from realtime.avatars.encoded_frames import EncodedFrames
from realtime.avatars.face_masks import lower_face_masks
from realtime.avatars.face_tracking import FaceTrack, avatar_detector, finish_track, track_faces
from realtime.avatars.still_animation import animate_still
from realtime.media_io import IMAGE_SUFFIXES

if TYPE_CHECKING:  # the detectors are imported when one is made
    from models.face_detection import FaceDetector

log = logging.getLogger(__name__)


def build_avatar(frames: np.ndarray, face: FaceTrack, fps: float, loop: str, source: str) -> Avatar:
    masks = None if face.landmarks is None else lower_face_masks(face.landmarks, face.boxes)
    avatar = Avatar(frames=frames, boxes=face.boxes, mouth=face.mouth, fps=fps, loop=loop,
                    source=source, masks=masks)
    return avatar


def prepare_fresh(path: Path, config: AvatarConfig, progress: Progress | None) -> Avatar:
    """Decode and track a video or photo (no cache)."""
    detector = avatar_detector(config)
    native: int | None
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image, native = read_still(path, config)
        return prepare_still(image, native, detector, config, str(path), progress)
    fps, expected, frames_iter = iter_video(path, config)
    native = native_height(path)
    kept: list[np.ndarray] = []
    track = track_faces(frames_iter, detector, expected, keep=kept, progress=progress)
    if not kept:
        raise AvatarError(f"{path}: the video stream holds zero frames; give a video with at least one frame")
    if len(kept) == 1:  # a one-frame video is a still
        return prepare_still(kept[0], native, detector, config, str(path), progress)
    h, w = kept[0].shape[:2]
    face = finish_track(track, config, w, h, str(path), native)
    return build_avatar(stack_frames(kept), face, fps, config.loop or "pingpong", path.name)


def prepare_still(image: np.ndarray, native: int | None, detector: FaceDetector, config: AvatarConfig, source: str,
                   progress: Progress | None) -> Avatar:
    h, w = image.shape[:2]
    first = track_faces([image], detector, 1)
    face = finish_track(first, config, w, h, source, native)  # raises for no face / too small
    name = Path(source).name
    n = max(1, round(config.still_seconds * config.fps))
    if n == 1:
        return build_avatar(image[None].copy(), face, config.fps, config.loop or "pingpong", name)
    frames = animate_still(image, first.boxes[0], n, progress=progress)
    track = track_faces(frames, detector, n)
    return build_avatar(frames, finish_track(track, config, w, h, source), config.fps, config.loop or "pingpong", name)


def avatar_from_arrays(arrays: dict[str, np.ndarray], header: dict[str, Any], loop: str) -> Avatar:
    frames: np.ndarray | EncodedFrames
    if "frames" in arrays:
        frames = arrays["frames"]
    else:
        shape = header["frame_shape"]
        frames = EncodedFrames(arrays["jpeg"], arrays["jpeg_offsets"], (shape[0], shape[1], shape[2]))
    avatar = Avatar(frames=frames, boxes=arrays["boxes"].astype(np.int32),
                    mouth=arrays.get("mouth"), fps=float(header["fps"]), loop=loop,
                    source=str(header.get("source", "")), masks=arrays.get("masks96"))
    if "crops96" in arrays:
        avatar._crops[CROP_SIZE] = arrays["crops96"]
    return avatar


def save_avatar(avatar: Avatar, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a prepared avatar folder (the format `prepare_avatar(folder)` loads)."""
    arrays: dict[str, np.ndarray | None] = {"boxes": avatar.boxes, "mouth": avatar.mouth,
                                            "crops96": avatar.face_crops(CROP_SIZE), "masks96": avatar.masks}
    if isinstance(avatar.frames, EncodedFrames):
        arrays.update(jpeg=avatar.frames.data, jpeg_offsets=avatar.frames.offsets)
        extra = {"frame_shape": list(avatar.frames.frame_shape), **(extra or {})}
    else:
        arrays["frames"] = avatar.frames
    meta = {"source": avatar.source, "fps": avatar.fps, "loop": avatar.loop,
            "size": list(avatar.size), "frames": len(avatar), "mouth_points": list(MOUTH_POINTS),
            **(extra or {})}
    return avatar_cache.save(directory, arrays, meta)


def load_prepared(directory: str | Path, loop: str | None = None) -> Avatar:
    """Load a folder written by `save_avatar` / `lipsync prepare-avatar`."""
    try:
        arrays, header = avatar_cache.load(directory)
    except avatar_cache.CacheFormatError as exc:
        raise AvatarError(f"{exc}; prepare it again with: lipsync prepare-avatar VIDEO -o {directory}") from None
    return avatar_from_arrays(arrays, header, loop or header.get("loop", "pingpong"))


def encoded_copy(folder: Path, avatar: Avatar, cache_dir: Path | None) -> Avatar:
    """A prepared folder of raw frames with its frames JPEG-encoded, cached (by the folder's header and
    frame file) so that the next start loads it in a fraction of a second instead of encoding again."""
    frames_file = folder / "frames.npy"
    stat = frames_file.stat()
    identity = {"header": avatar_cache.content_hash(folder / avatar_cache.HEADER), "frames_bytes": stat.st_size,
                "frames_mtime_ns": stat.st_mtime_ns, "encode_frames": True}
    entry = avatar_cache.entry_dir(avatar_cache.cache_root(cache_dir), folder,
                                   avatar_cache.cache_key(str(folder.resolve()), identity))
    if avatar_cache.is_prepared_dir(entry):
        try:
            arrays, header = avatar_cache.load(entry)
            return avatar_from_arrays(arrays, header, avatar.loop)
        except avatar_cache.CacheFormatError as exc:
            log.warning("ignoring a damaged cache entry (%s); encoding again", exc)
    encoded = avatar.with_encoded_frames()
    try:
        save_avatar(encoded, entry)
    except OSError as exc:
        log.warning("could not write the avatar cache %s (%s); continuing without it", entry, exc)
    return encoded


def prepare_avatar(path: str | Path, *, config: AvatarConfig | None = None, cache_dir: Path | None = None,
                   progress: Progress | None = None, use_cache: bool = True,
                   write_cache: bool = True) -> Avatar:
    """A video, a photo, or a prepared avatar folder -> Avatar (cached by content hash + parameters).

    `use_cache=False` neither reads nor writes the cache; `write_cache=False` only reads it (the
    prepare-avatar command writes its own folder and need not store the pixels twice)."""
    config = config or AvatarConfig()
    path = Path(path)
    if config.loop is not None and config.loop not in LOOP_MODES:
        raise AvatarError(f"{path}: loop must be one of {LOOP_MODES}, not {config.loop!r}")
    loop = config.loop or "pingpong"
    if path.is_dir():
        if not avatar_cache.is_prepared_dir(path):
            raise AvatarError(f"{path}: a folder that is not a prepared avatar; give a video, a photo, "
                              "or a folder written by lipsync prepare-avatar")
        avatar = load_prepared(path, config.loop)
        if config.encode_frames and not isinstance(avatar.frames, EncodedFrames):
            return encoded_copy(path, avatar, cache_dir if use_cache else None)
        return avatar
    check_file(path)
    entry = None
    if use_cache:
        start = time.perf_counter()
        key = avatar_cache.cache_key(avatar_cache.content_hash(path), config.cache_params())
        entry = avatar_cache.entry_dir(avatar_cache.cache_root(cache_dir), path, key)
        if avatar_cache.is_prepared_dir(entry):
            try:
                arrays, header = avatar_cache.load(entry)
                log.info("%s: prepared avatar loaded from cache %s in %.3f s", path.name, entry,
                         time.perf_counter() - start)
                return avatar_from_arrays(arrays, header, loop)
            except avatar_cache.CacheFormatError as exc:
                log.warning("ignoring a damaged cache entry (%s); preparing again", exc)
    start = time.perf_counter()
    avatar = prepare_fresh(path, replace(config, loop=loop), progress)
    if config.encode_frames:
        avatar = avatar.with_encoded_frames()
    log.info("%s: prepared %d frames %dx%d at %.2f fps in %.1f s", path.name, len(avatar), *avatar.size,
             avatar.fps, time.perf_counter() - start)
    if entry is not None and write_cache:
        try:
            save_avatar(avatar, entry, {"params": config.cache_params()})
        except OSError as exc:  # a read-only home must not stop the server: it just re-prepares next time
            log.warning("could not write the avatar cache %s (%s); continuing without it", entry, exc)
    return avatar

"""An avatar's frames kept as JPEG in memory and decoded on use, instead of raw pixels.

Why: raw frames are what made avatars expensive (10 s of 720p is 250 x 2.76 MB = 690 MB), and a server
that hosts several avatars cannot keep that per avatar. At quality 95 a 720p frame is ~130 KB (~33 MB
for the same 10 s; 40-48 dB PSNR against the raw frame, finer than what the H.264/VP8 stream keeps) and
decodes in 3-7 ms on one core of the shared, loaded development machine (cv2.imdecode, measured
2026-11-30; bench/avatars.py), i.e. 8-17% of a core per 25 fps session. The crops, masks and
landmarks the renderers need are computed from the raw frames before they are encoded and cached
beside them, so encoding changes only the picture under the mouth patch, never the face track.

A small shared LRU of decoded frames lets a renderer and the session that shows the frame (a few ticks
later), or two sessions in step, decode a frame once.

`EncodedFrames` behaves like the read-only (N, H, W, 3) uint8 array the rest of the engine indexes:
`len`, `shape`, `dtype`, `frames[i]` (a read-only ndarray) and iteration.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import cv2
import numpy as np

JPEG_QUALITY = 95
DECODED_CACHE_FRAMES = 6  # ~17 MB at 720p; covers a renderer's look-ahead and sessions in step


class EncodedFrames:
    """N JPEG-encoded BGR frames of one size; `data` holds them back to back, `offsets` (N + 1) their
    bounds."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, shape: tuple[int, int, int],
                 cache_frames: int = DECODED_CACHE_FRAMES) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(data) \
                or np.any(np.diff(offsets) <= 0):
            raise ValueError("encoded frames: offsets do not match the data")
        self.data = np.asarray(data, dtype=np.uint8)
        self.offsets = offsets
        self.frame_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_frames = int(cache_frames)
        self._lock = threading.Lock()
        self._digest: str | None = None

    @classmethod
    def encode(cls, frames: Sequence[np.ndarray] | np.ndarray, quality: int = JPEG_QUALITY) -> EncodedFrames:
        """Encode BGR uint8 frames (all of one size)."""
        chunks: list[np.ndarray] = []
        shape: tuple[int, ...] | None = None
        for frame in frames:
            image = np.ascontiguousarray(frame)
            if shape is None:
                shape = image.shape
            elif image.shape != shape:
                raise ValueError(f"encoded frames: a frame of shape {image.shape}, the first is {shape}")
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
            if not ok:
                raise ValueError("encoded frames: JPEG encoding failed")
            chunks.append(buf.reshape(-1))
        if shape is None or len(shape) != 3:
            raise ValueError("encoded frames: no frames, or frames that are not (H, W, 3)")
        offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(c) for c in chunks])
        return cls(np.concatenate(chunks), offsets, (shape[0], shape[1], shape[2]))

    # -- pickling (the Ray render tier ships avatars to replicas) and identity -----------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"data": self.data, "offsets": self.offsets, "shape": self.frame_shape,
                "cache_frames": self._cache_frames}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["data"], state["offsets"], state["shape"], state["cache_frames"])  # type: ignore[misc]

    def __repr__(self) -> str:
        """Names the content (a hash of the JPEG bytes), so equal frames have equal reprs (render tier
        fingerprints use it)."""
        digest = self._digest
        if digest is None:
            digest = self._digest = hashlib.blake2b(self.data.tobytes(), digest_size=12).hexdigest()
        return f"EncodedFrames({len(self)} x {self.frame_shape}, jpeg {digest})"

    # -- the ndarray-like surface the engine uses ----------------------------------------------------
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self.frame_shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def nbytes(self) -> int:
        """Bytes held (the encoded data and offsets; decoded frames in the small cache come on top)."""
        return int(self.data.nbytes + self.offsets.nbytes)

    def __getitem__(self, index: int | np.integer) -> np.ndarray:
        if not isinstance(index, (int, np.integer)):
            raise TypeError("encoded frames are indexed one frame at a time")
        i = int(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"frame {index} out of range for {n} frames")
        with self._lock:
            cached = self._cache.get(i)
            if cached is not None:
                self._cache.move_to_end(i)
                return cached
        image = self._decode(i)
        with self._lock:
            self._cache[i] = image
            while len(self._cache) > self._cache_frames:
                self._cache.popitem(last=False)
        return image

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self._decode(i)  # a pass over every frame must not flush the shared cache

    def _decode(self, i: int) -> np.ndarray:
        raw = self.data[self.offsets[i]:self.offsets[i + 1]]
        image = cv2.imdecode(raw, cv2.IMREAD_COLOR)
        if image is None or image.shape != self.frame_shape:
            raise ValueError(f"encoded frames: frame {i} does not decode to {self.frame_shape}")
        image.flags.writeable = False  # shared by every session: nobody may paint into it
        return image

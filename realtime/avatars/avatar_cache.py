"""On-disk format of a prepared avatar: one folder, plain .npy arrays and a JSON header.

Why .npy and no compression: a second start must take well under a second, and a 10 s 720p clip is
~690 MB of pixels. Raw .npy opens with `mmap_mode="r"` in milliseconds: pages are read on first use
(one loop at 25 fps needs ~70 MB/s) and shared between processes through the page cache. Any
compressed form would cost seconds of decoding at every start and would not round-trip bit for bit.

The same folder serves as the cache entry (keyed by the input's content hash and the preparation
parameters, under `~/.cache/lipsync/avatars`) and as the output of `lipsync prepare-avatar -o DIR`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "lipsync-avatar"
# Bump when the arrays' meaning or the detection pipeline changes: old entries are then ignored
# (cache) or rejected with a "prepare again" message (a prepared folder).
FORMAT_VERSION = 1
HEADER = "avatar.json"
CACHE_ENV = "LIPSYNC_CACHE_DIR"
DEFAULT_CACHE = Path("~/.cache/lipsync/avatars")
# "frames" holds raw pixels; a library avatar holds "jpeg" (the frames' JPEG bytes back to back) and
# "jpeg_offsets" (N + 1 bounds) instead: see realtime/avatars/encoded_frames.py.
ARRAYS = ("frames", "jpeg", "jpeg_offsets", "boxes", "mouth", "crops96", "masks96")
PER_FRAME = ("frames", "boxes", "mouth", "crops96", "masks96")


class CacheFormatError(Exception):
    """A folder that is not a prepared avatar of this version."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: the argument, else $LIPSYNC_CACHE_DIR, else ~/.cache/lipsync/avatars."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return DEFAULT_CACHE.expanduser()


def content_hash(path: str | Path, chunk: int = 4 << 20) -> str:
    """BLAKE2b of the file's bytes (fast: ~1 GB/s), so a renamed copy hits and an edited file misses."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_key(file_hash: str, params: dict[str, Any]) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "input": file_hash, "params": params}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


def entry_dir(root: Path, source: str | Path, key: str) -> Path:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(source).stem)[:40] or "avatar"
    return root / f"{stem}-{key}"


def is_prepared_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / HEADER).is_file()


def save(directory: str | Path, arrays: dict[str, np.ndarray | None], meta: dict[str, Any]) -> Path:
    """Write atomically: a temporary sibling folder renamed into place, so a crash never leaves a
    half-written entry that a later start would trust."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a prepared avatar is an ordinary folder
        for name in ARRAYS:
            if arrays.get(name) is not None:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arrays[name]), allow_pickle=False)
        header = {"format": FORMAT, "version": FORMAT_VERSION, "created": time.time(), **meta,
                  "arrays": [n for n in ARRAYS if arrays.get(n) is not None]}
        (tmp / HEADER).write_text(json.dumps(header, indent=1, sort_keys=True))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load(directory: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, header). Frames come memory-mapped read-only; the small arrays are read in full."""
    directory = Path(directory)
    try:
        header = json.loads((directory / HEADER).read_text())
    except (OSError, ValueError) as exc:
        raise CacheFormatError(f"{directory}: no readable {HEADER} ({exc})") from None
    if header.get("format") != FORMAT:
        raise CacheFormatError(f"{directory}: not a prepared avatar folder")
    if header.get("version") != FORMAT_VERSION:
        raise CacheFormatError(f"{directory}: prepared with format version {header.get('version')}, "
                               f"this version reads {FORMAT_VERSION}")
    arrays: dict[str, np.ndarray] = {}
    try:
        for name in header.get("arrays", []):
            path = directory / f"{name}.npy"
            arrays[name] = (np.load(path, mmap_mode="r", allow_pickle=False) if name == "frames"
                            else np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise CacheFormatError(f"{directory}: damaged array file ({exc})") from None
    if "frames" in arrays:
        n = len(arrays["frames"])
    else:
        n = len(arrays.get("jpeg_offsets", ())) - 1
        if "jpeg" not in arrays or n < 1 or not isinstance(header.get("frame_shape"), list):
            raise CacheFormatError(f"{directory}: neither raw nor encoded frames (an incomplete copy?)")
    if n <= 0 or any(len(a) != n for name, a in arrays.items() if name in PER_FRAME):
        raise CacheFormatError(f"{directory}: arrays of different lengths (an incomplete copy?)")
    return arrays, header

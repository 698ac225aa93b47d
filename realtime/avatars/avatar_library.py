"""AvatarLibrary: many avatars by id, prepared off the caller's thread, used and removed safely.

A server holds the embedded default avatar plus any number of others: a folder of prepared avatars,
videos and photos read at start (`add_folder`, progress in the log), and files added while it runs
(`add_file`, prepared on one background thread: the caller gets the id at once and polls `get(id)`).

Lifecycle of an entry: PREPARING (progress 0..1) -> READY, or -> FAILED with the error's message (e.g.
"no face found in any of its 30 frame(s) ..."). A failed entry stays listed (so its uploader can read
why) for FAILED_KEEP_S, and at most MAX_FAILED of them are kept, the oldest dropped first: uploads
that keep failing do not grow the library. Sessions take a ready avatar with `acquire(id)` and give
it back with `release(id)`; `remove(id)` refuses while any session holds it (AvatarInUse), so a running
session is never disturbed. Removing drops the library's reference; the renderers' per-avatar data goes
with it (`on_removed`).

Uploads that outlive a restart: with `uploads_dir`, an added file (an upload) is kept there under its
avatar's id with a small manifest, beside the prepared-avatar cache; `restore_uploads()` at start adds
them back with the same ids, re-prepared from that cache (a cache hit: no detection, no re-upload).
`remove` deletes them; an upload whose preparation failed is not kept.

Several libraries over one `uploads_dir` (the worker processes of `--workers N`, each with its own library):
an upload kept by one is taken in by the others with `adopt_upload(id)` (same id, from the kept file), and
the preparation of a kept file holds an exclusive lock on that file (`fcntl.flock`), so only the first library
detects the face and writes the cache: the others wait and load that cache. A removal that must hold in
every library is done in two steps: `reserve_removal(id)` in each (refused while a session uses it; new
sessions are then refused the avatar), then `remove(id)` in each, or `cancel_removal(id)` if any refused; a
reservation lapses after REMOVAL_HOLD_S, so a remover that vanished between the steps blocks nothing.

Memory: library avatars keep their frames JPEG-encoded (realtime/avatars/encoded_frames.py) plus what the
renderers need (boxes, lip landmarks, 96x96 crops and masks); bench/avatars.py measures the RSS per
added avatar and the load time of a cached one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import secrets
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from realtime.avatars import avatar_cache
from realtime.avatars.avatar import Avatar, AvatarConfig, AvatarError
from realtime.media_io import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

DEFAULT_ID = "default"
POSTER_WIDTH = 256
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi"})
MAX_FAILED = 8
FAILED_KEEP_S = 600.0
REMOVAL_HOLD_S = 10.0  # a removal reserved and neither done nor cancelled lapses after this long


class AvatarState(Enum):
    PREPARING = "preparing"
    READY = "ready"
    FAILED = "failed"


class UnknownAvatar(KeyError):
    """No avatar with this id."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else "unknown avatar"


class AvatarNotReady(Exception):
    """The avatar exists but is still being prepared, or its preparation failed."""


class AvatarInUse(Exception):
    """Sessions are using the avatar; it can be removed once they end."""


class LibraryBusy(Exception):
    """Too many avatars are waiting to be prepared; try again later."""


@dataclass
class AvatarEntry:
    id: str
    name: str
    source: str                          # the file or folder it came from (a file name for uploads)
    builtin: bool = False                # the embedded default: never removed
    state: AvatarState = AvatarState.PREPARING
    progress: float = 0.0                # 0..1 while preparing
    error: str | None = None
    avatar: Avatar | None = None
    poster: bytes | None = None          # a JPEG of one frame, POSTER_WIDTH wide
    added_at: float = field(default_factory=time.time)
    prepare_s: float | None = None
    users: int = 0                       # sessions holding it
    failed_at: float | None = None       # time.monotonic() when it failed
    removing_until: float | None = None  # time.monotonic() until which a reserved removal holds it

    def describe(self) -> dict[str, Any]:
        """What GET /avatars shows (no URLs: the HTTP layer adds them)."""
        out: dict[str, Any] = {"id": self.id, "name": self.name, "state": self.state.value, "builtin": self.builtin,
                     "sessions": self.users}
        if self.state is AvatarState.PREPARING:
            out["progress"] = round(self.progress, 3)
        if self.error is not None:
            out["error"] = self.error
        if self.avatar is not None:
            frames = self.avatar.frames
            height, width = frames[0].shape[:2]
            fps = float(self.avatar.fps)
            out.update(width=int(width), height=int(height), fps=fps, frames=len(frames),
                       seconds=round(len(frames) / fps, 2), loop=self.avatar.loop)
        if self.prepare_s is not None:
            out["prepare_s"] = round(self.prepare_s, 2)
        return out


def slug(text: str, limit: int = 40) -> str:
    """A URL-safe id part: lower-case letters, digits and '-'."""
    out = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return out or "avatar"


def poster_jpeg(avatar: Avatar, width: int = POSTER_WIDTH) -> bytes:
    """A small JPEG of the avatar's first frame (the page's picker shows it)."""
    frame = np.asarray(avatar.frames[0])
    h, w = frame.shape[:2]
    size = (width, max(2, round(h * width / w)))
    ok, buf = cv2.imencode(".jpg", cv2.resize(frame, size, interpolation=cv2.INTER_AREA),
                           [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise AvatarError("could not encode the poster image")
    return buf.tobytes()


def is_avatar_source(path: Path) -> bool:
    """A prepared avatar folder, a video or a photo (by name; the preparation says what is wrong)."""
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return avatar_cache.is_prepared_dir(path)
    return path.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES


class AvatarLibrary:
    """default: the avatar used when a session names none. prepare: per-avatar renderer work (the render
    workers' `prepare`), run on the preparing thread before an avatar is READY; its errors fail it.
    on_removed: called with a removed avatar (renderers drop their per-avatar data)."""

    def __init__(self, default: Avatar, *, default_id: str = DEFAULT_ID, default_name: str = "Default",
                 config: AvatarConfig | None = None, cache_dir: Path | None = None,
                 prepare: Callable[[Avatar], None] | None = None,
                 on_removed: Callable[[Avatar], None] | None = None, max_pending: int = 4,
                 uploads_dir: Path | None = None) -> None:
        self.config = replace(config or AvatarConfig(), encode_frames=True)
        self.cache_dir = cache_dir
        self.uploads_dir = uploads_dir
        self._prepare = prepare
        self._on_removed = on_removed
        self._max_pending = int(max_pending)
        self._lock = threading.Lock()
        self._entries: dict[str, AvatarEntry] = {}
        self._pending = 0
        self._executor: ThreadPoolExecutor | None = None
        entry = AvatarEntry(id=default_id, name=default_name, source=default.source,
                            builtin=True)
        self._finish(entry, default, 0.0)
        self._entries[default_id] = entry
        self.default_id = default_id

    # -- adding ----------------------------------------------------------------------------------
    def add_builtin(self, avatar: Avatar, avatar_id: str, name: str) -> AvatarEntry:
        """Another always-present avatar (e.g. the server's --avatar beside the embedded one)."""
        entry = AvatarEntry(id=self._free_id(avatar_id), name=name, source=avatar.source,
                            builtin=True)
        self._finish(entry, avatar, 0.0)
        with self._lock:
            self._entries[entry.id] = entry
        return entry

    def add_folder(self, folder: Path) -> list[AvatarEntry]:
        """Prepare every avatar source in `folder` now (one at a time, progress in the log). A file that
        fails is logged and listed as FAILED; it does not stop the others."""
        sources = sorted(p for p in Path(folder).iterdir() if is_avatar_source(p))
        log.info("avatars: %d source(s) in %s", len(sources), folder)
        added = []
        for k, path in enumerate(sources, 1):
            entry = self._new_entry(slug(path.stem), path.stem, str(path))
            log.info("avatars: [%d/%d] preparing %s as %r", k, len(sources), path.name, entry.id)
            self._run(entry, path, keep_file=True, log_progress=True)
            added.append(entry)
        return added

    def add_file(self, path: Path, name: str, *, keep_file: bool = False) -> AvatarEntry:
        """Start preparing `path` on the library's thread; returns the PREPARING entry at once.
        `keep_file=False`: the file is deleted when done (an upload's temporary copy)."""
        with self._lock:
            executor = self._take_preparation_slot()
        entry = self._new_entry(f"{slug(name)}-{secrets.token_hex(3)}", name, Path(name).name)
        if self.uploads_dir is not None and not keep_file:
            try:
                path = self._keep_upload(entry, path)
            except BaseException:
                with self._lock:
                    self._pending -= 1
                    del self._entries[entry.id]
                raise
            keep_file = True
        future: Future[None] = executor.submit(self._run, entry, path, keep_file, False)
        future.add_done_callback(lambda _f: self._done_pending())
        return entry

    # -- uploads kept across restarts ---------------------------------------------------------------
    def _manifest(self, avatar_id: str) -> Path:
        assert self.uploads_dir is not None
        return self.uploads_dir / f"{avatar_id}.json"

    def _keep_upload(self, entry: AvatarEntry, path: Path) -> Path:
        """Move an upload into uploads_dir under its id and write its manifest; returns the new path."""
        assert self.uploads_dir is not None
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        kept = self.uploads_dir / f"{entry.id}{path.suffix}"
        shutil.move(str(path), str(kept))  # from the temporary folder, maybe another file system
        manifest = {"id": entry.id, "name": entry.name, "file": kept.name, "added_at": entry.added_at}
        tmp = self._manifest(entry.id).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest))
        tmp.replace(self._manifest(entry.id))
        return kept

    def _forget_upload(self, avatar_id: str) -> None:
        if self.uploads_dir is None:
            return
        manifest = self._manifest(avatar_id)
        try:
            file = json.loads(manifest.read_text()).get("file", "")
        except (OSError, ValueError):
            return
        if file and "/" not in file:
            (self.uploads_dir / file).unlink(missing_ok=True)
        manifest.unlink(missing_ok=True)

    def restore_uploads(self) -> list[AvatarEntry]:
        """Add back, with their ids, the uploads kept by an earlier run (now, one at a time)."""
        if self.uploads_dir is None or not self.uploads_dir.is_dir():
            return []
        restored = []
        for manifest in sorted(self.uploads_dir.glob("*.json")):
            try:
                meta = json.loads(manifest.read_text())
                avatar_id, name, file = str(meta["id"]), str(meta["name"]), str(meta["file"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("avatars: skipping %s: %s", manifest.name, exc)
                continue
            path = self.uploads_dir / file
            if manifest.stem != avatar_id or "/" in file or not path.is_file():
                log.warning("avatars: skipping %s: its file is missing", manifest.name)
                continue
            with self._lock:
                if avatar_id in self._entries:
                    log.warning("avatars: kept upload %r clashes with another avatar; skipped", avatar_id)
                    continue
                entry = AvatarEntry(id=avatar_id, name=name, source=file, added_at=float(meta.get("added_at", 0)))
                self._entries[avatar_id] = entry
            self._run(entry, path, keep_file=True, log_progress=False)
            restored.append(entry)
        if restored:
            log.info("avatars: %d upload(s) restored from %s", len(restored), self.uploads_dir)
        return restored

    def adopt_upload(self, avatar_id: str) -> AvatarEntry:
        """Take in an upload another library (another worker process) kept in the shared `uploads_dir`:
        the same id, prepared on this library's thread from the kept file (after the first library's
        preparation, under its lock: a cache hit). UnknownAvatar when no such upload is kept; LibraryBusy
        as `add_file`. An id this library already has is returned as it is."""
        if self.uploads_dir is None:
            raise UnknownAvatar(f"unknown avatar {avatar_id!r}: this library keeps no uploads")
        try:
            meta = json.loads(self._manifest(avatar_id).read_text())
            name, file = str(meta["name"]), str(meta["file"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UnknownAvatar(f"unknown avatar {avatar_id!r}: no kept upload by that id") from None
        path = self.uploads_dir / file
        if "/" in file or not path.is_file():
            raise UnknownAvatar(f"unknown avatar {avatar_id!r}: its kept file is missing")
        with self._lock:
            known = self._entries.get(avatar_id)
            if known is not None:
                return known
            executor = self._take_preparation_slot()
            entry = AvatarEntry(id=avatar_id, name=name, source=file,
                                added_at=float(meta.get("added_at", time.time())))
            self._entries[avatar_id] = entry
        future: Future[None] = executor.submit(self._run, entry, path, True, False)
        future.add_done_callback(lambda _f: self._done_pending())
        return entry

    def adopt_kept_uploads(self) -> list[AvatarEntry]:
        """Take in every kept upload this library does not know yet: those another library kept after this
        one's `restore_uploads` (a worker process that was starting while an upload arrived elsewhere)."""
        if self.uploads_dir is None or not self.uploads_dir.is_dir():
            return []
        adopted = []
        for manifest in sorted(self.uploads_dir.glob("*.json")):
            with self._lock:
                known = manifest.stem in self._entries
            if known:
                continue
            try:
                adopted.append(self.adopt_upload(manifest.stem))
            except (UnknownAvatar, LibraryBusy) as exc:
                log.warning("avatars: kept upload %s not taken in: %s", manifest.stem, exc)
        return adopted

    def _take_preparation_slot(self) -> ThreadPoolExecutor:
        """One of the `max_pending` preparation slots (LibraryBusy when none is free) and the library's one
        preparation thread, started on first use. Called with `_lock` held; `_done_pending` gives it back."""
        if self._pending >= self._max_pending:
            raise LibraryBusy(f"{self._pending} avatars are already being prepared; try again later")
        self._pending += 1
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar-prepare")
        return self._executor

    def _done_pending(self) -> None:
        with self._lock:
            self._pending -= 1

    def _new_entry(self, wanted_id: str, name: str, source: str) -> AvatarEntry:
        with self._lock:
            entry = AvatarEntry(id=self._free_id(wanted_id), name=name, source=source)
            self._entries[entry.id] = entry
        return entry

    def _free_id(self, wanted: str) -> str:
        candidate, k = wanted, 2
        while candidate in self._entries:
            candidate, k = f"{wanted}-{k}", k + 1
        return candidate

    def _run(self, entry: AvatarEntry, path: Path, keep_file: bool, log_progress: bool) -> None:
        from realtime.avatars.avatar_prepare import prepare_avatar

        start = time.perf_counter()
        last_logged = [-1.0]

        def progress(done: int, total: int) -> None:
            entry.progress = min(0.95, 0.95 * done / max(total, 1))  # the renderer's prepare is the rest
            if log_progress and entry.progress - last_logged[0] >= 0.25:
                last_logged[0] = entry.progress
                log.info("avatars: %s %d%%", entry.id, round(100 * entry.progress))

        try:
            with self._kept_file_lock(path):
                if not path.is_file():  # another library's preparation of this upload failed and dropped it
                    raise AvatarError(f"the upload {entry.source} is gone: its preparation failed in "
                                      "another worker process")
                avatar = prepare_avatar(path, config=self.config, cache_dir=self.cache_dir, progress=progress)
            avatar = avatar.with_encoded_frames()  # a no-op unless it was a prepared folder of raw frames
            if self._prepare is not None:
                self._prepare(avatar)
            self._finish(entry, avatar, time.perf_counter() - start)
            log.info("avatars: %s ready (%d frames %dx%d, %.1f MB held, %.2f s)", entry.id, len(avatar),
                     *avatar.size, avatar.nbytes / 2**20, entry.prepare_s)
        except Exception as exc:  # the message is the answer of GET /avatars/{id}
            message = str(exc) if isinstance(exc, (AvatarError, ValueError)) else \
                f"preparing the avatar failed ({type(exc).__name__}: {exc})"
            entry.error = message.replace(str(path), entry.source)  # an upload's temporary name means nothing
            entry.failed_at = time.monotonic()
            entry.state = AvatarState.FAILED
            self._forget_failed()
            log.warning("avatars: %s failed: %s", entry.id, entry.error,
                        exc_info=not isinstance(exc, (AvatarError, ValueError)))
            self._forget_upload(entry.id)  # a failed upload is not kept for the next run
        finally:
            if not keep_file:
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _kept_file_lock(self, path: Path) -> Iterator[None]:
        """An exclusive lock on a kept upload's preparation, across processes (a no-op for other files):
        the first library to take it detects the face and writes the cache; the others then hit it."""
        if self.uploads_dir is None or path.parent != self.uploads_dir:
            yield
            return
        try:
            handle = open(path, "rb")  # the lock is on the kept file itself: no lock file to leave behind
        except FileNotFoundError:
            yield  # already gone: the preparation says so
            return
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _finish(self, entry: AvatarEntry, avatar: Avatar, seconds: float) -> None:
        entry.poster = poster_jpeg(avatar)
        entry.avatar = avatar
        entry.prepare_s = seconds
        entry.progress = 1.0
        entry.state = AvatarState.READY

    # -- using -----------------------------------------------------------------------------------
    def get(self, avatar_id: str) -> AvatarEntry:
        with self._lock:
            entry = self._entries.get(avatar_id)
        if entry is None:
            raise UnknownAvatar(f"unknown avatar {avatar_id!r}; GET /avatars lists them")
        return entry

    def entries(self) -> list[AvatarEntry]:
        self._forget_failed()
        with self._lock:
            return list(self._entries.values())

    def ready(self, avatar_id: str | None = None) -> tuple[AvatarEntry, Avatar]:
        """The entry and avatar a session would get now: UnknownAvatar, or AvatarNotReady while it is
        being prepared or after it failed (checked before any work for a session is done)."""
        with self._lock:
            return self._ready(avatar_id or self.default_id)

    def _ready(self, avatar_id: str) -> tuple[AvatarEntry, Avatar]:
        entry = self._entries.get(avatar_id)
        if entry is None:
            raise UnknownAvatar(f"unknown avatar {avatar_id!r}; GET /avatars lists them")
        if self._removal_held(entry):
            raise AvatarNotReady(f"avatar {avatar_id!r} is being removed")
        if entry.state is not AvatarState.READY or entry.avatar is None:
            detail = f": {entry.error}" if entry.error else f" ({round(100 * entry.progress)}% prepared)"
            raise AvatarNotReady(f"avatar {avatar_id!r} is {entry.state.value}{detail}")
        return entry, entry.avatar

    def _forget_failed(self, now: float | None = None) -> None:
        """Drop failed entries older than FAILED_KEEP_S, and the oldest beyond MAX_FAILED."""
        now = time.monotonic() if now is None else now
        with self._lock:
            failed = sorted((e for e in self._entries.values()
                             if e.state is AvatarState.FAILED and not e.builtin and not e.users),
                            key=lambda e: e.failed_at or 0.0)
            stale = [e for e in failed if now - (e.failed_at or 0.0) > FAILED_KEEP_S]
            extra = failed[:max(0, len(failed) - MAX_FAILED)]
            for entry in {e.id: e for e in stale + extra}.values():
                del self._entries[entry.id]
                log.info("avatars: forgot failed %s", entry.id)

    def acquire(self, avatar_id: str | None = None) -> tuple[str, Avatar]:
        """(id, avatar) for a new session, counted as in use until `release(id)`."""
        with self._lock:
            entry, avatar = self._ready(avatar_id or self.default_id)
            entry.users += 1
            return entry.id, avatar

    def release(self, avatar_id: str) -> None:
        with self._lock:
            entry = self._entries.get(avatar_id)
            if entry is not None and entry.users > 0:
                entry.users -= 1

    @staticmethod
    def _removal_held(entry: AvatarEntry) -> bool:
        return entry.removing_until is not None and time.monotonic() < entry.removing_until

    def _check_removable(self, avatar_id: str) -> AvatarEntry:
        """The entry `remove` may drop (call with the lock held): UnknownAvatar, AvatarInUse otherwise."""
        entry = self._entries.get(avatar_id)
        if entry is None:
            raise UnknownAvatar(f"unknown avatar {avatar_id!r}; GET /avatars lists them")
        if entry.builtin:
            raise AvatarInUse(f"avatar {avatar_id!r} is built in and cannot be removed")
        if entry.state is AvatarState.PREPARING:
            raise AvatarInUse(f"avatar {avatar_id!r} is still being prepared; remove it when it is done")
        if entry.users:
            raise AvatarInUse(f"avatar {avatar_id!r} is used by {entry.users} session(s); "
                              "remove it when they have ended")
        return entry

    def reserve_removal(self, avatar_id: str, hold_s: float = REMOVAL_HOLD_S) -> None:
        """The first step of a removal every library must agree to: refused as `remove` would be; once
        reserved, no new session gets the avatar until `remove`, `cancel_removal` or `hold_s` passes."""
        with self._lock:
            entry = self._check_removable(avatar_id)
            entry.removing_until = time.monotonic() + hold_s

    def cancel_removal(self, avatar_id: str) -> None:
        with self._lock:
            entry = self._entries.get(avatar_id)
            if entry is not None:
                entry.removing_until = None

    def remove(self, avatar_id: str) -> None:
        """Forget an avatar no session uses (AvatarInUse otherwise). A preparing one cannot be removed
        until it is ready or failed; the built-in ones never."""
        with self._lock:
            entry = self._check_removable(avatar_id)
            del self._entries[avatar_id]
        self._forget_upload(avatar_id)
        if entry.avatar is not None and self._on_removed is not None:
            self._on_removed(entry.avatar)
        log.info("avatars: %s removed", avatar_id)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

"""One render replica: a renderer, the avatars it has prepared, and its EDF batcher. No transport.

The Ray Serve deployment (server/ray_render_tier.py) wraps one of these per replica; tests use it
directly. Every renderer call (prepare included) runs on one thread of its own, so the replica's event
loop keeps taking requests from every front-end while a batch renders.

An avatar is prepared the first time a request names its key (`AvatarRef.key`): the replica fetches the
avatar's arrays through `fetch_avatar` (Ray: from the object store, whichever node holds them), rebuilds
it and runs `renderer.prepare` once. Requests for it wait for that; requests for other avatars do not.

Freeing: `sweep(live, as_of)` drops the prepared avatars whose key no front-end holds any more (the
registry of realtime/render_tier/holders.py says which are live; `run_sweeps` polls it) and runs the
renderer's `release` on them, on the render thread, between batches. An avatar used since `as_of` (the
moment the answer was asked for) is kept: the answer may predate the front-end that just shared it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from realtime.avatars.avatar import Avatar
from realtime.render_tier.edf_batcher import EdfBatcher
from realtime.render_tier.wire import AvatarRef, RenderReply, RenderRequest, avatar_from_wire
from realtime.renderers.base import MouthPatch, MouthRenderer

log = logging.getLogger(__name__)


@dataclass
class ReplicaStats:
    name: str
    renderer: str
    avatars: int
    batches: int
    frames: int
    late_frames: int
    errors: int
    mean_batch: float
    busy_s: float
    senders: int      # front-ends heard from in the last second
    avatar_keys: tuple[str, ...] = ()  # the prepared avatars' keys


class RenderReplica:
    def __init__(self, renderer: MouthRenderer, *, fetch_avatar: Callable[[Any], Any] = lambda payload: payload,
                 max_batch: int = 8, max_wait_s: float = 0.004, name: str = "replica",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.renderer = renderer
        self.name = name
        self.clock = clock
        self._fetch_avatar = fetch_avatar
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"render-{name}")
        self._avatars: dict[str, Any] = {}
        self._last_used: dict[str, float] = {}   # key -> clock() of the latest request naming it
        self._preparing: dict[str, asyncio.Future[Any]] = {}
        self.batcher = EdfBatcher(self._render_batch, max_batch=max_batch, max_wait_s=max_wait_s, clock=clock)

    async def render(self, request: RenderRequest) -> RenderReply:
        arrived = self.clock()
        avatar = await self._avatar(request.avatar)
        outcome = await self.batcher.submit(request.sender, request.avatar.key, avatar,
                                            np.asarray(request.frame_indices, dtype=np.int64),
                                            np.asarray(request.mels, dtype=np.float32),
                                            deadline=arrived + request.deadline_in_s)
        return RenderReply(outcome.patches, outcome.batch_size, outcome.queued_s, outcome.render_s, self.name)

    def stats(self) -> ReplicaStats:
        s = self.batcher.stats
        return ReplicaStats(self.name, self.renderer.label,
                            len(self._avatars), s.batches, s.frames, s.late_frames, s.errors, s.mean_batch,
                            s.busy_s, s.senders, tuple(self._avatars))

    def close(self) -> None:
        self.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def sweep(self, live: set[str], as_of: float) -> list[str]:
        """Drop (and `release`) the prepared avatars whose key is not in `live`, unless a request named
        them at or after `as_of`. Returns the keys dropped. Avatars still being prepared are left alone
        (the next sweep sees them)."""
        gone = [key for key in self._avatars
                if key not in live and self._last_used.get(key, float("-inf")) < as_of]
        avatars = [self._avatars.pop(key) for key in gone]
        for key in [k for k in self._last_used if k not in self._avatars and k not in self._preparing
                    and k not in live]:
            del self._last_used[key]   # also keys whose prepare failed
        if avatars:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._release, avatars)
            log.info("render replica %s freed %d avatar(s) no front-end holds: %s", self.name, len(gone),
                     ", ".join(k[:8] for k in gone))
        return gone

    async def run_sweeps(self, fetch_live: Callable[[], Awaitable[set[str] | None]], poll_s: float,
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Sweep every `poll_s` with what `fetch_live` answers. An answer of None (the registry does not
        know yet) or a failed call drops nothing: an unreachable registry must never free a live avatar."""
        failing = False
        while True:
            await sleep(poll_s)
            as_of = self.clock()
            try:
                live = await fetch_live()
            except Exception as exc:  # the registry is restarting or gone: keep everything
                if not failing:
                    log.warning("render replica %s cannot ask which avatars are live (%s): keeping all",
                                self.name, exc)
                failing = True
                continue
            failing = False
            if live is not None:
                await self.sweep(live, as_of)

    def _release(self, avatars: list[Any]) -> None:
        for avatar in avatars:
            self.renderer.release(avatar)

    async def _avatar(self, ref: AvatarRef) -> Any:
        self._last_used[ref.key] = self.clock()
        avatar = self._avatars.get(ref.key)
        if avatar is not None:
            return avatar
        pending = self._preparing.get(ref.key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(loop.run_in_executor(self._executor, self._prepare, ref))
            self._preparing[ref.key] = pending
        try:
            avatar = await asyncio.shield(pending)
        finally:
            if pending.done():
                self._preparing.pop(ref.key, None)
        self._avatars[ref.key] = avatar
        return avatar

    def _prepare(self, ref: AvatarRef) -> Any:
        t0 = time.monotonic()
        avatar = avatar_from_wire(self._fetch_avatar(ref.payload))
        self.renderer.prepare(avatar)
        log.info("render replica %s prepared avatar %s (%d frames) in %.2f s", self.name, ref.key[:8],
                 len(avatar.frames), time.monotonic() - t0)
        return avatar

    async def _render_batch(self, avatar: Avatar, indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
        loop = asyncio.get_running_loop()
        patches = await loop.run_in_executor(self._executor, self.renderer.render, avatar, indices, mels)
        done = [p for p in patches if p is not None]
        if len(done) != len(patches):  # a local renderer makes every patch or raises
            raise RuntimeError(f"renderer {self.renderer.label} returned no patch for a frame")
        return done

"""One render replica: a renderer, the avatars it has prepared, and its EDF batcher. No transport.

The Ray Serve deployment (server/ray_render_tier.py) wraps one of these per replica; tests use it
directly. Every renderer call (prepare included) runs on one thread of its own, so the replica's event
loop keeps taking requests from every front-end while a batch renders.

An avatar is prepared the first time a request names its key (`AvatarRef.key`): the replica fetches the
avatar's arrays through `fetch_avatar` (Ray: from the object store, whichever node holds them), rebuilds
it and runs `renderer.prepare` once. Requests for it wait for that; requests for other avatars do not.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

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
        self._preparing: dict[str, asyncio.Future] = {}
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
                            s.busy_s, s.senders)

    def close(self) -> None:
        self.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _avatar(self, ref: AvatarRef) -> Any:
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

    async def _render_batch(self, avatar: Any, indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
        loop = asyncio.get_running_loop()
        patches = await loop.run_in_executor(self._executor, self.renderer.render, avatar, indices, mels)
        done = [p for p in patches if p is not None]
        if len(done) != len(patches):  # a local renderer makes every patch or raises
            raise RuntimeError(f"renderer {self.renderer.label} returned no patch for a frame")
        return done

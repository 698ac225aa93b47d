"""The front-end side of the render tier: a `MouthRenderer` whose batches run on a shared replica.

The front-end keeps everything else: WebRTC, the session clocks, look-ahead, its own render worker
(realtime/scheduling/scheduler.py, which still orders its sessions' jobs by deadline and skips hopeless ones) and
compositing. Only the renderer call crosses: `render` sends the batch's mel windows and frame indices
with the time left until its deadline, and returns the replica's patches.

Failures never reach the session as an exception or a wait: a replica that is gone, restarting or too
slow answers nothing within the deadline (plus `timeout_margin_s`), and the batch comes back as `None`
patches, which the session shows as held (or resting) frames. One warning per outage, one info line
when rendering resumes.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from realtime.avatars.avatar import Avatar
from realtime.render_tier.wire import AvatarRef, RenderReply, RenderRequest
from realtime.renderers.base import OFFICIAL_WINDOW, AudioNeeds, MouthPatch, MouthRenderer, RendererTraits

log = logging.getLogger(__name__)


class RenderTierError(RuntimeError):
    """The render tier could not be reached, or did not answer in time."""


class RenderTierClient(Protocol):
    """A transport to the render tier (server/ray_render_tier.py implements it on Ray Serve)."""

    def share_avatar(self, avatar: Avatar) -> AvatarRef: ...  # once per avatar: make it fetchable by replicas

    def forget_avatar(self, ref: AvatarRef) -> None: ...  # this front-end no longer serves it (never raises)

    def render(self, request: RenderRequest, timeout_s: float) -> RenderReply: ...  # RenderTierError


@dataclass
class RemoteStats:
    requests: int = 0
    frames: int = 0
    failed_frames: int = 0     # no answer in time, or the tier was unreachable
    late_frames: int = 0       # the replica answered that it could not make them in time
    replica_frames: int = 0    # sum over answered frames of the replica batch they were rendered in
    outages: int = 0
    last_rendered_at: float | None = None   # time.monotonic() of the latest frames received
    last_outage: tuple[float, float] | None = None  # (began, ended) monotonic times of the latest outage

    @property
    def mean_replica_batch(self) -> float:
        answered = self.frames - self.failed_frames - self.late_frames
        return self.replica_frames / answered if answered > 0 else 0.0


class RemoteRenderer(MouthRenderer):
    """A MouthRenderer over a `RenderTierClient`. `wants_deadline`: the render worker passes the time
    left until the batch's deadline (realtime/scheduling/scheduler.py), which the replica orders batches by."""

    def __init__(self, client: RenderTierClient, *, sender: str, name: str = "remote", rows_from: int = 0,
                 audio_needs: AudioNeeds = OFFICIAL_WINDOW, timeout_margin_s: float = 0.25,
                 prepare_timeout_s: float = 300.0, default_deadline_s: float = 0.2,
                 min_deadline_s: float = 0.0) -> None:
        self.client = client
        # audio_needs and rows_from are the replica renderer's: the session's look-ahead (and so its delay)
        # is sized from the first; RealtimeEngine checks the second for official pastes.
        self.traits = RendererTraits(wants_deadline=True, audio_needs=audio_needs, rows_from=rows_from)
        self.sender = sender
        self.name = name
        self.timeout_margin_s = timeout_margin_s
        self.prepare_timeout_s = prepare_timeout_s
        self.default_deadline_s = default_deadline_s
        # The least time a replica is given for a batch. 0 in production; a front-end on a simulated clock
        # (tests) raises it, since the replica measures real time.
        self.min_deadline_s = min_deadline_s
        self.stats = RemoteStats()
        self._refs: dict[int, tuple[Any, AvatarRef]] = {}  # id(avatar) -> (avatar kept alive, its ref)
        self._lock = threading.Lock()
        self._down_since: float | None = None

    def prepare(self, avatar: Avatar) -> None:
        """Share the avatar with the tier and have a replica prepare it now (a one-frame render), so the
        first live frame is not the slow one. RenderTierError when the tier cannot do it."""
        with self._lock:
            if id(avatar) not in self._refs:
                self._refs[id(avatar)] = (avatar, self.client.share_avatar(avatar))
            ref = self._refs[id(avatar)][1]
        silence = np.full((1, 80, 16), -4.0, dtype=np.float32)
        request = RenderRequest(self.sender, ref, np.zeros(1, dtype=np.int64), silence, self.prepare_timeout_s)
        reply = self.client.render(request, timeout_s=self.prepare_timeout_s)
        if reply.patches is None:
            raise RenderTierError("the render tier did not render a warm-up frame")

    def release(self, avatar: Avatar) -> None:
        """The avatar was removed (the render worker's `forget`): drop its reference (so the tier's shared
        copy can be freed) and tell the tier this front-end no longer holds it, which frees it on the
        replicas once no other front-end does (realtime/render_tier/holders.py)."""
        with self._lock:
            entry = self._refs.pop(id(avatar), None)
        if entry is not None:
            self.client.forget_avatar(entry[1])

    def render(self, avatar: Avatar, frame_indices: np.ndarray, mels: np.ndarray,
               deadline_in_s: float | None = None) -> list[MouthPatch | None]:
        return self.render_before(avatar, frame_indices, mels, deadline_in_s)

    def render_before(self, avatar: Avatar, frame_indices: np.ndarray, mels: np.ndarray,
                      deadline_in_s: float | None) -> list[MouthPatch | None]:
        ref = self._refs[id(avatar)][1]
        budget = self.default_deadline_s if deadline_in_s is None else float(deadline_in_s)
        budget = max(budget, self.min_deadline_s, 0.0)
        n = len(frame_indices)
        request = RenderRequest(self.sender, ref, np.asarray(frame_indices, dtype=np.int64),
                                np.asarray(mels, dtype=np.float32), budget)
        self.stats.requests += 1
        self.stats.frames += n
        try:
            reply = self.client.render(request, timeout_s=budget + self.timeout_margin_s)
        except RenderTierError as exc:
            self.stats.failed_frames += n
            self._went_down(exc)
            return [None] * n
        if reply.patches is None:
            self.stats.late_frames += n
            return [None] * n
        self._came_back()
        self.stats.replica_frames += reply.batch_size * n
        self.stats.last_rendered_at = time.monotonic()
        return list(reply.patches)

    def describe(self) -> dict[str, str]:
        return {"render_backend": "remote", "render_sender": self.sender}

    def _went_down(self, exc: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.stats.outages += 1
            log.warning("render tier unavailable (%s): showing held frames until it answers again", exc)

    def _came_back(self) -> None:
        if self._down_since is not None:
            now = time.monotonic()
            log.info("render tier answering again after %.1f s", now - self._down_since)
            self.stats.last_outage = (self._down_since, now)
            self._down_since = None

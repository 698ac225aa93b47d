"""The render tier without Ray: the replica's EDF batching policy, the replica, and the front-end's
remote renderer over an in-process transport (tests/test_ray_backend.py runs the same over Ray Serve)."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import numpy as np
import pytest
from test_engine import FakeAvatar, RecordingRenderer, drive

from realtime.avatars.default_avatar import load_default_avatar
from realtime.config import EngineConfig
from realtime.render_tier.edf_batcher import EdfBatcher, Waiting, plan_batch
from realtime.render_tier.holders import AvatarHolders
from realtime.render_tier.remote_renderer import RemoteRenderer, RenderTierError
from realtime.render_tier.replica import RenderReplica
from realtime.render_tier.wire import (
    AvatarRef,
    RenderReply,
    RenderRequest,
    avatar_fingerprint,
    avatar_from_wire,
    avatar_to_wire,
)
from realtime.renderers.default import DefaultRenderer
from realtime.renderers.factory import RendererSpec
from realtime.scheduling.scheduler import CostModel, InlineRenderWorker
from realtime.timeline.clock import ManualClock
from realtime.timeline.session import RENDERED, LipSyncSession

SR = 16000
BUILTIN_NEEDS = RendererSpec().audio_needs  # the built-in renderer's look-ahead, as a replica has it


def waiting(deadline: float, key: str = "a", frames: int = 1, sender: str = "fe1") -> Waiting:
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
    finally:
        loop.close()
    return Waiting(sender, key, None, np.zeros(frames, np.int64), np.zeros((frames, 80, 16), np.float32),
                   deadline, 0.0, future)


def cost(per_frame: float) -> CostModel:
    model = CostModel()
    model.observe(1, per_frame)
    return model


# --- the policy (pure) ------------------------------------------------------------------------------

def test_plan_serves_the_earliest_deadline_with_the_same_avatars_frames():
    a_late, b_early, a_mid, a_last = waiting(0.30), waiting(0.10, key="b"), waiting(0.20), waiting(0.25)
    plan = plan_batch([a_late, b_early, a_mid, a_last], now=0.0, cost=cost(0.01), max_batch=8, fill_until=None)
    assert plan.batch == [b_early] and not plan.late      # head: the earliest deadline, whatever its avatar
    plan = plan_batch([a_late, a_mid, a_last], now=0.0, cost=cost(0.01), max_batch=8, fill_until=None)
    assert plan.batch == [a_mid, a_last, a_late]           # same avatar, deadline order


def test_plan_caps_batches_and_answers_hopeless_requests_at_once():
    jobs = [waiting(0.5, frames=3) for _ in range(4)]
    plan = plan_batch(jobs, now=0.0, cost=cost(0.001), max_batch=8, fill_until=None)
    assert sum(w.frames for w in plan.batch) == 6          # two requests of 3; a third would exceed 8
    hopeless = waiting(0.005)
    plan = plan_batch([hopeless, waiting(0.5)], now=0.0, cost=cost(0.01), max_batch=8, fill_until=None)
    assert plan.late == [hopeless] and len(plan.batch) == 1
    # a batch shrinks until its predicted time meets its tightest deadline
    tight = [waiting(0.035), waiting(0.5), waiting(0.5), waiting(0.5)]
    plan = plan_batch(tight, now=0.0, cost=cost(0.01), max_batch=8, fill_until=None)
    assert len(plan.batch) == 3


def test_plan_waits_for_other_front_ends_only_while_the_deadline_allows():
    job = waiting(0.200)
    plan = plan_batch([job], now=0.0, cost=cost(0.002), max_batch=8, fill_until=0.004)
    assert plan.wait_until == 0.004 and not plan.batch
    # a full batch after the wait (1.25 x 8 x 20 ms) would miss the deadline: render now
    plan = plan_batch([job], now=0.0, cost=cost(0.020), max_batch=8, fill_until=0.004)
    assert plan.wait_until is None and plan.batch == [job]
    # the wait is over
    plan = plan_batch([job], now=0.005, cost=cost(0.002), max_batch=8, fill_until=0.004)
    assert plan.batch == [job]
    # no wait asked (one front-end)
    assert plan_batch([job], now=0.0, cost=cost(0.002), max_batch=8, fill_until=None).batch == [job]


# --- the batcher and the replica (asyncio) ---------------------------------------------------------

class CountingRenderer(RecordingRenderer):
    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []
        self.prepared = 0

    def prepare(self, avatar) -> None:
        self.prepared += 1

    def render(self, avatar, frame_indices, mels):
        self.batch_sizes.append(len(frame_indices))
        return super().render(avatar, frame_indices, mels)


async def test_two_front_ends_frames_share_one_renderer_call():
    renderer = CountingRenderer()
    avatar = FakeAvatar()

    async def render(av, indices, mels):
        return renderer.render(av, indices, mels)

    batcher = EdfBatcher(render, max_batch=8, max_wait_s=0.05)
    # both front-ends were heard from recently, so the batcher waits (up to 50 ms) for the second
    batcher._senders = {"fe1": batcher.clock(), "fe2": batcher.clock()}
    due = batcher.clock() + 1
    one = asyncio.ensure_future(batcher.submit("fe1", "k", avatar, np.array([0, 1]), np.zeros((2, 80, 16)), due))
    await asyncio.sleep(0.005)
    two = asyncio.ensure_future(batcher.submit("fe2", "k", avatar, np.array([2]), np.zeros((1, 80, 16)), due))
    first, second = await asyncio.gather(one, two)
    assert renderer.batch_sizes == [3]
    assert first.batch_size == second.batch_size == 3
    assert len(first.patches) == 2 and len(second.patches) == 1
    assert first.patches[0].box == tuple(int(v) for v in avatar.boxes[0])
    assert second.patches[0].box == tuple(int(v) for v in avatar.boxes[2])
    batcher.close()
    await asyncio.sleep(0)


async def test_a_single_front_end_never_waits():
    renderer = CountingRenderer()

    async def render(av, indices, mels):
        return renderer.render(av, indices, mels)

    batcher = EdfBatcher(render, max_batch=8, max_wait_s=5.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = await batcher.submit("fe1", "k", FakeAvatar(), np.array([0]), np.zeros((1, 80, 16)), batcher.clock() + 10)
    assert loop.time() - t0 < 1.0 and out.batch_size == 1
    batcher.close()
    await asyncio.sleep(0)


async def test_replica_prepares_each_avatar_once_and_answers_every_request():
    renderer = CountingRenderer()
    avatar = FakeAvatar()
    replica = RenderReplica(renderer, max_batch=8, max_wait_s=0.0)
    ref = AvatarRef("key-1", {"type": _Rebuilt, "avatar": avatar})
    requests = [RenderRequest(f"fe{i % 2}", ref, np.array([i]), np.zeros((1, 80, 16), np.float32), 5.0)
                for i in range(6)]
    replies = await asyncio.gather(*(replica.render(r) for r in requests))
    assert renderer.prepared == 1
    assert all(r.patches is not None and len(r.patches) == 1 for r in replies)
    assert sum(renderer.batch_sizes) == 6
    stats = replica.stats()
    assert stats.avatars == 1 and stats.frames == 6 and stats.errors == 0
    replica.close()
    await asyncio.sleep(0)


class _Rebuilt:
    """Stands in for an avatar type in avatar_from_wire: returns the wrapped avatar."""

    def __new__(cls, avatar):
        return avatar


def test_avatar_wire_round_trip_and_fingerprint():
    avatar = load_default_avatar()
    back = avatar_from_wire(avatar_to_wire(avatar))
    assert np.array_equal(back.frames, avatar.frames) and np.array_equal(back.boxes, avatar.boxes)
    assert back.fps == avatar.fps and back.loop == avatar.loop
    assert avatar_fingerprint(back) == avatar_fingerprint(avatar)
    other = avatar_from_wire({**avatar_to_wire(avatar), "boxes": avatar.boxes + 1})
    assert avatar_fingerprint(other) != avatar_fingerprint(avatar)


# --- the front-end side ------------------------------------------------------------------------------

class InProcessTier:
    """A RenderTierClient running a RenderReplica on its own event-loop thread (what Ray Serve does
    across processes), with a switch that makes it unreachable."""

    def __init__(self, renderer) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.replica = RenderReplica(renderer, max_batch=8, max_wait_s=0.0)
        self.down = False
        self.forgotten: list[str] = []

    def share_avatar(self, avatar) -> AvatarRef:
        return AvatarRef(avatar_fingerprint(avatar), avatar_to_wire(avatar))

    def forget_avatar(self, ref: AvatarRef) -> None:
        self.forgotten.append(ref.key)

    def render(self, request: RenderRequest, timeout_s: float) -> RenderReply:
        if self.down:
            raise RenderTierError("replica gone")
        future = asyncio.run_coroutine_threadsafe(self.replica.render(request), self.loop)
        return future.result(timeout=timeout_s)

    def close(self) -> None:
        async def stop() -> None:
            self.replica.close()
            await asyncio.sleep(0)  # let the cancelled batcher task finish

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def run_session(renderer, speech: np.ndarray, seconds: float):
    avatar = load_default_avatar()
    clock = ManualClock()
    worker = InlineRenderWorker(renderer, clock=ManualClock())
    session = LipSyncSession(avatar, worker, EngineConfig(), clock=clock)
    return drive(session, clock, speech, seconds)


def test_a_session_through_the_tier_equals_the_local_renderer(speech_16k):
    speech = speech_16k[: SR * 3]
    local = run_session(DefaultRenderer(), speech, 3.5)
    tier = InProcessTier(DefaultRenderer())
    try:
        remote_renderer = RemoteRenderer(tier, sender="fe1", min_deadline_s=30.0, audio_needs=BUILTIN_NEEDS)
        remote = run_session(remote_renderer, speech, 3.5)
    finally:
        tier.close()
    assert len(remote.frames) == len(local.frames)
    assert sum(f.state is RENDERED for f in local.frames) > 50
    for a, b in zip(local.frames, remote.frames, strict=True):
        assert a.state == b.state
        assert np.array_equal(a.image, b.image)
    assert np.array_equal(local.audio_out, remote.audio_out)


def test_an_unreachable_tier_gives_held_frames_then_recovers(speech_16k):
    tier = InProcessTier(DefaultRenderer())
    renderer = RemoteRenderer(tier, sender="fe1", min_deadline_s=30.0)
    avatar = load_default_avatar()
    renderer.prepare(avatar)
    mels = np.zeros((2, 80, 16), np.float32)
    try:
        tier.down = True
        assert renderer.render(avatar, np.array([0, 1]), mels, deadline_in_s=0.1) == [None, None]
        assert renderer.render(avatar, np.array([0, 1]), mels, deadline_in_s=0.1) == [None, None]
        assert renderer.stats.outages == 1 and renderer.stats.failed_frames == 4
        tier.down = False
        patches = renderer.render(avatar, np.array([0, 1]), mels, deadline_in_s=0.1)
        assert all(p is not None for p in patches)
        assert renderer.stats.last_rendered_at is not None
    finally:
        tier.close()


def test_prepare_fails_clearly_when_the_tier_is_down():
    tier = InProcessTier(DefaultRenderer())
    tier.down = True
    try:
        with pytest.raises(RenderTierError, match="replica gone"):
            RemoteRenderer(tier, sender="fe1").prepare(load_default_avatar())
    finally:
        tier.close()


# --- freeing deleted avatars on replicas (issue #26 item 6) ---------------------------------------------

class SimClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class ReleasingRenderer(CountingRenderer):
    def __init__(self) -> None:
        super().__init__()
        self.released: list[object] = []

    def release(self, avatar) -> None:
        self.released.append(avatar)


def request_for(key: str, avatar, sender: str = "fe1") -> RenderRequest:
    return RenderRequest(sender, AvatarRef(key, {"type": _Rebuilt, "avatar": avatar}), np.array([0]),
                         np.zeros((1, 80, 16), np.float32), 5.0)


def test_holders_count_every_front_end_and_lapse_a_silent_one():
    clock = SimClock()
    holders = AvatarHolders(lease_s=60.0, clock=clock)
    holders.set_holdings("fe1", ["k", "a"])
    holders.set_holdings("fe2", ["k"])
    assert holders.live() is None  # younger than a lease: it may not have heard from every front-end yet
    clock.t += 60.0
    holders.set_holdings("fe1", ["k", "a"])
    holders.set_holdings("fe2", ["k"])
    assert holders.live() == {"k", "a"}
    holders.set_holdings("fe1", ["a"])        # fe1 forgot k; fe2 still holds it
    assert holders.live() == {"k", "a"}
    holders.set_holdings("fe2", [])           # the last holder of k let go
    assert holders.live() == {"a"}
    clock.t += 59.0
    assert holders.live() == {"a"}
    clock.t += 1.0                            # fe1 stopped renewing (it died): its lease lapsed
    assert holders.live() == set() and holders.holders() == {}


async def test_a_replica_frees_what_no_front_end_holds_and_silence_costs_nothing():
    """A replica's polls (simulated time): held avatars survive ten minutes without a single request
    (a live session's silence); a key shared by two front-ends is freed at the first poll after the
    second lets go, with the renderer's release; a crashed front-end's key goes one lease later."""
    clock = SimClock()
    holders = AvatarHolders(lease_s=60.0, clock=clock)
    renderer = ReleasingRenderer()
    replica = RenderReplica(renderer, max_batch=8, max_wait_s=0.0, clock=clock)
    shared, solo = FakeAvatar(), FakeAvatar()
    holders.set_holdings("fe1", ["both", "solo"])
    holders.set_holdings("fe2", ["both"])
    await replica.render(request_for("both", shared, "fe1"))
    await replica.render(request_for("both", shared, "fe2"))
    await replica.render(request_for("solo", solo, "fe1"))
    assert renderer.prepared == 2

    async def poll() -> list[str]:   # what run_sweeps does every poll_s
        clock.t += 5.0
        as_of = clock()
        live = holders.live()
        return await replica.sweep(live, as_of) if live is not None else []

    for _ in range(120):              # ten minutes of silence; front-ends renew every 10 s
        if int(clock.t) % 10 == 0:
            holders.set_holdings("fe1", ["both", "solo"])
            holders.set_holdings("fe2", ["both"])
        assert await poll() == []
    assert set(replica.stats().avatar_keys) == {"both", "solo"} and renderer.released == []

    holders.set_holdings("fe1", ["solo"])      # fe1 deleted it; fe2 still serves the same content
    assert await poll() == []
    holders.set_holdings("fe2", [])
    assert await poll() == ["both"]
    assert renderer.released == [shared] and replica.stats().avatar_keys == ("solo",)

    # fe1 dies without a word: "solo" is freed once its lease lapses, not before
    dropped_at = None
    for i in range(20):
        if await poll() == ["solo"]:
            dropped_at = i * 5.0 + 5.0
            break
    assert dropped_at is not None and 50.0 <= dropped_at <= 65.0
    assert renderer.released == [shared, solo] and replica.stats().avatars == 0

    await replica.render(request_for("both", shared))  # asked for again: prepared again
    assert renderer.prepared == 3
    replica.close()
    await asyncio.sleep(0)


async def test_a_sweep_keeps_an_avatar_used_after_the_answer_was_asked_for():
    clock = SimClock()
    renderer = ReleasingRenderer()
    replica = RenderReplica(renderer, max_batch=8, max_wait_s=0.0, clock=clock)
    as_of = clock()                   # the poll is sent; a new front-end shares "new" meanwhile
    clock.t += 0.5
    await replica.render(request_for("new", FakeAvatar()))
    assert await replica.sweep(set(), as_of) == []          # the answer predates it
    clock.t += 5.0
    assert await replica.sweep(set(), clock()) == ["new"]   # the next one does not
    replica.close()
    await asyncio.sleep(0)


async def test_run_sweeps_drops_nothing_while_the_registry_fails_or_does_not_know():
    clock = SimClock()
    renderer = ReleasingRenderer()
    replica = RenderReplica(renderer, max_batch=8, max_wait_s=0.0, clock=clock)
    await replica.render(request_for("k", FakeAvatar()))
    answers: list[object] = [RuntimeError("registry restarting"), None, set()]
    seen: list[tuple[str, ...]] = []

    async def fetch_live():
        seen.append(replica.stats().avatar_keys)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    sleeps = 0

    async def sleep(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        clock.t += seconds
        if sleeps > 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await replica.run_sweeps(fetch_live, 5.0, sleep=sleep)
    assert seen == [("k",), ("k",), ("k",)]      # neither the failure nor "unknown" dropped it
    assert replica.stats().avatars == 0 and len(renderer.released) == 1
    replica.close()
    await asyncio.sleep(0)


def test_remote_renderer_release_drops_its_reference_and_tells_the_tier():
    tier = InProcessTier(DefaultRenderer())
    renderer = RemoteRenderer(tier, sender="fe1", min_deadline_s=30.0)
    avatar = load_default_avatar()
    try:
        renderer.prepare(avatar)
        assert id(avatar) in renderer._refs
        renderer.release(avatar)
        assert id(avatar) not in renderer._refs
        assert tier.forgotten == [avatar_fingerprint(avatar)]
        renderer.release(avatar)              # a second forget is a no-op, not a second release
        assert tier.forgotten == [avatar_fingerprint(avatar)]
    finally:
        tier.close()


def test_deleting_a_library_avatar_tells_the_tier_through_the_engine():
    """The whole front-end path of DELETE /avatars/{id}: library removal -> the render worker's forget ->
    RemoteRenderer.release -> the tier's forget_avatar, for that avatar's key only."""
    from server.realtime_engine import RealtimeEngine

    default_avatar = load_default_avatar()
    tier = InProcessTier(DefaultRenderer())
    engine = RealtimeEngine(default_avatar, RemoteRenderer(tier, sender="fe1", min_deadline_s=30.0))
    try:
        other = replace(default_avatar, frames=np.ascontiguousarray(default_avatar.frames[:, :, ::-1]))
        entry = engine.avatars.add_builtin(other, "other", "Other")
        entry.builtin = False   # as if uploaded (the library refuses to remove built-in avatars)
        engine.worker.prepare(other)
        engine.avatars.remove(entry.id)
        assert tier.forgotten == [avatar_fingerprint(other)]
    finally:
        engine.close()
        tier.close()

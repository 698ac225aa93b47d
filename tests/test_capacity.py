"""Admission by measured capacity (server/access/capacity.py): the model's arithmetic with injected costs and
simulated time, and a live server that refuses the offer past its measured capacity while /healthz
`free_slots` says the same number."""
from __future__ import annotations

import asyncio

import pytest

from realtime.timeline.clock import ManualClock
from server.access.capacity import (
    DEFAULT_SESSIONS,
    CapacityModel,
    CapacityMonitor,
    LiveSample,
    SessionCost,
    probe_speech,
)

FPS = 25.0


def model(cpu_ms: float = 11.0, loop_ms: float = 3.0, cores: float = 2.0, upper: int | None = None,
          clock: ManualClock | None = None) -> CapacityModel:
    return CapacityModel(FPS, upper, cores, SessionCost(cpu_ms=cpu_ms, loop_ms=loop_ms), headroom=0.75,
                         hold_s=10.0, smoothing=1.0, clock=clock or ManualClock())


def sample(sessions: int, process_cores: float, loop_cores: float = 0.05, frames: int = 0,
           late: int = 0) -> LiveSample:
    return LiveSample(seconds=1.0, sessions=sessions, process_cores=process_cores, loop_cores=loop_cores,
                      frames=frames, late=late)


def test_capacity_is_the_tightest_of_cpu_loop_and_the_flag():
    # 11 ms a frame at 25 fps = 0.275 cores; 0.75 x 2 cores / 0.275 = 5.45 -> 5. Loop: 0.075 -> 10.
    m = model()
    assert m.bounds() == {"cpu": 5, "loop": 10, "max_sessions": None}
    assert m.capacity() == 5 and m.limit(live=0) == 5
    # A loop-heavy session: 0.75 / (8 ms x 25 / 1000) = 3.75 -> 3, below the CPU's bound.
    assert model(cpu_ms=11.0, loop_ms=8.0).capacity() == 3
    # More cores, more sessions; a fixed --max-sessions is an upper bound on the measured number.
    assert model(cores=16.0).bounds()["cpu"] == 43
    assert model(cores=16.0, upper=6).capacity() == 6
    assert model(upper=12).capacity() == 5
    # A session costlier than the whole budget still gets one slot.
    assert model(cpu_ms=200.0).capacity() == 1


def test_unmeasured_model_is_the_fixed_number_and_ignores_live_samples():
    assert CapacityModel(FPS, None, 2.0).capacity() == DEFAULT_SESSIONS
    fixed = CapacityModel(FPS, 3, 2.0)
    fixed.observe(sample(sessions=3, process_cores=2.0, frames=75, late=75))
    assert fixed.capacity() == 3 and fixed.limit(live=3) == 3 and not fixed.overloaded()


def test_live_cost_only_raises_the_probe_cost():
    m = model()
    # Cheaper live (silent sessions): the probe's figure stays.
    m.observe(sample(sessions=2, process_cores=0.2))
    assert m.cost().cpu_ms == pytest.approx(11.0) and m.capacity() == 5
    # Costlier live (a busier machine): 1.0 core / 2 sessions = 20 ms a frame -> 1.5 / 0.5 = 3.
    m.observe(sample(sessions=2, process_cores=1.0))
    assert m.cost().cpu_ms == pytest.approx(20.0) and m.capacity() == 3
    # The loop thread's share per session counts the same way: 0.6 / 2 = 12 ms -> 0.75 / 0.3 = 2.
    m.observe(sample(sessions=2, process_cores=1.0, loop_cores=0.6))
    assert m.cost().loop_ms == pytest.approx(12.0) and m.bounds()["loop"] == 2 and m.capacity() == 2


def test_late_ticks_freeze_admission_at_the_live_count_for_the_hold():
    clock = ManualClock()
    m = model(clock=clock)
    m.observe(sample(sessions=3, process_cores=0.3, frames=75, late=1))  # 1.3 %: under the 2 % rule
    assert not m.overloaded() and m.limit(live=3) == 5
    m.observe(sample(sessions=3, process_cores=0.3, frames=75, late=2))  # 2.7 %: late
    assert m.overloaded() and m.limit(live=3) == 3 and m.overloads == 1
    assert m.retry_after_s() == 10
    clock.advance(9.5)
    assert m.limit(live=3) == 3 and m.retry_after_s() == 1
    clock.advance(1.0)
    assert not m.overloaded() and m.limit(live=3) == 5 and m.retry_after_s() == 5
    # Too few frames to judge (a session just started): no freeze.
    m.observe(sample(sessions=1, process_cores=0.3, frames=10, late=10))
    assert not m.overloaded()


async def test_monitor_counts_each_sessions_new_ticks_only():
    m = model()
    ticks = {"a": (100, 0), "b": (50, 0)}
    monitor = CapacityMonitor(m, lambda: [(sid, f, late) for sid, (f, late) in ticks.items()], interval_s=0.05)
    seen: list[LiveSample] = []
    observe = m.observe
    m.observe = lambda s: (seen.append(s), observe(s))[1]  # type: ignore[method-assign]
    monitor.start()
    await asyncio.sleep(0.03)
    ticks.update(a=(125, 0), b=(75, 5))  # 50 new ticks, 5 late: 10 %
    ticks.pop("b")  # b ended: its counters leave without a negative delta
    ticks["c"] = (10, 10)  # c is new: its past ticks are not this window's
    ticks["b"] = (75, 5)
    await asyncio.sleep(0.1)
    await monitor.stop()
    assert seen and seen[0].sessions == 3 and seen[0].frames == 50 and seen[0].late == 5
    assert m.overloaded()


def test_probe_speech_is_voiced_and_bounded():
    x = probe_speech(1.0)
    assert x.dtype.name == "float32" and x.shape == (16000,) and 0.4 < float(abs(x).max()) <= 0.5


# -- a live server --------------------------------------------------------------------------------------


@pytest.fixture
async def capped_server(loopback_only):
    """A server whose measured capacity is 2: 0.75 x 2 cores over 0.6 cores a session (24 ms a frame)."""
    from server_helpers import start_server, tiny_engine

    from server.state import STATE

    engine = tiny_engine()
    capacity = CapacityModel(FPS, None, cores=2.0, cost=SessionCost(cpu_ms=24.0, loop_ms=2.0))
    running = await start_server(engine, capacity=capacity, max_sessions=0, max_sessions_per_ip=10)
    # The live monitor would fold this test process's own CPU (the clients' decoders) into the cost:
    # stopped, so the injected cost is the whole model.
    await running.app[STATE].capacity_monitor.stop()
    yield running
    await running.stop()
    engine.close()


async def health(http, server) -> dict:
    async with http.get(server.endpoint("/healthz")) as resp:
        assert resp.status == 200
        return await resp.json()


async def test_offer_past_the_measured_capacity_gets_503_and_healthz_agrees(capped_server, http):
    from server_helpers import Client

    from server.state import STATE

    server = capped_server
    before = await health(http, server)
    assert before["free_slots"] == 2 and before["max_sessions"] == 2
    assert before["capacity"]["bounds"]["cpu"] == 2 and before["capacity"]["measured"]
    clients = []
    for expected_free in (1, 0):
        client = Client(server, http)
        await client.connect()
        clients.append(client)
        assert (await health(http, server))["free_slots"] == expected_free
    for client in clients:
        await client.wait_for_video(5)
    extra = Client(server, http)
    body = await extra.connect(expect_status=503)
    assert body["max_sessions"] == 2 and body["retry_after_s"] > 0
    await extra.pc.close()
    # The admitted sessions did not notice: both still receive video.
    counts = [len(c.received.video) for c in clients]
    for client, count in zip(clients, counts, strict=True):
        await client.wait_for_video(count + 10)
    async with http.delete(clients[0].url(), headers=clients[0].auth) as resp:
        assert resp.status == 200
    assert (await health(http, server))["free_slots"] == 1
    # A live window that raises the cost (1.5 cores for the one session: 60 ms a frame) lowers the
    # capacity to 1 at once, for /healthz and /offer alike.
    server.app[STATE].sessions.capacity.observe(sample(sessions=1, process_cores=1.5))
    after = await health(http, server)
    assert after["free_slots"] == 0 and after["max_sessions"] == 1 and after["sessions"] == 1
    refused = Client(server, http)
    await refused.connect(expect_status=503)
    await refused.pc.close()
    await clients[1].wait_for_video(len(clients[1].received.video) + 10)
    await clients[1].close()


async def test_start_up_probe_serves_one_session_and_prices_it():
    from server_helpers import tiny_engine

    from server.access.capacity import measure_session_cost
    from server.access.limits import started_pool

    engine = tiny_engine()
    pool = started_pool(1, "probe-test")
    try:
        cost = await measure_session_cost(engine, pool, seconds=0.6, idle_s=0.1)
    finally:
        pool.shutdown()
        engine.close()
    stages = dict(cost.stages)
    assert cost.cpu_ms > 0 and 0 < cost.loop_ms <= cost.cpu_ms
    assert stages["video_encode"] > 0 and stages["audio_encode"] > 0  # both encoders ran
    assert engine.metrics().sessions == 0  # the probe session is closed


def test_max_sessions_flag_takes_auto_or_a_bound():
    from server.config import ServerConfig

    assert ServerConfig().max_sessions == 0  # auto by default
    assert ServerConfig.from_args(None, env={"LIPSYNC_MAX_SESSIONS": "auto"}).max_sessions == 0
    assert ServerConfig.from_args(None, env={"LIPSYNC_MAX_SESSIONS": "6"}).max_sessions == 6
    with pytest.raises(ValueError, match="auto or a number"):
        ServerConfig.from_args(None, env={"LIPSYNC_MAX_SESSIONS": "0"})


def test_other_workers_sessions_share_the_cpu_bound_but_not_the_loop():
    # 2 cores: 5 sessions in all (0.75 x 2 / 0.275). Another worker holding 3 leaves 2 here.
    m = model()
    held = {"n": 3}
    m.others = lambda: held["n"]
    assert m.bounds() == {"cpu": 2, "loop": 10, "max_sessions": None} and m.capacity() == 2
    held["n"] = 5  # the others fill the cores: nothing here, not even the lone process's 1
    assert m.capacity() == 0 and m.limit(live=0) == 0
    held["n"] = 0
    assert m.capacity() == 5


def test_shared_room_is_what_the_shared_cores_and_the_flag_still_take():
    m = model()  # 5 sessions fit the cores
    held = {"n": 2}
    m.others = lambda: held["n"]
    assert m.shared_room(live=1) == 2  # 5 - 2 elsewhere - 1 here
    held["n"] = 6
    assert m.shared_room(live=0) == 0
    # --max-sessions N is the server's: with 3 workers and N = 4, the others' 3 sessions leave 1 here.
    capped = model(cores=16.0, upper=4)
    capped.others = lambda: 3
    assert capped.capacity() == 1 and capped.shared_room(live=1) == 0
    fixed = CapacityModel(FPS, 4, 2.0)  # not measured: the flag alone
    fixed.others = lambda: 3
    assert fixed.capacity() == 1 and fixed.shared_room(live=0) == 1
    assert CapacityModel(FPS, None, 2.0).shared_room(live=0) is None

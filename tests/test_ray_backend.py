"""The render tier on Ray Serve with a local cluster (`ray.init(num_cpus=2)`, loopback only): a session
rendered through it equals the local backend's output, a killed replica is survived, and a front-end
that cannot reach its cluster fails at once with a clear message."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_render_tier import run_session

from realtime.avatars.default_avatar import load_default_avatar
from realtime.config import EngineConfig
from realtime.render_tier.remote_renderer import RemoteRenderer
from realtime.render_tier.wire import avatar_fingerprint
from realtime.renderers.default import DefaultRenderer
from realtime.renderers.factory import RendererSpec
from realtime.scheduling.scheduler import ThreadedRenderWorker
from realtime.timeline.session import RENDERED, LipSyncSession

ray = pytest.importorskip("ray")  # the test extra installs ray[serve]: this runs in CI
from server.ray_render_tier import (  # noqa: E402
    RayRenderTier,
    RayTierSettings,
    token_auth_enabled,
    warn_unless_token_auth,
)

REPO = Path(__file__).resolve().parents[1]
SR = 16000
BUILTIN_NEEDS = RendererSpec().audio_needs  # the built-in renderer's look-ahead, as a replica has it
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tier():
    # Ray 2.52-2.58's default, or an operator's environment: the server must turn token auth on itself.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Short holder leases and polls, so a freed avatar leaves the replicas within a test's patience.
    settings = RayTierSettings(local_cpus=2, app_name="test-render", holder_lease_s=5.0, holder_renew_s=1.0,
                               holder_poll_s=0.5)
    tier = RayRenderTier.connect(settings, RendererSpec())
    yield tier
    tier.close()


def test_a_session_rendered_through_ray_equals_the_local_backend(tier, speech_16k):
    speech = speech_16k[: SR * 3]
    local = run_session(DefaultRenderer(), speech, 3.5)
    remote_renderer = RemoteRenderer(tier, sender="fe1", min_deadline_s=30.0, audio_needs=BUILTIN_NEEDS)
    remote = run_session(remote_renderer, speech, 3.5)
    assert sum(f.state is RENDERED for f in local.frames) > 50
    assert [f.state for f in remote.frames] == [f.state for f in local.frames]
    for a, b in zip(local.frames, remote.frames, strict=True):
        assert np.array_equal(a.image, b.image)
    assert tier.replica_stats().avatars >= 1


def replica_actor_names(app_name: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app_name}#")]


def test_a_killed_replica_is_survived(tier, speech_16k):
    """Real time: a session talks through the tier; its replica is killed; the session never fails or
    waits (held frames meanwhile) and renders again once Serve has replaced the replica."""
    avatar = load_default_avatar()
    renderer = RemoteRenderer(tier, sender="fe-kill", audio_needs=BUILTIN_NEEDS)
    worker = ThreadedRenderWorker(renderer)
    session = LipSyncSession(avatar, worker, EngineConfig())
    speech = np.tile(speech_16k, 40)
    states: list[tuple[float, str]] = []   # (time, state) of every frame that carries speech
    killed_at = rendered_again = None
    t0 = time.monotonic()
    pushed = 0
    next_frame = t0
    try:
        while time.monotonic() - t0 < 90:
            now = time.monotonic()
            due = int((now - t0) * SR)
            if due > pushed:
                session.push_audio(speech[pushed:due], SR)
                session.next_audio(due - pushed)
                pushed = due
            if now >= next_frame:
                frame = session.next_video_frame()
                if frame.speech:
                    states.append((now, frame.state))
                next_frame += 0.04
            if killed_at is None and now - t0 > 3.0:
                names = replica_actor_names("test-render")
                assert names, "no replica to kill"
                ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
                killed_at = time.monotonic()
            if killed_at is not None and now - killed_at > 1.0 and renderer.stats.last_rendered_at and \
                    renderer.stats.last_rendered_at > killed_at + 0.5:
                rendered_again = rendered_again or renderer.stats.last_rendered_at
                if sum(t > rendered_again + 0.2 for t, _ in states) >= 50:
                    break
            time.sleep(0.005)
    finally:
        session.close()
        worker.close()
    before = [s for t, s in states if t0 + 1.0 < t < killed_at]
    assert before.count(RENDERED) > 0.5 * len(before), "the tier rendered before the kill"
    assert rendered_again is not None, "no rendered frame after the replica was killed"
    after = [s for t, s in states if t > rendered_again + 0.2]
    assert after and after.count(RENDERED) > 0.5 * len(after)
    assert renderer.stats.outages >= 1 or renderer.stats.late_frames > 0
    print(f"recovered {rendered_again - killed_at:.1f} s after the kill")


def replica_keys(tier) -> set[str]:
    return set(tier.replica_stats().avatar_keys)


def test_a_deleted_avatar_is_freed_on_the_replicas_once_no_front_end_holds_it(tier):
    """Issue #26 item 6: two front-ends serve the same avatar (same content, one key); the first forgets
    it (its DELETE): the replica keeps it for the second, through silence longer than a lease; the
    second forgets it: the replica frees it within a few polls, and the registry holds it for no one."""
    base = load_default_avatar()
    avatar = replace(base, frames=np.ascontiguousarray(base.frames[:, :, ::-1]))  # content no other test uses
    key = avatar_fingerprint(avatar)
    second = RayRenderTier.connect(tier.settings, RendererSpec())   # another front-end on the cluster
    try:
        a = RemoteRenderer(tier, sender="fe-a", audio_needs=BUILTIN_NEEDS)
        b = RemoteRenderer(second, sender="fe-b", audio_needs=BUILTIN_NEEDS)
        a.prepare(avatar)
        b.prepare(avatar)
        assert key in replica_keys(tier)
        a.release(avatar)
        assert key not in tier.held_keys() and key in second.held_keys()
        time.sleep(tier.settings.holder_lease_s + 4 * tier.settings.holder_poll_s)  # no request meanwhile
        assert key in replica_keys(tier), "freed while another front-end still held it"
        b.release(avatar)
        released = time.monotonic()
        while key in replica_keys(tier):
            assert time.monotonic() - released < 30, "the replica never freed the deleted avatar"
            time.sleep(0.2)
        print(f"freed on the replica {time.monotonic() - released:.1f} s after the last holder let go")
        holders = ray.get_actor(tier.settings.holders_name, namespace="lipsync")
        assert all(key not in keys for keys in ray.get(holders.holders.remote()).values())
    finally:
        second.close()


def test_the_server_refuses_to_start_without_its_render_tier():
    """A front-end that cannot reach its cluster says so and exits at once (ray.init alone would retry
    for minutes). In a process of its own: this module's cluster is already initialised here."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "run_server.py"), "--port", "0", "--render-backend", "ray",
                           "--ray-address", "127.0.0.1:1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    assert time.monotonic() - t0 < 60  # interpreter and torch start-up; the probe itself takes milliseconds


JOIN = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False, _node_ip_address="127.0.0.1")
    print("JOINED", ray.get(ray.put(41)) + 1)
except Exception as exc:
    print("REFUSED", type(exc).__name__)
"""


def join_cluster(gcs_address: str, home: Path, **auth: str) -> str:
    """A separate driver joining the cluster with only the `auth` RAY_AUTH_* settings (and an empty
    HOME, so no ~/.ray/auth_token): its stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), **auth)
    done = subprocess.run([sys.executable, "-c", JOIN, gcs_address], env=env, capture_output=True,
                          text=True, timeout=240)
    return done.stdout + done.stderr


def test_the_local_cluster_requires_ray_token_auth(tier, tmp_path):
    """Issue #25: a local cluster started without --ray-address used no authentication (its GCS listens
    beyond loopback: anyone reaching it could run code). Now it runs RAY_AUTH_MODE=token with this
    process's own token: a driver without the token is refused, one with it joins."""
    assert os.environ["RAY_AUTH_MODE"] == "token" and token_auth_enabled()
    gcs = ray.get_runtime_context().gcs_address
    refused = join_cluster(gcs, tmp_path)
    assert "REFUSED" in refused and "InvalidAuthToken" in refused, refused[-2000:]
    joined = join_cluster(gcs, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.environ["RAY_AUTH_TOKEN"])
    assert "JOINED 42" in joined, joined[-2000:]


def test_an_external_cluster_without_token_auth_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="server.ray_render_tier"):
        warn_unless_token_auth("10.0.0.5:6379", enabled=True)
        assert not caplog.records
        warn_unless_token_auth("10.0.0.5:6379", enabled=False)
    assert len(caplog.records) == 1 and "without token authentication" in caplog.records[0].getMessage()
    assert "10.0.0.5:6379" in caplog.records[0].getMessage()

"""Scale-out bench: two front-end processes, two sessions each, sharing one Ray Serve render replica.

    python bench/scale.py [--seconds 20] [--sessions-per-front-end 2] [--front-ends 2]

What runs (all on this machine, loopback only):
1. A Ray head (`ray start --head --node-ip-address 127.0.0.1 --num-cpus 2`), and the render tier
   deployed on it with one replica of the built-in renderer (server/ray_render_tier.py).
2. Baseline: the front-end processes with `--render-backend local` semantics (each its own render
   worker and renderer), then the same with the Ray tier (`RemoteRenderer` -> the shared replica).
   A front-end process is the server's engine without the WebRTC transport: the default avatar, a
   `ThreadedRenderWorker`, `LipSyncSession`s driven in wall-clock time like the server's tracks (20 ms
   audio pushed and pulled every 20 ms, a video frame every 40 ms). All sessions start at the same
   monotonic instant with the same speech (aligned sessions), so their frames fall due together.
3. Recovery: one front-end with one session on the tier; the replica is killed mid-speech; the time
   until the front-end receives rendered patches again is `recovery_s`.

Per frame, "render latency" is the time from the frame's render job being ready (its mel window
complete) to its patch being delivered to the session: queueing, batching, transport and rendering.
`added_latency_ms` is the Ray tier's p50 / p95 minus the local backend's. `mean_batch` is the replica's
frames per renderer call, across front-ends. `min_fps` is the lowest frame rate any session emitted;
`rendered_fraction` the share of speech frames shown with a fresh mouth (the rest were held).

Isolation: run as root with `unshare` available, the bench re-runs itself in a network namespace of
its own with only loopback up (as CI runs the tests), so Ray's cluster can only use 127.0.0.1.

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import make_speech  # noqa: E402
from realtime.avatars.default_avatar import load_default_avatar  # noqa: E402
from realtime.config import EngineConfig  # noqa: E402
from realtime.renderers.base import MouthPatch  # noqa: E402
from realtime.scheduling.scheduler import RenderJob, ThreadedRenderWorker  # noqa: E402
from realtime.timeline.session import FrameState, LipSyncSession  # noqa: E402
from server.realtime_engine import REMOTE_BATCH_WAIT_MS  # noqa: E402

APP = "bench-scale"
# The bench's cluster uses Ray's token authentication with a token of this run's own, handed to every
# process in the environment (nothing is written to ~/.ray).
RAY_AUTH = {"RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}
TEXT = ("Scaling out means many front ends share one render tier, and every session still talks on time, "
        "with its mouth in sync with its voice.")


class TimedWorker(ThreadedRenderWorker):
    """A render worker that records each delivered frame's render latency (job ready -> delivered)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.latencies_s: list[float] = []

    def _deliver(self, batch: list[RenderJob], patches: list[MouthPatch | None], completed_at: float,
                 seconds: float) -> None:
        self.latencies_s.extend(completed_at - j.ready_at for j, p in zip(batch, patches, strict=True)
                                if p is not None)
        super()._deliver(batch, patches, completed_at, seconds)


def front_end(args: argparse.Namespace) -> None:
    """One front-end process: prints one JSON line with its sessions' numbers."""
    avatar = load_default_avatar()
    tier = None
    if args.backend == "ray":
        from realtime.render_tier.remote_renderer import RemoteRenderer
        from realtime.renderers.factory import RendererSpec
        from server.ray_render_tier import RayRenderTier, RayTierSettings

        tier = RayRenderTier.connect(RayTierSettings(address=args.ray_address, app_name=APP), RendererSpec())
        renderer = RemoteRenderer(tier, sender=f"fe-{os.getpid()}", audio_needs=RendererSpec().audio_needs)
    else:
        from realtime.renderers.default import DefaultRenderer

        renderer = DefaultRenderer()
    # As the server does (server/realtime_engine.py): with the tier, the replica does the waiting for batches.
    worker = (TimedWorker(renderer, max_wait_s=REMOTE_BATCH_WAIT_MS / 1000.0) if args.backend == "ray"
              else TimedWorker(renderer))
    worker.prepare(avatar, warmup=True)
    sessions = [LipSyncSession(avatar, worker, EngineConfig()) for _ in range(args.sessions)]
    wav, rate = make_speech(TEXT, 20)
    step = round(rate * 0.02)
    worker.latencies_s.clear()
    while time.monotonic() < args.start_at:
        time.sleep(0.001)
    frames = [0] * len(sessions)
    speech_states: list[list[FrameState]] = [[] for _ in sessions]
    t0 = args.start_at
    tick = 0
    while True:
        target = t0 + tick * 0.02
        now = time.monotonic()
        if now < target:
            time.sleep(target - now)
        if target - t0 >= args.seconds:
            break
        chunk = wav[tick * step:(tick + 1) * step]
        for i, session in enumerate(sessions):
            session.push_audio(chunk, rate)
            session.next_audio(320)
            if tick % 2 == 0:
                frame = session.next_video_frame()
                frames[i] += 1
                if frame.speech:
                    speech_states[i].append(frame.state)
        tick += 1
    elapsed = time.monotonic() - t0
    out = {
        "fps": [n / elapsed for n in frames],
        "rendered_fraction": [s.count(FrameState.RENDERED) / max(len(s), 1) for s in speech_states],
        "latency_ms": _percentiles(worker.latencies_s),
        "front_end_mean_batch": worker.stats().mean_batch,
    }
    if args.backend == "ray":
        stats = renderer.stats
        out["remote"] = {"outages": stats.outages, "failed_frames": stats.failed_frames,
                         "late_frames": stats.late_frames, "mean_replica_batch": stats.mean_replica_batch,
                         "last_rendered_at": stats.last_rendered_at, "last_outage": stats.last_outage}
    for s in sessions:
        s.close()
    worker.close()
    if tier is not None:
        tier.close()
    print(json.dumps(out), flush=True)


def _percentiles(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"p50": None, "p95": None}
    ms = 1000.0 * np.asarray(values_s)
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)}


def run_front_ends(backend: str, count: int, sessions: int, seconds: float, address: str | None,
                   lead_s: float = 25.0) -> list[dict]:
    start_at = time.monotonic() + lead_s  # every process has loaded and warmed up by then
    cmd = [sys.executable, __file__, "--front-end", "--backend", backend, "--sessions", str(sessions),
           "--seconds", str(seconds), "--start-at", str(start_at)]
    if address:
        cmd += ["--ray-address", address]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_env()) for _ in range(count)]
    results = []
    for p in procs:
        stdout, _ = p.communicate(timeout=lead_s + seconds + 180)
        if p.returncode != 0:
            raise SystemExit(f"bench/scale.py: a front-end failed (exit {p.returncode})")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **RAY_AUTH)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ray_head() -> str:
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray_cli is None:
        raise SystemExit("bench/scale.py: the ray command is missing (pip install 'ray[serve]')")
    port = _free_port()
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                   check=True, capture_output=True, env=_env())
    return f"127.0.0.1:{port}"


def stop_ray_head() -> None:
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray_cli:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=_env())


def kill_replica() -> float:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#")]
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return time.monotonic()


def isolate() -> None:
    """Re-run this bench in a loopback-only network namespace when possible (see the module docstring)."""
    if os.environ.get("LIPSYNC_BENCH_ISOLATED") or os.geteuid() != 0 or shutil.which("unshare") is None:
        return
    env = dict(os.environ, LIPSYNC_BENCH_ISOLATED="1")
    command = " ".join(shlex.quote(a) for a in [sys.executable, __file__, *sys.argv[1:]])
    os.execvpe("unshare", ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--front-ends", type=int, default=2)
    parser.add_argument("--sessions-per-front-end", type=int, default=2)
    # internal: one front-end process
    parser.add_argument("--front-end", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="local", help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--ray-address", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.front_end:
        front_end(args)
        return
    isolate()

    os.environ.update(RAY_USAGE_STATS_ENABLED="0", **RAY_AUTH)  # before ray is imported
    from realtime.renderers.factory import RendererSpec
    from server.ray_render_tier import RayRenderTier, RayTierSettings

    n, per = args.front_ends, args.sessions_per_front_end
    print(f"local backend: {n} front-ends x {per} sessions, {args.seconds:g} s", flush=True)
    local = run_front_ends("local", n, per, args.seconds, None)
    address = start_ray_head()
    try:
        tier = RayRenderTier.connect(RayTierSettings(address=address, app_name=APP), RendererSpec())
        print(f"ray backend on {address}: {n} front-ends x {per} sessions, one replica", flush=True)
        before = tier.replica_stats()
        remote = run_front_ends("ray", n, per, args.seconds, address)
        after = tier.replica_stats()
        batches = after.batches - before.batches
        mean_batch = (after.frames - before.frames) / batches if batches else 0.0
        print("recovery: one session, the replica killed after 6 s", flush=True)
        recovery_s = measure_recovery(address)
    finally:
        stop_ray_head()

    def merged(results: list[dict], key: str) -> list[float]:
        return [v for r in results for v in r[key]]

    lat_local = [r["latency_ms"] for r in local]
    lat_ray = [r["latency_ms"] for r in remote]
    added = {q: round(max(r[q] for r in lat_ray) - max(r[q] for r in lat_local), 2) for q in ("p50", "p95")}
    result = {
        "added_latency_ms": added,
        "latency_ms": {"local": lat_local, "ray": lat_ray},
        "mean_batch": round(mean_batch, 2),
        "front_end_mean_batch": [round(r["front_end_mean_batch"], 2) for r in remote],
        "min_fps": round(min(merged(remote, "fps")), 2),
        "min_fps_local": round(min(merged(local, "fps")), 2),
        "rendered_fraction": {"local": [round(v, 3) for v in merged(local, "rendered_fraction")],
                              "ray": [round(v, 3) for v in merged(remote, "rendered_fraction")]},
        "recovery_s": recovery_s,
        "front_ends": n, "sessions_per_front_end": per, "seconds": args.seconds,
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(result))


def measure_recovery(address: str) -> float | None:
    """One front-end, one session; the replica is killed 6 s in; seconds until patches arrive again."""
    start_at = time.monotonic() + 25.0
    cmd = [sys.executable, __file__, "--front-end", "--backend", "ray", "--sessions", "1", "--seconds", "30",
           "--start-at", str(start_at), "--ray-address", address]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_env())
    while time.monotonic() < start_at + 6.0:
        time.sleep(0.05)
    killed_at = kill_replica()
    stdout, _ = proc.communicate(timeout=120)
    if proc.returncode != 0:
        return None
    outage = json.loads(stdout.strip().splitlines()[-1])["remote"]["last_outage"]
    if outage is None or outage[1] < killed_at:
        return None  # never saw the outage end after the kill
    return round(outage[1] - killed_at, 2)


if __name__ == "__main__":
    main()

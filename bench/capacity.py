"""How many sessions this machine carries at 25 fps with 1, 2, ... front-end processes, and a model that
predicts a bigger machine from it.

    python bench/capacity.py [--processes 1,2] [--renderers default,wav2lip] [--trial-s 4]
                             [--max-sessions 12] [--gpu-json gpu_check.json] [--event-loop uvloop|asyncio]

Each front-end process is what `lipsync serve --workers N` runs per worker, minus the network: one
process, one event loop, the server's own engine (RealtimeEngine: one shared avatar, renderer and render
worker), the server's tracks, aiortc's VP8 and Opus encoders on the loop's executor, RTP + SRTP + UDP
send (bench/encode_path.py `sessions_with_encode`, one trial of N sessions), on the server's event loop
(`--event-loop`, as the server's flag: uvloop unless asked). For P processes and N
sessions, P child processes start together (`--start-at`: every child waits for the same wall-clock
instant after loading, so their trials overlap exactly) with the N sessions split as evenly as can be;
the step passes when every child's trial passes (every session: <= 2 % of video ticks missed or late,
<= 2 % of them not received as whole frames by the trial's client, <= 2 % of speech frames dropped, latency
p95 within budget). Each trial's client (bench/rtp_counter.py) is a process of its own that counts video
frames from the RTP headers and decodes nothing: `client_cores` in each trial's cpu, next to the server's
`cores_used`. N steps up from P until the first failure.

Wav2Lip: random weights of realistic cost (bench.common.realistic_random_wav2lip, not the released
checkpoints), the server's CPU default (OpenVINO, precision by the start-up gate, rows 36..95).

The capacity model (printed, and in the JSON under "model"):
- one session costs `cpu_ms_per_frame.total` ms of CPU per video frame, i.e. c = total x 25 / 1000 cores;
- one process carries at most `per_process_sessions` (its event loop and GIL: the 1-process count);
- a machine with C cores and one worker per core then carries about
  min(C x per_process_sessions, floor(C x usable / c)) default-renderer sessions, where usable is the
  share of the cores the passing runs here kept busy (other processes included);
- with a GPU (`--gpu-json`: bench/gpu_check.py's or bench/sessions.py's JSON, its "wav2lip_fps"
  {batch: frames/s} of one GPU), Wav2Lip sessions per GPU = the largest batch b with fps(b) >= 25 b
  (every session's frame of a tick in one batch), capped by the front-end CPU bound above.

Numbers measured on a shared machine are only as good as its load: the JSON carries the load average at
start and end, and each trial's `other_processes_cores`.

Last line: one JSON object {"sessions_25fps_by_processes": {"1": n, ...}, "wav2lip_sessions_25fps": n,
"wav2lip_sessions_25fps_by_processes": {...}, "cpu_ms_per_frame": {stage: ms, "total": ms},
"cores_used": x, "cores": n, "model": {...}, "loadavg": [start, end], "runs": [...]}.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.capacity")
FPS = 25.0
LOAD_S = {"default": 8.0, "wav2lip": 40.0}  # time a child gets to load before the common start


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# -- one child: one front-end process, one trial ----------------------------------------------------------


def child(renderer_name: str, sessions: int, start_at: float, trial_s: float, microphone: bool = True,
          event_loop: str = "uvloop") -> int:
    from bench.common import TEXT, make_speech
    from bench.encode_path import sessions_with_encode
    from realtime.avatars.default_avatar import load_default_avatar

    avatar = load_default_avatar()
    wav, rate = make_speech(TEXT, 2)
    wav = wav[: int(trial_s * rate)]
    renderer: Any
    if renderer_name == "default":
        from realtime.renderers.default import DefaultRenderer

        renderer = DefaultRenderer()
    else:
        from bench.common import realistic_random_wav2lip
        from realtime.renderers.wav2lip import Wav2LipRenderer

        renderer = Wav2LipRenderer(realistic_random_wav2lip(0))
        renderer.prepare(avatar)
    wait = start_at - time.time()
    if wait < 0:
        log.warning("child loaded %.1f s after the common start: its trial starts late", -wait)
    time.sleep(max(0.0, wait))
    if sessions == 0:
        print(json.dumps({"ok": True, "sessions": 0}), flush=True)
        return 0
    _, trials = sessions_with_encode(renderer, avatar, wav, rate, sessions, "VP8", steps=(sessions,),
                                     microphone=microphone, event_loop=event_loop)
    res = trials[-1]
    print(json.dumps({"ok": bool(res["ok"]), "sessions": sessions, "cpu": res["cpu"],
                      "worst": res.get("worst"), "loadavg": os.getloadavg()}), flush=True)
    return 0


# -- the parent -----------------------------------------------------------------------------------------


def step(renderer: str, processes: int, n: int, trial_s: float, speech: str = "mic",
         event_loop: str = "uvloop") -> dict:
    """N sessions over P processes, all trials at once."""
    start_at = time.time() + LOAD_S[renderer]
    counts = split(n, processes)
    # no thread-count override: each child runs the renderer with the server's own threads (Wav2Lip's
    # OpenVINO path: torch.get_num_threads(), as `lipsync serve` and each of its --workers does)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--renderer", renderer, "--sessions", str(k),
                               "--start-at", repr(start_at), "--trial-s", str(trial_s), "--input", speech,
                               "--event-loop", event_loop],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
             for k in counts]
    results: list[dict] = []
    deadline = time.monotonic() + LOAD_S[renderer] + trial_s * 4 + 120
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # a child that never finished (a loaded machine): a failed step
            proc.kill()
            proc.communicate()
            results.append({"ok": False, "error": "timed out"})
            continue
        lines = [line for line in out.splitlines() if line.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {proc.returncode}"})
    ok = all(r.get("ok") for r in results)
    cores_used = sum(r["cpu"]["cores_used"] for r in results if "cpu" in r)
    log.info("%s: %d session(s) over %d process(es) %s: %s; cores used %.2f; load %s", renderer, n, processes,
             counts, "pass" if ok else "FAIL", cores_used, os.getloadavg())
    return {"renderer": renderer, "processes": processes, "sessions": n, "split": counts, "ok": ok,
            "cores_used": round(cores_used, 2), "children": results}


def search(renderer: str, processes: int, max_n: int, trial_s: float, runs: list[dict],
           speech: str = "mic", event_loop: str = "uvloop") -> tuple[int, dict | None]:
    """The largest N (from P up) that passed before the first failure, and its run."""
    best, best_run = 0, None
    for n in range(processes, max_n + 1):
        run = step(renderer, processes, n, trial_s, speech, event_loop)
        runs.append(run)
        if not run["ok"]:
            break
        best, best_run = n, run
    if best == 0 and processes > 1:  # even one each failed: try fewer sessions than processes
        for n in range(processes - 1, 0, -1):
            run = step(renderer, processes, n, trial_s, speech, event_loop)
            runs.append(run)
            if run["ok"]:
                return n, run
    return best, best_run


def cpu_split(run: dict | None) -> dict:
    """ms of CPU per video frame by stage, session-weighted over the run's children."""
    if run is None:
        return {}
    children = [c for c in run["children"] if c.get("sessions") and "cpu" in c]
    total_sessions = sum(c["sessions"] for c in children)
    out: dict[str, float] = {}
    for c in children:
        weight = c["sessions"] / total_sessions
        for stage, ms in c["cpu"]["summary_ms_per_video_frame"].items():
            out[stage] = out.get(stage, 0.0) + weight * ms
        out["total"] = out.get("total", 0.0) + weight * c["cpu"]["total_ms_per_video_frame"]
    return {k: round(v, 2) for k, v in out.items()}


def gpu_sessions(gpu_json: Path | None) -> int | None:
    """Sessions one GPU renders at 25 fps: the largest batch b with fps(b) >= 25 b."""
    if gpu_json is None:
        return None
    data = json.loads(gpu_json.read_text().strip().splitlines()[-1])
    table = data.get("wav2lip_fps") or data.get("gpu", {}).get("wav2lip_fps") or {}
    fits = [int(b) for b, fps in table.items() if fps is not None and float(fps) >= FPS * int(b)]
    return max(fits) if fits else 0


def model(by_processes: dict[str, int], split_ms: dict, cores: int, cores_used: float,
          gpu: int | None) -> dict:
    per_process = by_processes.get("1", 0)
    total_ms = split_ms.get("total")
    if not total_ms or not per_process:
        return {}
    per_session_cores = total_ms * FPS / 1000.0
    usable = min(1.0, max(0.5, cores_used / cores))

    def predict(c: int) -> int:
        return min(c * per_process, math.floor(c * usable / per_session_cores))

    out = {"per_session_cores": round(per_session_cores, 3), "per_process_sessions": per_process,
           "usable_share_of_cores": round(usable, 2),
           "predicted_default_sessions_by_cores": {str(c): predict(c) for c in (2, 4, 8, 16, 32, 64)}}
    if gpu is not None:
        out["gpu_wav2lip_sessions_per_gpu"] = gpu
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", default=None, help="process counts, e.g. 1,2 (default: 1 .. cores)")
    parser.add_argument("--renderers", default="default,wav2lip")
    parser.add_argument("--trial-s", type=float, default=4.0)
    parser.add_argument("--input", choices=["mic", "push"], default="mic",
                        help="mic: each session's speech arrives as a browser's Opus packets, decoded as the server "
                             "decodes a microphone (default); push: PCM pushed at the clip's rate (a TTS)")
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="the server's --event-loop the sessions run on (default uvloop, as the server)")
    parser.add_argument("--max-sessions", type=int, default=12)
    parser.add_argument("--max-wav2lip-sessions", type=int, default=4)
    parser.add_argument("--gpu-json", type=Path, default=None, help="bench/gpu_check.py or bench/sessions.py JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--renderer", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.child:
        logging.getLogger().setLevel(logging.WARNING)
        return child(args.renderer, args.sessions, args.start_at, args.trial_s, args.input == "mic", args.event_loop)

    cores = len(os.sched_getaffinity(0))
    counts = [int(p) for p in (args.processes or ",".join(str(i) for i in range(1, cores + 1))).split(",")]
    renderers = [r.strip() for r in args.renderers.split(",") if r.strip()]
    load_start = os.getloadavg()
    log.info("%d cores, processes %s, renderers %s, load %s", cores, counts, renderers, load_start)
    runs: list[dict] = []
    by_processes: dict[str, dict[str, int]] = {r: {} for r in renderers}
    best_runs: dict[str, dict | None] = {}
    for renderer in renderers:
        limit = args.max_sessions if renderer == "default" else args.max_wav2lip_sessions
        for p in counts:
            n, run = search(renderer, p, limit, args.trial_s, runs, args.input, args.event_loop)
            by_processes[renderer][str(p)] = n
            if p == 1:  # the CPU split: the largest passing 1-process run, else its first try (CPU per frame
                # is measured whether or not the trial kept 25 fps)
                best_runs[renderer] = run or next((r for r in runs if r["renderer"] == renderer
                                                   and r["processes"] == 1), None)
    default_runs = [r for r in runs if r["renderer"] == "default" and r["ok"]]
    busiest = max(default_runs, key=lambda r: r["cores_used"], default=None)
    split_ms = cpu_split(best_runs.get("default"))
    result = {
        "sessions_25fps_by_processes": by_processes.get("default", {}),
        "wav2lip_sessions_25fps": max(by_processes.get("wav2lip", {}).values(), default=None),
        "wav2lip_sessions_25fps_by_processes": by_processes.get("wav2lip", {}),
        "cpu_ms_per_frame": split_ms,
        "cores_used": None if busiest is None else busiest["cores_used"],
        "cores": cores,
        "event_loop": args.event_loop,
        "model": model(by_processes.get("default", {}), split_ms, cores,
                       0.0 if busiest is None else busiest["cores_used"], gpu_sessions(args.gpu_json)),
        "loadavg": [load_start, os.getloadavg()],
        "runs": runs,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

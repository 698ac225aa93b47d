"""What `--workers` costs at start and per operator request: one process against the default (auto).

For each setting, `run_server.py` (embedded avatar, no-weights renderer) is started `--trials` times and
measured until every worker serves: seconds to the first `/healthz` 200, seconds until every worker process
is ready (the board in `/healthz` `worker_processes`), the resident memory of the whole process tree then,
and the median time of `GET /sessions` and `GET /metrics`, which with several workers ask every other worker
(server/ops/worker_peers.py). The last line printed is one JSON object.

    PYTHONPATH=. .venv/bin/python bench/startup.py --trials 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import REPO, loadavg, start_server

SETTINGS = {"workers_1": ["--workers", "1"], "default": []}


def get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants."""
    pids, frontier = [pid], [pid]
    while frontier:
        out = subprocess.run(["pgrep", "-P", ",".join(map(str, frontier))], capture_output=True, text=True).stdout
        frontier = [int(p) for p in out.split()]
        pids += frontier
    kb = 0
    for p in pids:
        try:
            kb += next(int(line.split()[1]) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                       if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
    return kb / 1024


def one_start(args: list[str], folder: Path, requests: int) -> dict:
    t0 = time.monotonic()
    server = start_server(args, folder / "server.log", timeout_s=300, repo=REPO)
    try:
        first = ready = None
        while ready is None:
            status, body = get(server.endpoint("/healthz"))
            now = time.monotonic() - t0
            if status == 200:
                first = first if first is not None else now
                rows = json.loads(body).get("worker_processes")
                if rows is None or all(r["ready"] for r in rows):
                    ready = now
            if now > 300:
                raise SystemExit("the server never became ready")
            time.sleep(0.05)
        out = {"first_healthz_s": round(first or ready, 2), "all_ready_s": round(ready, 2),
               "rss_mb": round(tree_rss_mb(server.proc.pid))}
        for path in ("/sessions", "/metrics"):
            took = []
            for _ in range(requests):
                start = time.perf_counter()
                status, _ = get(server.endpoint(path))
                assert status == 200, (path, status)
                took.append((time.perf_counter() - start) * 1000)
            out[f"{path.strip('/')}_ms_p50"] = round(statistics.median(took), 2)
        return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20, help="GET /sessions and /metrics each, per start")
    options = parser.parse_args()
    results: dict = {"load_before": loadavg()}
    with tempfile.TemporaryDirectory(prefix="lipsync-startup-") as tmp:
        for trial in range(options.trials):
            for name, args in SETTINGS.items():  # alternating, so the machine's load hits both alike
                folder = Path(tmp) / f"{name}-{trial}"
                folder.mkdir()
                run = one_start(args, folder, options.requests)
                print(name, run, flush=True)
                results.setdefault(name, []).append(run)
    summary = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items() if name in SETTINGS}
    print(json.dumps({"startup": summary, "trials": options.trials, "load_after": loadavg(),
                      "load_before": results["load_before"]}))


if __name__ == "__main__":
    main()

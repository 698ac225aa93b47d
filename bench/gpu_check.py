"""GPU serving check, one command: fp16 Wav2Lip with and without CUDA graphs, accuracy, and N sessions.

    python bench/gpu_check.py [--budget-s 200] [--trial-s 4] [--sessions 8,32,64,128]
    python bench/gpu_check.py --smoke        # CPU, tiny sizes: checks the script itself

Random calibrated weights (bench.generator.realistic_random_wav2lip; NOT the released checkpoints), the
embedded default avatar, official mel windows of espeak-ng speech (a synthetic voiced signal when
espeak-ng is missing). On CUDA, in order:

1. Prepare: an fp16 `Wav2LipRenderer` with CUDA graphs (models/static_batches.py: fixed batch sizes,
   static and pinned buffers, one graph per size) and one without (the eager path); prepare time
   (graph capture included), the captured sizes, and a capture failure's reason if any.
2. Throughput: `render()` frames/s at batch 1, 8, 32, 64, 128 for both (uint8 patches on the host).
3. Accuracy over the whole clip vs the fp32 eager official model on the GPU: PSNR (dB) and max |diff|
   of the uint8 patches over the generated rows 36..95; and graphs vs eager fp16 max |diff|.
4. Sessions: N LipSyncSessions (N = 8, 32, 64, 128) on one ThreadedRenderWorker per renderer, configured
   as the server does on CUDA (max_batch = the renderer's, a warm-up cost curve up to it), driven by
   bench.sessions.trial (speech pushed in 20 ms chunks, 25 fps pulls, one driver thread, sessions'
   ticks aligned): mean batch, drops, latency p95 vs the fixed budget, and the driver's overrun (when
   one Python thread cannot drive N sessions in real time the figures say more about it than the GPU).
   Trials stop at the first failing N, or when `--budget-s` is nearly spent.

Every step logs a line; the last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import TEXT, make_speech
from bench.generator import realistic_random_wav2lip
from bench.sessions import eager_uint8, psnr, to_16k, trial
from realtime.config import EngineConfig
from realtime.mel import mel_windows, melspectrogram
from realtime.renderers.wav2lip import PASTED_ROWS_FROM, Wav2LipRenderer
from realtime.scheduler import ThreadedRenderWorker
from server.realtime_engine import gpu_curve_sizes

log = logging.getLogger("bench.gpu_check")
# The PyTorch path on every device (a CPU renderer may otherwise pick another runtime).
TORCH = {"runtime": "torch"} if "runtime" in inspect.signature(Wav2LipRenderer).parameters else {}


def synthetic_speech(seconds: float = 6.0, rate: int = 16000) -> tuple[np.ndarray, int]:
    """A voiced, syllable-modulated signal (glottal pulses through two formant resonators) that voice
    activity detection takes for speech: the fallback when espeak-ng is not installed."""
    rng = np.random.default_rng(0)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    pulses = (np.diff(np.floor(np.cumsum(f0) / rate), prepend=0) > 0).astype(np.float64)
    x = pulses + 0.02 * rng.standard_normal(n)
    for formant, bw in ((700, 130), (1200, 200)):
        r = np.exp(-np.pi * bw / rate)
        a1, a2 = -2 * r * np.cos(2 * np.pi * formant / rate), r * r
        y = np.zeros(n)
        for i in range(2, n):  # a few seconds at 16 kHz: fine in Python for a one-off
            y[i] = x[i] - a1 * y[i - 1] - a2 * y[i - 2]
        x = y
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 0.5
    x *= envelope
    return (0.3 * x / np.abs(x).max()).astype(np.float32), rate


def speech_clip(synthetic: bool) -> tuple[np.ndarray, int, str]:
    if not synthetic:
        try:
            wav, rate = make_speech(TEXT, 1)
            return wav, rate, "espeak-ng"
        except SystemExit as exc:  # make_speech exits when espeak-ng is missing
            log.warning("%s; using a synthetic voiced signal", exc)
    wav, rate = synthetic_speech()
    return wav, rate, "synthetic"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fps_at(renderer: Wav2LipRenderer, avatar, mels: np.ndarray, batch: int, device: torch.device,
           min_s: float) -> float:
    """Frames/s of renderer.render at one batch size: 3 warm-up calls, then calls for >= min_s."""
    n_frames = len(avatar.frames)
    idx = np.arange(batch) % n_frames
    win = mels[np.arange(batch) % len(mels)]
    for _ in range(3):
        renderer.render(avatar, idx, win)
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        renderer.render(avatar, idx, win)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s and calls >= 5:
            break
    sync(device)
    return round(calls * batch / (time.perf_counter() - t0), 1)


def patches(renderer: Wav2LipRenderer, avatar, idx: np.ndarray, mels: np.ndarray, chunk: int) -> np.ndarray:
    return np.stack([p.image for s in range(0, len(mels), chunk)
                     for p in renderer.render(avatar, idx[s:s + chunk], mels[s:s + chunk])])


def accuracy(ref_model, renderers: dict[str, Wav2LipRenderer], avatar, crops, mels, device, chunk: int) -> dict:
    idx = np.arange(len(mels)) % len(crops)
    ref = np.concatenate([eager_uint8(ref_model, crops[idx[s:s + chunk]], mels[s:s + chunk], str(device))
                          for s in range(0, len(mels), chunk)])
    rows = PASTED_ROWS_FROM
    got = {name: patches(r, avatar, idx, mels, chunk) for name, r in renderers.items()}
    out: dict = {"frames": len(mels), "rows": f"{rows}..95"}
    for name, img in got.items():
        diff = np.abs(img[:, rows:].astype(int) - ref[:, rows:])
        out[name] = {"psnr_db": round(float(psnr(img[:, rows:], ref[:, rows:])), 2),
                     "max_abs_diff": int(diff.max())}
    names = list(got)
    if len(names) == 2:
        a, b = got[names[0]], got[names[1]]
        out[f"{names[0]}_vs_{names[1]}_max_abs_diff"] = int(np.abs(a.astype(int) - b).max())
    return out


def runner_info(renderer: Wav2LipRenderer) -> dict:
    runners = getattr(renderer, "_runners", {})
    if not runners:
        return {"static_batches": False}
    runner = next(iter(runners.values()))
    return {"static_batches": True, "buckets": list(runner.buckets), "captured": list(runner.captured),
            "fallback_reason": runner.fallback_reason}


def session_trials(renderer: Wav2LipRenderer, avatar, wav: np.ndarray, rate: int, counts: list[int],
                   deadline: float, est_trial_s: float) -> list[dict]:
    """bench.sessions.trial for each N, on a worker set up as the server sets up a CUDA worker."""
    max_batch = renderer.max_batch
    config = EngineConfig(fps=25.0, fit_budget_to_renderer=True, max_batch=max_batch)
    worker = ThreadedRenderWorker(renderer, max_batch=max_batch, max_wait_s=config.max_batch_wait_ms / 1000)
    worker.curve_sizes = gpu_curve_sizes(max_batch)
    out: list[dict] = []
    try:
        worker.prepare(avatar, warmup=True)
        curve = {str(b): round(1000 * s, 2) for b, s in sorted(worker.cost.by_size.items())}
        log.info("  warm-up cost curve (ms per batch): %s", curve)
        for n in counts:
            if time.monotonic() + est_trial_s > deadline:
                out.append({"sessions": n, "skipped": "time budget"})
                log.info("  N=%d skipped: time budget", n)
                continue
            before = worker.stats()
            t0 = time.monotonic()
            res = trial(worker, avatar, config, wav, rate, n)
            wall = time.monotonic() - t0
            after = worker.stats()
            batches = after["batches"] - before["batches"]
            frames = after["frames_rendered"] - before["frames_rendered"]
            res.update({"mean_batch": round(frames / batches, 2) if batches else 0.0,
                        "worker_skipped": after["frames_skipped"] - before["frames_skipped"],
                        "driver_overrun_s": round(wall - (len(wav) / rate + 0.6), 2),
                        "cost_curve_ms": curve})
            out.append(res)
            log.info("  N=%3d ok=%s mean batch %.1f, drops %d/%d, latency p95 %.0f ms (budget %.0f), "
                     "driver overrun %.2f s", n, res["ok"], res["mean_batch"], res["drops"],
                     res["speech_frames"], res["latency_p95_ms"], res["latency_budget_ms"],
                     res["driver_overrun_s"])
            if not res["ok"]:
                break
    finally:
        worker.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (checks the script)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new steps after this")
    parser.add_argument("--trial-s", type=float, default=4.0, help="seconds of speech per sessions trial")
    parser.add_argument("--sessions", default="8,32,64,128", help="session counts to try")
    parser.add_argument("--synthetic-speech", action="store_true", help="do not use espeak-ng")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        log.error("no CUDA device: run with --smoke to check the script on a CPU")
        print(json.dumps({"error": "no CUDA device"}), flush=True)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    precision = "fp16" if cuda else "fp32"
    batches = (1, 8, 32, 64, 128) if cuda else (1, 2, 4)
    max_batch = 128 if cuda else 4
    counts = [int(c) for c in args.sessions.split(",") if c.strip()] if cuda else [1]
    trial_s = args.trial_s if cuda else 1.0
    min_fps_s = 0.5 if cuda else 0.2
    gpu_name = torch.cuda.get_device_name(device) if cuda else "none (smoke run on CPU)"
    log.info("device %s, torch %s, precision %s", gpu_name, torch.__version__, precision)

    from realtime.default_avatar import load_default_avatar

    avatar = load_default_avatar()
    crops = avatar.face_crops(96)
    wav, rate, speech_kind = speech_clip(args.synthetic_speech)
    mels = mel_windows(melspectrogram(to_16k(wav, rate)), 25.0)
    if args.smoke:
        mels = mels[:12]
    log.info("avatar %d frames, clip %.1f s (%s) -> %d mel windows", len(crops), len(wav) / rate,
             speech_kind, len(mels))

    model = realistic_random_wav2lip()
    renderers: dict[str, Wav2LipRenderer] = {}
    prepare_s: dict[str, float] = {}
    for name, graphs in (("graphs", True), ("eager", False)):
        r = Wav2LipRenderer(model, device=device, precision=precision, max_batch=max_batch, cuda_graphs=graphs,
                            **TORCH)
        if not cuda and graphs:
            r.static_batches = True  # smoke: the same fixed sizes and buffers, run eagerly on the CPU
        t0 = time.monotonic()
        r.prepare(avatar)
        sync(device)
        prepare_s[name] = round(time.monotonic() - t0, 2)
        renderers[name] = r
        log.info("prepared %-6s in %.2f s: %s", name, prepare_s[name], runner_info(r))

    fps: dict[str, dict[str, float]] = {name: {} for name in renderers}
    for b in batches:
        for name, r in renderers.items():
            fps[name][str(b)] = fps_at(r, avatar, mels, b, device, min_fps_s)
        log.info("batch %3d: %s", b, "  ".join(f"{name} {fps[name][str(b)]:8.1f} fps" for name in renderers))

    ref_model = copy.deepcopy(model).to(device)  # fp32 eager official model, the reference
    acc = accuracy(ref_model, renderers, avatar, crops, mels, device, chunk=max_batch)
    del ref_model
    log.info("accuracy vs fp32 eager: %s", acc)

    sessions: dict[str, list[dict]] = {}
    trial_wav = wav[: int(trial_s * rate)]
    est_trial_s = trial_s + 0.6 + 2.0
    for name, r in renderers.items():
        log.info("sessions on the %s renderer:", name)
        sessions[name] = session_trials(r, avatar, trial_wav, rate, counts, deadline, est_trial_s)

    memory = None
    if cuda:
        memory = {"max_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20),
                  "max_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20)}
    speedup = {b: round(fps["graphs"][b] / fps["eager"][b], 2) for b in fps["graphs"] if fps["eager"][b]}
    for name in renderers:
        print(f"{name:6s} " + "  ".join(f"B={b}: {v:8.1f} fps" for b, v in fps[name].items()))
    print("graphs/eager speed-up per batch: " + "  ".join(f"B={b}: {v}x" for b, v in speedup.items()))
    for name in renderers:
        print(f"{name:6s} PSNR {acc[name]['psnr_db']} dB vs fp32 eager (rows {acc['rows']}), "
              f"max|diff| {acc[name]['max_abs_diff']}")
        best = max((t["sessions"] for t in sessions[name] if t.get("ok")), default=0)
        print(f"{name:6s} sustains {best} session(s) at 25 fps in this run")
    result = {
        "device": gpu_name, "torch": torch.__version__, "precision": precision, "smoke": bool(args.smoke),
        "speech": speech_kind, "prepare_s": prepare_s,
        "static_batches": {name: runner_info(r) for name, r in renderers.items()},
        "fps": fps, "graphs_speedup": speedup, "accuracy": acc, "sessions": sessions, "memory": memory,
        "weights": "random, calibrated (not the released checkpoints)",
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

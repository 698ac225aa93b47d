"""GPU serving check, one command: fp16 Wav2Lip with and without CUDA graphs, accuracy, and N sessions.

    python bench/gpu_check.py [--budget-s 200] [--trial-s 4] [--sessions 8,32,64,128]
    python bench/gpu_check.py --smoke        # CPU, tiny sizes: checks the script itself

Random calibrated weights (bench.generator.realistic_random_wav2lip; NOT the released checkpoints), the
embedded default avatar, official mel windows of espeak-ng speech (a synthetic voiced signal when
espeak-ng is missing). On CUDA, in order:

1. Prepare: a `Wav2LipRenderer` (precision "auto": fp16 once its start-up check against real fp32
   passes, else fp32) with CUDA graphs (models/static_batches.py: fixed batch sizes, static and pinned
   buffers, one graph per size, each replay verified against eager) and one without (the eager path);
   prepare time (gate, capture and check included), the captured sizes, each size's replay-vs-eager
   difference, a capture failure's reason if any, and `describe()` (what /healthz shows).
2. Throughput: `render()` frames/s at batch 1, 8, 32, 64, 128 for both (uint8 patches on the host).
3. Accuracy over the whole clip vs the fp32 eager official model on the GPU with TF32 off (a real fp32
   reference): PSNR (dB) and max |diff| of the uint8 patches over the generated rows 36..95 for both,
   and for `--precision fp32` (must be within a level or so of the reference); graphs vs eager max |diff|.
4. Sessions: N LipSyncSessions (N = 8, 32, 64, 128) on one ThreadedRenderWorker per renderer, configured
   as the server does on CUDA (max_batch = the renderer's, a warm-up cost curve up to it), driven by
   bench.common.trial (speech pushed in 20 ms chunks, 25 fps pulls, one driver thread, sessions'
   ticks aligned): mean batch, drops, latency p95 vs the fixed budget, and the driver's overrun (when
   one Python thread cannot drive N sessions in real time the figures say more about it than the GPU).
   Trials stop at the first failing N, or when `--budget-s` is nearly spent.

Every step logs a line; the last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only modules that import without PyAV, aiortc and webrtcvad (a fresh GPU machine may lack them):
# what needs them (the avatar decoder, the sessions) is imported where it is used.
from bench.common import eager_uint8, psnr, realistic_random_wav2lip, session_trials, speech_clip, sync, to_16k
from models.cuda_numerics import tf32_enabled
from realtime.audio.mel import mel_windows, melspectrogram
from realtime.renderers.wav2lip import PASTED_ROWS_FROM, Wav2LipRenderer

log = logging.getLogger("bench.gpu_check")
# The PyTorch path on every device (a CPU renderer may otherwise pick another runtime).
TORCH = "torch"
SMOKE_FRAMES = 4


def fps_at(renderer: Wav2LipRenderer, avatar, mels: np.ndarray, batch: int, device: torch.device,
           min_s: float, warmup: int = 3, min_calls: int = 5) -> float:
    """Frames/s of renderer.render at one batch size: `warmup` calls, then calls for >= min_s."""
    n_frames = len(avatar.frames)
    idx = np.arange(batch) % n_frames
    win = mels[np.arange(batch) % len(mels)]
    for _ in range(warmup):
        renderer.render(avatar, idx, win)
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        renderer.render(avatar, idx, win)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s and calls >= min_calls:
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
    if "graphs" in got and "eager" in got:
        out["graphs_vs_eager_max_abs_diff"] = int(np.abs(got["graphs"].astype(int) - got["eager"]).max())
    return out


def runner_info(renderer: Wav2LipRenderer) -> dict:
    runners = getattr(renderer, "_runners", {})
    if not runners:
        return {"static_batches": False}
    runner = next(iter(runners.values()))
    return {"static_batches": True, "buckets": list(runner.buckets), "captured": list(runner.captured),
            "replay_vs_eager_max_diff": {str(n): d for n, d in runner.verified.items()},
            "fallback_reason": runner.fallback_reason}


def first_frames(avatar: Any, n: int) -> Any:
    """The avatar cut to its first n frames (the smoke run: the CPU encodes 200 frames in ~45 s)."""
    from realtime.avatars.avatar import Avatar

    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[:n]

    return Avatar(frames=avatar.frames[:n], boxes=avatar.boxes[:n], mouth=cut(avatar.mouth), fps=avatar.fps,
                  loop=avatar.loop, source=avatar.source, masks=cut(avatar.masks))


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
    precision = "auto" if cuda else "fp32"
    batches = (1, 8, 32, 64, 128) if cuda else (1,)
    max_batch = 128 if cuda else 4
    counts = [int(c) for c in args.sessions.split(",") if c.strip()] if cuda else [1]
    trial_s = args.trial_s if cuda else 1.0
    min_fps_s = 0.5 if cuda else 0.2
    gpu_name = torch.cuda.get_device_name(device) if cuda else "none (smoke run on CPU)"
    log.info("device %s, torch %s, precision %s", gpu_name, torch.__version__, precision)

    from realtime.avatars.default_avatar import load_default_avatar

    avatar = load_default_avatar()
    if args.smoke:
        avatar = first_frames(avatar, SMOKE_FRAMES)
    crops = avatar.face_crops(96)
    wav, rate, speech_kind = speech_clip(args.synthetic_speech)
    mels = mel_windows(melspectrogram(to_16k(wav, rate)), 25.0)
    if args.smoke:
        mels = mels[:3]
    log.info("avatar %d frames, clip %.1f s (%s) -> %d mel windows", len(crops), len(wav) / rate,
             speech_kind, len(mels))

    model = realistic_random_wav2lip()
    renderers: dict[str, Wav2LipRenderer] = {}
    prepare_s: dict[str, float] = {}
    for name, graphs in (("graphs", True), ("eager", False)):
        r = Wav2LipRenderer(model, device=device, precision=precision, max_batch=max_batch, cuda_graphs=graphs,
                            runtime=TORCH)
        if not cuda and graphs:
            r.static_batches = True  # smoke: the same fixed sizes and buffers, run eagerly on the CPU
        t0 = time.monotonic()
        r.prepare(avatar)
        sync(device)
        prepare_s[name] = round(time.monotonic() - t0, 2)
        renderers[name] = r
        log.info("prepared %-6s in %.2f s: %s %s", name, prepare_s[name], runner_info(r), r.describe())

    fps: dict[str, dict[str, float]] = {name: {} for name in renderers}
    for b in batches:
        for name, r in renderers.items():
            fps[name][str(b)] = (fps_at(r, avatar, mels, b, device, min_fps_s) if cuda
                                 else fps_at(r, avatar, mels, b, device, 0.0, warmup=1, min_calls=1))
        log.info("batch %3d: %s", b, "  ".join(f"{name} {fps[name][str(b)]:8.1f} fps" for name in renderers))

    checked = dict(renderers)
    if cuda:  # --precision fp32 on CUDA must be real fp32 (TF32 off): within ~1 level of the reference
        fp32 = Wav2LipRenderer(model, device=device, precision="fp32", max_batch=max_batch, cuda_graphs=False,
                               runtime=TORCH)
        fp32.prepare(avatar)
        checked["fp32"] = fp32
    ref_model = copy.deepcopy(model).to(device)  # fp32 eager official model (TF32 off), the reference
    acc = accuracy(ref_model, checked, avatar, crops, mels, device, chunk=max_batch)
    del checked
    del ref_model
    log.info("accuracy vs fp32 eager: %s", acc)

    sessions: dict[str, list[dict]] = {}
    trial_wav = wav[: int(trial_s * rate)]
    est_trial_s = trial_s + 0.6 + 2.0
    for name, r in renderers.items():
        if not cuda and name != "graphs":
            continue  # smoke: one renderer's trial checks the code path
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
        best = max((t["sessions"] for t in sessions.get(name, []) if t.get("ok")), default=0)
        print(f"{name:6s} sustains {best} session(s) at 25 fps in this run")
    result = {
        "device": gpu_name, "torch": torch.__version__, "precision": precision, "smoke": bool(args.smoke),
        "speech": speech_kind, "prepare_s": prepare_s, "reference": "fp32 eager, TF32 off",
        "tf32_after_checks": tf32_enabled() if cuda else None,
        "engine_info": {name: r.describe() for name, r in renderers.items()},
        "static_batches": {name: runner_info(r) for name, r in renderers.items()},
        "fps": fps, "graphs_speedup": speedup, "accuracy": acc, "sessions": sessions, "memory": memory,
        "weights": "random, calibrated (not the released checkpoints)",
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

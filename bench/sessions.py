"""One run, one machine: Wav2Lip generator speed, accuracy of the fast variants, and live sessions at 25 fps.

    python bench/sessions.py [--rounds 3] [--trial-s 4] [--max-sessions 16] [--threads 2] [--seeds 0,1,2]

Random weights, seeded and calibrated (bench.generator.realistic_random_wav2lip: He init + BatchNorm
statistics calibrated on random inputs, so the output spans (0, 1)); NOT the released checkpoints.
Inputs are real: the embedded default avatar's 96x96 face crops and official mel windows of espeak-ng
speech.

1. Throughput (frames/s, best round of `--rounds`, variants interleaved) at batch 1, 8, 32:
   - eager: the official inference per batch: faces_to_input + the fp32 Wav2Lip forward (face encoder
     included) under no_grad + the uint8 conversion.
   - wav2lip: `Wav2LipRenderer.render` as the server runs it on CPU by default: OpenVINO, the precision
     its start-up gate chose for these weights (bf16 only if >= 35 dB from fp32 and faster here),
     cached encoder, decoder rows [36, 96) only; uint8 patches out.
   - wav2lip-torch-fp32 / wav2lip-ov-fp32 / wav2lip-ov-bf16: the same renderer pinned to one runtime and
     precision; wav2lip-full: the default with whole patches (rows_from=0, for --paste-mode official).
2. Accuracy vs fp32 eager over the whole speech clip (one frame per 40 ms window): PSNR (dB) and
   max |diff| (uint8 levels) of the uint8 patches over the rows the feathered paste shows (36..95) and
   over the mouth rows (48..95); and for every weight seed of `--seeds`, what the gate chose and the
   PSNR the default renderer then gives.
3. Live sessions at 25 fps, per renderer (default = no weights, and wav2lip):
   - with encoding (the reported count): bench/encoded_sessions.py, the server's own engine and tracks
     with aiortc's VP8 (or --codec) and Opus encoders, N sessions at once;
   - engine only: N LipSyncSession objects on one shared ThreadedRenderWorker, pushed the speech in
     20 ms chunks and pulled at 25 fps by the wall clock.
   A trial fails when more than 2% of speech frames are dropped (or, encoded, 2% of video ticks missed
   or late), or a session's latency p95 exceeds its fixed latency budget plus half a frame. Each trial
   lasts `--trial-s` seconds of speech; N steps 1-6, 8, 10, 12, 16, .. up to --max-sessions (the largest
   N that passed before the first failure is reported).
4. With CUDA present: the eager fp32 / renderer fp16 throughput and accuracy on the GPU too, and sessions at
   25 fps on one GPU worker (bench.common.session_trials, as bench/gpu_check.py; device name printed).

Last line: one JSON object, {"eager_fps": {batch: fps}, "wav2lip_fps": {batch: fps}, "wav2lip_psnr_db":
dB (default renderer, rows 36..95), "default_sessions_25fps": N, "wav2lip_sessions_25fps": N, "device": ..,
...details}; fps are dicts per batch ("1", "8", "32").
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TEXT, eager_uint8, make_speech, psnr, realistic_random_wav2lip, session_trials, to_16k, trial
from bench.encode_path import sessions_with_encode
from models.wav2lip import Wav2Lip
from realtime.audio.mel import mel_windows, melspectrogram
from realtime.config import EngineConfig
from realtime.renderers.wav2lip import Wav2LipRenderer
from realtime.scheduling.scheduler import ThreadedRenderWorker

log = logging.getLogger("bench.sessions")
BATCHES = (1, 8, 32)
BATCHES_STR = [str(b) for b in BATCHES]
MOUTH_ROWS = 48
SESSION_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)  # concurrent sessions tried, in order


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def best_fps(fns: dict[str, callable], frames: int, rounds: int) -> dict[str, float]:
    """Interleaved rounds, best per name; each call renders `frames` frames."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: round(frames / s, 2) for name, s in best.items()}


def throughput(model, renderers, avatar, crops, mels, rounds, device="cpu") -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {name: {} for name in ["eager", *renderers]}
    n = len(crops)
    for batch in BATCHES:
        calls = max(1, 16 // batch)  # >= 16 frames per timed call at small batches
        idx = [np.arange(c * batch, (c + 1) * batch) % n for c in range(calls)]
        win = [mels[np.arange(c * batch, (c + 1) * batch) % len(mels)] for c in range(calls)]
        fns = {"eager": lambda idx=idx, win=win: [eager_uint8(model, crops[i], w, device)
                                                  for i, w in zip(idx, win, strict=True)]}
        for name, r in renderers.items():
            fns[name] = (lambda r=r, idx=idx, win=win: [r.render(avatar, i, w) for i, w in zip(idx, win, strict=True)])
        for name, fps in best_fps(fns, calls * batch, rounds).items():
            out[name][str(batch)] = fps
        log.info("batch %2d: %s", batch, "  ".join(f"{k} {v[str(batch)]:.1f} fps" for k, v in out.items()))
    return out


def accuracy(model, renderers, avatar, crops, mels) -> dict[str, dict[str, float]]:
    idx = np.arange(len(mels)) % len(crops)
    ref = np.concatenate([eager_uint8(model, crops[idx[s:s + 32]], mels[s:s + 32]) for s in range(0, len(mels), 32)])
    out = {}
    for name, r in renderers.items():
        got = np.stack([p.image for s in range(0, len(mels), 32)
                        for p in r.render(avatar, idx[s:s + 32], mels[s:s + 32])])
        rows = r.rows_from
        out[name] = {
            "frames": len(mels),
            "psnr_db_pasted_rows": round(psnr(got[:, rows:], ref[:, rows:]), 2),
            "max_abs_diff_pasted_rows": int(np.abs(got[:, rows:].astype(int) - ref[:, rows:]).max()),
            "psnr_db_mouth_rows": round(psnr(got[:, MOUTH_ROWS:], ref[:, MOUTH_ROWS:]), 2),
            "max_abs_diff_mouth_rows": int(np.abs(got[:, MOUTH_ROWS:].astype(int) - ref[:, MOUTH_ROWS:]).max()),
            "pasted_rows": f"{rows}..95",
        }
        log.info("accuracy %-13s %s", name, out[name])
    return out


def sessions_at_25fps(renderer, avatar, wav, rate, max_n: int) -> tuple[int, list[dict]]:
    config = EngineConfig(fps=25.0, fit_budget_to_renderer=True)
    worker = ThreadedRenderWorker(renderer, max_batch=config.max_batch, max_wait_s=config.max_batch_wait_ms / 1000)
    trials: list[dict] = []
    best = 0
    try:
        worker.prepare(avatar, warmup=True)
        for n in [n for n in SESSION_STEPS if n <= max_n]:
            res = trial(worker, avatar, config, wav, rate, n)
            trials.append(res)
            log.info("sessions %-13s %s", getattr(renderer, "name", "?"), res)
            if not res["ok"]:
                break
            best = n
    finally:
        worker.close()
    return best, trials


def seed_accuracy(seed: int, avatar, crops, mels) -> dict:
    """Another weight draw: what the default renderer's start-up gate chooses, and the PSNR it then gives."""
    model = realistic_random_wav2lip(seed)
    auto, bf16 = Wav2LipRenderer(model), Wav2LipRenderer(model, runtime="openvino", precision="bf16")
    auto.prepare(avatar)
    bf16.prepare(avatar)
    acc = accuracy(model, {"wav2lip": auto, "wav2lip-ov-bf16": bf16}, avatar, crops, mels)
    info = auto.describe()
    out = {"gate": info.get("precision_gate"), "precision": info["precision"],
           "psnr_db": acc["wav2lip"]["psnr_db_pasted_rows"],
           "bf16_psnr_db": acc["wav2lip-ov-bf16"]["psnr_db_pasted_rows"]}
    log.info("seed %d: %s", seed, out)
    return out


def gpu_section(model: Wav2Lip, avatar, crops, mels, rounds: int, wav: np.ndarray, rate: int,
                device: str = "cuda") -> dict:
    name = torch.cuda.get_device_name(0) if device == "cuda" else device
    log.info("GPU: %s", name)
    gmodel = copy.deepcopy(model).to(device)
    renderer = Wav2LipRenderer(gmodel, device=device)  # fp16, rows 36..95
    renderer.prepare(avatar)

    def sync(fn):
        def run():
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return out
        return run

    out: dict[str, dict[str, float]] = {"eager_fp32": {}, "wav2lip_fp16": {}}
    n = len(crops)
    for batch in BATCHES:
        idx = np.arange(batch) % n
        win = mels[np.arange(batch) % len(mels)]
        fns = {"eager_fp32": sync(lambda idx=idx, win=win: eager_uint8(gmodel, crops[idx], win, device)),
               "wav2lip_fp16": sync(lambda idx=idx, win=win: renderer.render(avatar, idx, win))}
        fps = best_fps(fns, batch, max(rounds, 5))
        for k, v in fps.items():
            out[k][str(batch)] = v
    acc = accuracy(model, {"wav2lip_fp16": renderer}, avatar, crops, mels)
    # Sessions at 25 fps on one GPU worker set up as the server sets up a CUDA worker (engine only:
    # at these counts the CPU side, not the GPU, is what runs out first on most machines).
    trials = session_trials(renderer, avatar, wav, rate, [8, 16, 32, 64, 128], time.monotonic() + 240.0,
                            len(wav) / rate + 2.0)
    sessions = max([t["sessions"] for t in trials if t.get("ok")], default=0)
    return {"device": name, "fps": out, "accuracy": acc, "sessions_25fps": sessions, "session_trials": trials}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trial-s", type=float, default=4.0, help="seconds of speech per sessions trial")
    parser.add_argument("--max-sessions", type=int, default=16, help="tries 1-6, 8, 10, 12, 16, .. up to this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sessions-renderers", default="default,wav2lip")
    parser.add_argument("--seeds", default="0,1,2", help="weight seeds for the accuracy / gate check")
    parser.add_argument("--codec", default="VP8", help="video codec of the encoded sessions trials")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    t_start = time.monotonic()

    from realtime.avatars.default_avatar import load_default_avatar

    avatar = load_default_avatar()
    crops = avatar.face_crops(96)
    wav, rate = make_speech(TEXT, 1)
    mels = mel_windows(melspectrogram(to_16k(wav, rate)), 25.0)
    log.info("cpu %s (%d cores, %d torch threads), clip %.1f s -> %d mel windows, avatar %d frames",
             cpu_name(), os.cpu_count() or 0, torch.get_num_threads(), len(wav) / rate, len(mels), len(crops))

    model = realistic_random_wav2lip()
    renderers = {
        "wav2lip": Wav2LipRenderer(model),  # the server's CPU default: OpenVINO, precision by the gate, rows 36..95
        "wav2lip-torch-fp32": Wav2LipRenderer(model, runtime="torch", precision="fp32"),
        "wav2lip-ov-fp32": Wav2LipRenderer(model, runtime="openvino", precision="fp32"),
        "wav2lip-ov-bf16": Wav2LipRenderer(model, runtime="openvino", precision="bf16"),
        "wav2lip-full": Wav2LipRenderer(model, rows_from=0),  # whole patch (--paste-mode official)
    }
    for r in renderers.values():
        r.prepare(avatar)
    chosen = renderers["wav2lip"].describe()
    log.info("default renderer: %s", chosen)
    fps = throughput(model, renderers, avatar, crops, mels, args.rounds)
    acc = accuracy(model, renderers, avatar, crops, mels)
    seeds = {0: {"gate": chosen.get("precision_gate"), "precision": chosen["precision"],
                 "psnr_db": acc["wav2lip"]["psnr_db_pasted_rows"],
                 "bf16_psnr_db": acc["wav2lip-ov-bf16"]["psnr_db_pasted_rows"]}}
    for seed in [int(x) for x in args.seeds.split(",") if x.strip() and int(x) != 0]:
        seeds[seed] = seed_accuracy(seed, avatar, crops, mels)

    trial_wav = wav[: int(args.trial_s * rate)]
    sessions: dict[str, dict] = {}
    for name in [n.strip() for n in args.sessions_renderers.split(",") if n.strip()]:
        if name == "default":
            from realtime.renderers.default import DefaultRenderer

            renderer = DefaultRenderer()
        else:
            renderer = renderers[name]
        n, trials = sessions_at_25fps(renderer, avatar, trial_wav, rate, args.max_sessions)
        n_enc, trials_enc = sessions_with_encode(renderer, avatar, trial_wav, rate, args.max_sessions, args.codec,
                                                 steps=SESSION_STEPS)
        sessions[name] = {"sessions_25fps": n_enc, "sessions_25fps_engine_only": n,
                          "trials": trials_enc, "trials_engine_only": trials}

    gpu = None
    if torch.cuda.is_available():
        try:
            gpu = gpu_section(model, avatar, crops, mels, args.rounds, trial_wav, rate)
        except Exception as exc:  # report, don't lose the CPU numbers
            log.exception("GPU section failed")
            gpu = {"error": repr(exc)}

    for name, v in fps.items():
        print(f"{name:14s} " + "  ".join(f"B={b}: {v[b]:6.2f} fps" for b in v)
              + (f"  ({v['1'] / fps['eager']['1']:.2f}x eager at B=1, "
                 f"{v['8'] / fps['eager']['8']:.2f}x at B=8)" if name != "eager" else ""))
    for name, v in acc.items():
        print(f"{name:14s} PSNR {v['psnr_db_pasted_rows']} dB (rows {v['pasted_rows']}), max|diff| "
              f"{v['max_abs_diff_pasted_rows']} levels; mouth rows 48..95: {v['psnr_db_mouth_rows']} dB")
    if gpu and "device" in gpu:
        print(f"GPU {gpu['device']}: " + "  ".join(f"{k} " + "/".join(f"{v:.0f}" for v in fps_b.values()) + " fps"
                                               for k, fps_b in gpu["fps"].items())
              + f" at B={'/'.join(BATCHES_STR)}; {gpu['sessions_25fps']} sessions at 25 fps on one worker")
    for seed, v in seeds.items():
        print(f"weights seed {seed}: default runs {v['precision']} ({v['psnr_db']} dB); "
              f"bf16 would give {v['bf16_psnr_db']} dB; gate: {v['gate']}")
    for name, v in sessions.items():
        print(f"{name:14s} sustains {v['sessions_25fps']} session(s) at 25 fps with {args.codec} + Opus "
              f"encoding ({v['sessions_25fps_engine_only']} engine only)")
    result = {
        "eager_fps": fps["eager"], "wav2lip_fps": fps["wav2lip"],
        "wav2lip_runtime": chosen,
        "wav2lip_psnr_db": acc["wav2lip"]["psnr_db_pasted_rows"],
        "default_sessions_25fps": sessions.get("default", {}).get("sessions_25fps"),
        "wav2lip_sessions_25fps": sessions.get("wav2lip", {}).get("sessions_25fps"),
        "gpu_wav2lip_sessions_25fps": gpu.get("sessions_25fps") if gpu else None,
        "device": f"cpu: {cpu_name()} ({os.cpu_count()} cores)"
                  + (f"; gpu: {gpu['device']}" if gpu and "device" in gpu else ""),
        "fps_unit": "frames/s per batch size (keys: batch)",
        "variants_fps": fps, "accuracy": acc,
        "sessions": {k: v["sessions_25fps"] for k, v in sessions.items()},
        "sessions_engine_only": {k: v["sessions_25fps_engine_only"] for k, v in sessions.items()},
        "codec": args.codec, "seeds": seeds,
        "session_trials": {k: v["trials"] for k, v in sessions.items()},
        "gpu": gpu, "weights": "random, calibrated (not the released checkpoints)",
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

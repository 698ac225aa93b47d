"""Helpers shared by the benches (one module, so that no bench imports another bench's script).

Importable with only torch, numpy and OpenCV installed: nothing here imports PyAV, aiortc or webrtcvad
at module level (a fresh GPU machine may lack them until scripts/gpu_check.sh installs them from
`.whl/`); what needs the engine imports it inside the function.
"""
from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.cuda_numerics import strict_fp32
from models.random_init import calibrated_random_
from models.wav2lip import Wav2Lip, faces_to_input, mels_to_input, to_uint8
from realtime.renderers.precision_gate import psnr_db as psnr

if TYPE_CHECKING:
    from realtime.timeline.session import LipSyncSession

log = logging.getLogger("bench.common")

REPO = Path(__file__).resolve().parents[1]

TEXT = ("Hello, and welcome. This is a short test of the real time lip sync engine, "
        "speaking a few sentences so that the mouth has something to do.")

__all__ = [
    "TEXT",
    "Server",
    "drive_many",
    "eager_uint8",
    "espeak_clip_16k",
    "espeak_or_vowels",
    "loadavg",
    "make_speech",
    "pcm16",
    "psnr",
    "realistic_random_wav2lip",
    "session_trials",
    "speech_clip",
    "start_server",
    "summary",
    "sync",
    "synthetic_speech",
    "to_16k",
    "trial",
    "wav_bytes",
]


def to_16k(wav: np.ndarray, rate: int) -> np.ndarray:
    """Linear-interpolation resample (good enough to make realistic mel windows for the accuracy check)."""
    n = round(len(wav) * 16000 / rate)
    return np.interp(np.arange(n) * (rate / 16000), np.arange(len(wav)), wav).astype(np.float32)


def eager_uint8(model: Wav2Lip, crops: np.ndarray, mels: np.ndarray, device: str = "cpu") -> np.ndarray:
    """The official fp32 inference (face encoder included) -> uint8 patches: the accuracy reference.
    On CUDA with TF32 off (models/cuda_numerics.py): otherwise cuDNN's default makes it a TF32 reference."""
    with torch.no_grad(), strict_fp32():
        return to_uint8(model(mels_to_input(mels).to(device), faces_to_input(crops).to(device)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """espeak-ng speech (bench/engine.py), else the synthetic voiced signal: (samples, rate, kind)."""
    if not synthetic:
        try:
            wav, rate = make_speech(TEXT, 1)
            return wav, rate, "espeak-ng"
        except (SystemExit, ImportError) as exc:  # make_speech exits when espeak-ng is missing
            log.warning("%s; using a synthetic voiced signal", exc)
    wav, rate = synthetic_speech()
    return wav, rate, "synthetic"


def drive_many(sessions: list[LipSyncSession], wav: np.ndarray, rate: int, seconds: float) -> None:
    """Every session pushed 20 ms chunks and pulled (audio every 20 ms, video every 1/fps) on the wall clock."""
    chunk = rate // 50
    period = 1.0 / sessions[0].fps
    t0 = time.monotonic()
    next_push = next_audio = 0.0
    next_video = 0.0
    pushed = 0
    while True:
        due = min(next_push if pushed < len(wav) else np.inf, next_audio, next_video)
        if due >= seconds:
            return
        delay = t0 + due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if pushed < len(wav) and next_push <= due:
            for s in sessions:
                s.push_audio(wav[pushed:pushed + chunk], rate)
            pushed += chunk
            next_push += 0.02
        if next_audio <= due:
            for s in sessions:
                s.next_audio(320)
            next_audio += 0.02
        if next_video <= due:
            for s in sessions:
                s.next_video_frame()
            next_video += period


def trial(worker: Any, avatar: Any, config: Any, wav: np.ndarray, rate: int, n: int) -> dict:
    """N LipSyncSessions on `worker` for the clip plus 0.6 s. ok: <= 2% of speech frames dropped and
    every session's latency p95 within its fixed budget plus half a frame."""
    from realtime.timeline.session import LipSyncSession  # needs PyAV and webrtcvad

    sessions = [LipSyncSession(avatar, worker, config, name=f"s{i}") for i in range(n)]
    try:
        drive_many(sessions, wav, rate, len(wav) / rate + 0.6)
        ms = [s.metrics() for s in sessions]
    finally:
        for s in sessions:
            s.close()
    speech = sum(m.frames_rendered + m.frames_dropped for m in ms)
    drops = sum(m.frames_dropped for m in ms)
    p95 = max((m.latency_ms.p95 or 0.0) for m in ms)
    budget = min(m.latency_budget_ms for m in ms)
    ok = speech > 0 and drops <= 0.02 * speech and p95 <= budget + 500.0 / config.fps
    return {"sessions": n, "ok": bool(ok), "speech_frames": speech, "drops": drops,
            "latency_p95_ms": round(p95, 1), "latency_budget_ms": round(budget, 1)}


def session_trials(renderer: Any, avatar: Any, wav: np.ndarray, rate: int, counts: list[int],
                   deadline: float, est_trial_s: float) -> list[dict]:
    """`trial` for each N, on a worker set up as the server sets up a CUDA worker (max_batch = the
    renderer's, a warm-up cost curve up to it); stops at the first failing N and skips the N that would
    end after `deadline` (time.monotonic())."""
    from realtime.config import EngineConfig
    from realtime.scheduling.scheduler import ThreadedRenderWorker
    from server.realtime_engine import gpu_curve_sizes

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
            batches = after.batches - before.batches
            frames = after.frames_rendered - before.frames_rendered
            res.update({"mean_batch": round(frames / batches, 2) if batches else 0.0,
                        "worker_skipped": after.frames_skipped - before.frames_skipped,
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


def make_speech(text: str, repeat: int) -> tuple[np.ndarray, int]:
    """espeak-ng speech as float32 mono at espeak's own rate (22.05 kHz)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("bench: espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-s", "160", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path), "rb") as w:
            rate, channels = w.getframerate(), w.getnchannels()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    wav = (pcm.reshape(-1, channels).mean(axis=1) / 32768.0).astype(np.float32)
    return np.tile(wav, repeat), rate

# -- live-server benches (bench/latency.py, bench/browser_latency.py) ---------------------------------

def espeak_clip_16k(text: str) -> np.ndarray:
    """espeak-ng speech at 16 kHz, leading and trailing silence trimmed (onset at sample 0)."""
    from realtime.audio.audio_ingest import AudioIngest

    wav, rate = make_speech(text, 1)
    x = AudioIngest(16000).convert(wav, rate)
    x = np.concatenate([x, AudioIngest(16000).convert(np.zeros(0, np.float32), rate)])
    loud = np.flatnonzero(np.abs(x) > 0.02)
    return x[loud[0]:loud[-1] + 1].astype(np.float32)


def espeak_or_vowels(text: str) -> np.ndarray:
    """16 kHz float32 speech from espeak-ng, or a syllable-like vowel sequence without it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        log.warning("espeak-ng not found: timing on synthetic vowels instead of speech")
        return _vowel_sequence()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-s", "150", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path), "rb") as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
    t_src = np.arange(len(pcm)) / rate
    t_dst = np.arange(int(len(pcm) * 16000 / rate)) / 16000
    return np.interp(t_dst, t_src, pcm).astype(np.float32)


def _vowel_sequence(seconds: float = 4.0) -> np.ndarray:
    """Alternating /a/ /i/ /u/ syllables (impulse train through two resonators), 4 per second."""
    t = np.arange(int(seconds * 16000)) / 16000
    formants = [(730, 1090), (270, 2290), (300, 870)]
    out = np.zeros_like(t)
    for k in range(int(seconds * 4)):
        seg = (t >= k / 4) & (t < k / 4 + 0.18)
        f1, f2 = formants[k % 3]
        tt = t[seg] - k / 4
        carrier = np.sign(np.sin(2 * np.pi * 120 * tt))
        out[seg] = 0.2 * carrier * (np.sin(2 * np.pi * f1 * tt) + 0.5 * np.sin(2 * np.pi * f2 * tt))
    return out.astype(np.float32)


def realistic_random_wav2lip(seed: int = 0) -> Wav2Lip:
    """Seeded Wav2Lip whose activations have trained-like scale (He init + calibrated BatchNorm)."""
    torch.manual_seed(seed)
    return calibrated_random_(Wav2Lip(), lambda: (torch.rand(8, 1, 80, 16) * 8 - 4, torch.rand(8, 6, 96, 96)))


def wav_bytes(pcm: np.ndarray, rate: int, channels: int = 1) -> bytes:
    """A PCM16 wav file in memory: `pcm` int16 samples (interleaved when `channels` > 1)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, dtype=np.int16).tobytes())
    return buffer.getvalue()


def pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def endpoint(self, path: str) -> str:
        return self.url.rstrip("/") + path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(args: list[str], log_path: Path, timeout_s: float = 600.0, repo: Path = REPO) -> Server:
    """`run_server.py` of `repo` (another checkout measures the code before a change) on a free port,
    loopback ICE candidates only."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(repo)}
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, str(repo / "run_server.py"), "--host", "127.0.0.1", "--port", "0",
                                 "--ice-host-addresses", "127.0.0.1", "--max-sessions", "4", *args],
                                cwd=repo, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while True:
        text = log_path.read_text()
        match = re.search(r"serving (http://127\.0\.0\.1:\d+/)", text)
        if match:
            return Server(proc, match.group(1), log_path)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start:\n{text[-3000:]}")
        time.sleep(0.2)


def summary(values: list[float | None]) -> dict:
    good = [v for v in values if v is not None]
    out: dict[str, Any] = {"trials": [None if v is None else round(v, 1) for v in values]}
    out["p50"] = round(float(np.percentile(good, 50)), 1) if good else None
    out["p95"] = round(float(np.percentile(good, 95)), 1) if good else None
    out["missed"] = len(values) - len(good)
    return out


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"

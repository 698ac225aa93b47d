"""Adopt a faster, lossy precision only when it is measured accurate enough on the user's own checkpoint.

bf16 error depends on the weights: on calibrated random weights it ranged from 33 to 46 dB PSNR across
seeds (bench/sessions.py), so no fixed answer is right for every checkpoint. At start-up the renderer
renders the same calibration set (real speech mel windows shipped in realtime/assets, over the avatar's
own frames) with the faithful fp32 path and with each faster candidate, and keeps the fastest candidate
whose uint8 patches are at least `min_psnr_db` PSNR from fp32 over the set (and no frame more than
WORST_FRAME_MARGIN_DB below that) and that is really faster on this CPU.

On CUDA the same gate checks fp16 (the default there, not an opt-in for speed) against real fp32 (TF32
off) with `min_speedup=None`: accuracy alone decides, since at batch 1 a GPU is bound by kernel launches
and the timing says nothing about fp16's gain at serving batch sizes; fp16 below the bound falls back to
fp32.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

log = logging.getLogger(__name__)

# (frame indices, mel windows) -> uint8 patches (B, rows, 96, 3)
Generate = Callable[[np.ndarray, np.ndarray], np.ndarray]

DEFAULT_MIN_PSNR_DB = 35.0
WORST_FRAME_MARGIN_DB = 5.0  # no single calibration frame may fall more than this below the bound: an
                             # average can hide a few broken mouths
MIN_SPEEDUP = 1.15  # a candidate must save at least this much time per frame to be worth its error


def load_calibration_mels() -> np.ndarray:
    """(96, 80, 16) float32 mel windows of espeak-ng speech (scripts/make_calibration_mels.py)."""
    with resources.files("realtime.assets").joinpath("calibration_mels.npz").open("rb") as f:
        result: np.ndarray = np.load(f)["mels"].astype(np.float32)
        return result


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


@dataclass
class GateReport:
    chosen: str
    min_psnr_db: float
    psnr_db: dict[str, float] = field(default_factory=dict)        # candidate -> PSNR vs the reference
    worst_frame_psnr_db: dict[str, float] = field(default_factory=dict)  # its least accurate frame
    max_abs_diff: dict[str, int] = field(default_factory=dict)     # uint8 levels
    ms_per_frame: dict[str, float] = field(default_factory=dict)   # batch of one, best of a few calls
    frames: int = 0

    def summary(self) -> str:
        parts = [f"{name}: {self.ms_per_frame.get(name, float('nan')):.1f} ms/frame"
                 + (f", {self.psnr_db[name]:.1f} dB (worst frame {self.worst_frame_psnr_db[name]:.1f})"
                    if name in self.psnr_db else "")
                 for name in self.ms_per_frame]
        return f"chose {self.chosen} (need >= {self.min_psnr_db:g} dB; {'; '.join(parts)})"


def _ms_per_frame(generate: Generate, indices: np.ndarray, mels: np.ndarray, calls: int = 5) -> float:
    best = float("inf")
    for k in range(calls + 1):
        i = k % len(indices)
        t0 = time.perf_counter()
        generate(indices[i:i + 1], mels[i:i + 1])
        if k:  # the first call of each path is a warm-up
            best = min(best, time.perf_counter() - t0)
    return 1000.0 * best


def is_accurate(report: GateReport, name: str) -> bool:
    """A candidate's patches are >= min_psnr_db from the reference over the set, and no frame is more
    than WORST_FRAME_MARGIN_DB below that."""
    return (report.psnr_db[name] >= report.min_psnr_db
            and report.worst_frame_psnr_db[name] >= report.min_psnr_db - WORST_FRAME_MARGIN_DB)


def decide(report: GateReport, reference: str, min_speedup: float | None = MIN_SPEEDUP) -> str:
    """The policy, from the measured numbers alone. min_speedup: the fastest accurate candidate at least
    that many times faster than the reference, else the reference; None: the first accurate candidate
    (in the order they were measured), whatever its speed, else the reference."""
    accurate = [name for name in report.psnr_db if is_accurate(report, name)]
    if min_speedup is None:
        return accurate[0] if accurate else reference
    ref_ms = report.ms_per_frame[reference]
    fast = [name for name in accurate if report.ms_per_frame[name] * min_speedup <= ref_ms]
    return min(fast, key=lambda name: report.ms_per_frame[name], default=reference)


def choose_precision(reference: tuple[str, Generate], candidates: dict[str, Generate], n_frames: int,
                     min_psnr_db: float = DEFAULT_MIN_PSNR_DB, batch: int = 32,
                     mels: np.ndarray | None = None,
                     timer: Callable[[Generate, np.ndarray, np.ndarray], float] | None = None,
                     min_speedup: float | None = MIN_SPEEDUP) -> GateReport:
    """Render the calibration set with `reference` and every candidate; return the choice and the numbers.

    n_frames: the avatar's frame count (the calibration pairs spread over all of its frames).
    timer: ms per frame of a path at batch 1 (default: best of 5 timed calls after a warm-up).
    min_speedup: see `decide` (None: accuracy alone decides).
    """
    timer = timer or _ms_per_frame
    ref_name, ref_fn = reference
    mels = load_calibration_mels() if mels is None else mels
    indices = np.linspace(0, n_frames - 1, len(mels)).round().astype(np.int64)

    def render_all(fn: Generate) -> np.ndarray:
        return np.concatenate([fn(indices[s:s + batch], mels[s:s + batch]) for s in range(0, len(mels), batch)])

    report = GateReport(chosen=ref_name, min_psnr_db=min_psnr_db, frames=len(mels))
    expected = render_all(ref_fn)
    report.ms_per_frame[ref_name] = timer(ref_fn, indices, mels)
    for name, fn in candidates.items():
        got = render_all(fn)
        report.psnr_db[name] = round(psnr_db(got, expected), 2)
        report.worst_frame_psnr_db[name] = round(min(psnr_db(g, e) for g, e in zip(got, expected, strict=True)), 2)
        report.max_abs_diff[name] = int(np.abs(got.astype(np.int16) - expected).max())
        report.ms_per_frame[name] = timer(fn, indices, mels)
    report.chosen = decide(report, ref_name, min_speedup)
    log.info("precision gate: %s", report.summary())
    return report


__all__ = ["DEFAULT_MIN_PSNR_DB", "GateReport", "choose_precision", "decide", "is_accurate", "load_calibration_mels",
           "psnr_db"]

"""The start-up precision gate: a faster precision is adopted only when measured accurate and faster."""
from __future__ import annotations

import numpy as np
import pytest

from realtime.renderers import precision_gate
from realtime.renderers.precision_gate import choose_precision, load_calibration_mels, psnr_db


def reference(indices: np.ndarray, mels: np.ndarray) -> np.ndarray:
    """A deterministic 'renderer': patch values from the frame index and the mel window."""
    base = (indices[:, None, None, None] * 37 + mels.mean(axis=(1, 2))[:, None, None, None] * 20 + 128)
    return np.clip(base + np.zeros((1, 60, 96, 3)), 0, 255).astype(np.uint8)


def with_noise(sigma: float):
    def generate(indices: np.ndarray, mels: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(int(indices[0]))
        out = reference(indices, mels).astype(float) + rng.normal(0, sigma, (len(indices), 60, 96, 3))
        return np.clip(out, 0, 255).astype(np.uint8)
    return generate


def timer_from(ms: dict):
    return lambda fn, indices, mels: ms[fn]


def test_calibration_mels_are_speech_windows():
    mels = load_calibration_mels()
    assert mels.shape == (96, 80, 16) and mels.dtype == np.float32
    assert -4.01 <= mels.min() < -3 and 0 < mels.max() <= 4.01  # official clipping range, and not silence
    assert mels.std(axis=(1, 2)).min() > 0.1  # every window has structure


@pytest.mark.parametrize("sigma, cand_ms, chosen", [
    (1.0, 5.0, "bf16"),     # ~48 dB and 2x faster: adopted
    (12.0, 5.0, "fp32"),    # ~27 dB: too lossy, whatever its speed
    (1.0, 9.5, "fp32"),     # accurate but only 1.05x faster: not worth any error
])
def test_gate_adopts_only_accurate_and_faster(sigma, cand_ms, chosen):
    cand = with_noise(sigma)
    report = choose_precision(("fp32", reference), {"bf16": cand}, n_frames=7,
                              timer=timer_from({reference: 10.0, cand: cand_ms}))
    assert report.chosen == chosen
    expected_db = 20 * np.log10(255 / sigma)
    assert abs(report.psnr_db["bf16"] - expected_db) < 1.5  # uint8 truncation biases it a little
    assert report.frames == 96 and report.ms_per_frame == {"fp32": 10.0, "bf16": cand_ms}
    assert chosen in report.summary()


def test_gate_rejects_a_candidate_that_breaks_a_few_frames():
    """Accurate on average (> 35 dB over the set) but a few frames far off (< 30 dB): rejected."""
    good = with_noise(0.5)

    def few_broken(indices: np.ndarray, mels: np.ndarray) -> np.ndarray:
        out = good(indices, mels)
        if indices[0] == 0:  # the first frame of the set: a badly wrong mouth (~20 dB on its own)
            noise = np.random.default_rng(3).normal(0, 25, out[0].shape)
            out[0] = np.clip(out[0] + noise, 0, 255).astype(np.uint8)
        return out

    report = choose_precision(("fp32", reference), {"bf16": few_broken}, n_frames=7,
                              timer=timer_from({reference: 10.0, few_broken: 5.0}))
    assert report.psnr_db["bf16"] >= 35.0 and report.worst_frame_psnr_db["bf16"] < 30.0
    assert report.chosen == "fp32"


def test_gate_picks_the_fastest_of_several_accurate_candidates():
    a, b, bad = with_noise(0.5), with_noise(1.0), with_noise(20.0)
    report = choose_precision(("fp32", reference), {"a": a, "b": b, "bad": bad}, n_frames=3,
                              timer=timer_from({reference: 10.0, a: 6.0, b: 4.0, bad: 1.0}))
    assert report.chosen == "b"


def test_gate_threshold_is_a_setting():
    cand = with_noise(3.0)  # ~38.6 dB
    timer = timer_from({reference: 10.0, cand: 5.0})
    assert choose_precision(("fp32", reference), {"c": cand}, 5, 35.0, timer=timer).chosen == "c"
    assert choose_precision(("fp32", reference), {"c": cand}, 5, 40.0, timer=timer).chosen == "fp32"


def test_psnr_db():
    a = np.zeros((4, 4), np.uint8)
    assert psnr_db(a, a) == float("inf")
    assert psnr_db(a, a + 1) == pytest.approx(20 * np.log10(255), abs=1e-6)
    assert precision_gate.DEFAULT_MIN_PSNR_DB == 35.0


def test_accuracy_alone_decides_when_no_speedup_is_asked():
    """The CUDA use (min_speedup=None): fp16 is the default there, so an accurate candidate is kept even
    when batch-1 timing shows no gain; an inaccurate one, or one with a few broken frames, is not."""
    accurate, lossy = with_noise(1.0), with_noise(12.0)
    timer = timer_from({reference: 1.0, accurate: 1.2, lossy: 0.5})
    kept = choose_precision(("fp32", reference), {"fp16": accurate}, 7, timer=timer, min_speedup=None)
    assert kept.chosen == "fp16"
    assert choose_precision(("fp32", reference), {"fp16": accurate}, 7, timer=timer).chosen == "fp32"  # CPU rule
    dropped = choose_precision(("fp32", reference), {"fp16": lossy}, 7, timer=timer, min_speedup=None)
    assert dropped.chosen == "fp32"


def test_decide_is_a_function_of_the_numbers():
    report = precision_gate.GateReport(chosen="?", min_psnr_db=35.0,
                                       psnr_db={"a": 40.0, "b": 36.0, "c": 50.0},
                                       worst_frame_psnr_db={"a": 38.0, "b": 29.0, "c": 45.0},
                                       ms_per_frame={"ref": 10.0, "a": 5.0, "b": 2.0, "c": 9.5})
    assert precision_gate.decide(report, "ref") == "a"                   # b: a frame < 30 dB; c: too slow
    assert precision_gate.decide(report, "ref", min_speedup=1.0) == "a"  # c at 9.5 ms is slower than a
    assert precision_gate.decide(report, "ref", min_speedup=None) == "a"  # the first accurate one
    report.psnr_db["a"] = 30.0
    assert precision_gate.decide(report, "ref") == "ref"
    assert precision_gate.decide(report, "ref", min_speedup=None) == "c"

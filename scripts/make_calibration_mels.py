"""Regenerate realtime/assets/calibration_mels.npz: official mel windows of a few seconds of espeak-ng speech.

    .venv/bin/python scripts/make_calibration_mels.py

The Wav2Lip renderer measures a faster precision's error against fp32 on these windows (and the avatar's
own frames) before it adopts it (realtime/renderers/precision_gate.py). The text differs from the
benchmarks' so that the gate is not tuned on what the benchmarks report.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import make_speech, to_16k
from realtime.audio.mel import mel_windows, melspectrogram

ROOT = Path(__file__).resolve().parents[1]

TEXT = ("Peter picked a few bright purple plums. How much would you pay for them? "
        "Maybe, oh yes, we all agree: five fine figs and a cheese sandwich.")
WINDOWS = 96


def main() -> int:
    wav, rate = make_speech(TEXT, 1)
    windows = mel_windows(melspectrogram(to_16k(wav, rate)), 25.0)
    windows = windows[windows.std(axis=(1, 2)) > 0.3]  # speech only: the live engine renders no silence
    pick = np.linspace(0, len(windows) - 1, WINDOWS).round().astype(int)
    out = ROOT / "realtime" / "assets" / "calibration_mels.npz"
    np.savez_compressed(out, mels=windows[pick].astype(np.float16), text=np.array(TEXT))
    print(f"{out}: {WINDOWS} of {len(windows)} windows ({len(wav) / rate:.1f} s of speech)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

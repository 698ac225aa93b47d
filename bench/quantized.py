"""int8 decode path (bench/int8_decoder.py, an experiment) vs the fp32 fast path (CachedWav2Lip, rows 36..95), CPU.

    python bench/quantized.py [--rounds 5] [--threads 2] [--calib 256]

Weights: the released wav2lip.pth is NOT available here; the generator is bench.generator's seeded
`realistic_random_wav2lip` (He init + BatchNorm calibrated on random inputs). Inputs are realistic:
mel windows of espeak-ng speech (realtime.audio.mel, 25 fps) and the default avatar's 96x96 face crops.
Calibration uses the first `--calib` mel windows (random avatar frames); accuracy is measured on 100
held-out windows (the last ones of a different sentence) against the fp32 eager model, rows 36..95:
PSNR (peak 1.0), max |diff|, and the mean |diff| in uint8 levels.

Variants: "int8 all" quantises the whole audio encoder + band decoder; "int8 tails..." quantises only
the residual 3x3 convs of the listed decoder stages (bench.int8_decoder.part_names: tail1 at 3x3 ...
tail6 at 96x96), the rest fp32. Timings interleave the variants, best of `--rounds`. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TEXT, make_speech, realistic_random_wav2lip, to_16k
from bench.int8_decoder import PARTS, quantize_decoder
from models.wav2lip import CachedWav2Lip, faces_to_input, mels_to_input
from realtime.audio.mel import mel_windows, melspectrogram

log = logging.getLogger("bench.quantized")
ROWS_FROM = 36  # realtime.renderers.wav2lip.PASTED_ROWS_FROM
HELD_OUT_TEXT = "The quick brown fox jumps over the lazy dog, while seven wizards quietly box the jovial judge."
TAILS = [p for p in PARTS if p.startswith("tail")]


def _only(int8_parts: list[str]) -> list[str]:
    return [p for p in PARTS if p not in int8_parts]


VARIANTS: dict[str, list[str]] = {  # name -> float_parts
    "int8 all": [],
    "int8 tails1-6": _only(TAILS),
    "int8 tails2-6": _only(TAILS[1:]),
    "int8 tails3-6": _only(TAILS[2:]),
    "int8 tails1-5": _only(TAILS[:5]),
}


def speech_mels(text: str) -> torch.Tensor:
    wav, rate = make_speech(text, 1)
    return mels_to_input(mel_windows(melspectrogram(to_16k(wav, rate)), 25.0))


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((out.float() - ref.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def run(rounds: int, threads: int, n_calib: int, variants: list[str], seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    from realtime.avatars.default_avatar import load_default_avatar
    faces = faces_to_input(load_default_avatar().face_crops(96))
    calib_mels, test_mels = speech_mels(TEXT), speech_mels(HELD_OUT_TEXT)[-100:]
    gen = torch.Generator().manual_seed(0)
    model = realistic_random_wav2lip(seed)
    fast = CachedWav2Lip(model)
    cache = fast.precompute(faces, rows_from=ROWS_FROM)
    calib = []
    for s in range(0, min(n_calib, len(calib_mels)), 16):
        mel = calib_mels[s:s + 16]
        calib.append((mel, cache.select(torch.randint(0, len(cache), (len(mel),), generator=gen))))
    test_idx = torch.randint(0, len(cache), (len(test_mels),), generator=gen)
    with torch.no_grad():
        ref = model(test_mels, faces[test_idx])[:, :, ROWS_FROM:]
    bf16 = CachedWav2Lip(model).to(torch.bfloat16)
    bf16_cache = bf16.precompute(faces.bfloat16(), rows_from=ROWS_FROM)
    nets: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "fp32 fast (CachedWav2Lip rows36)": lambda mel, idx: fast(mel, cache.select(idx), ROWS_FROM),
        "bf16 fast rows36 (NOT faithful)":
            lambda mel, idx: bf16(mel.bfloat16(), bf16_cache.select(idx), ROWS_FROM).float(),
    }
    for name in variants:
        start = time.perf_counter()
        q = quantize_decoder(fast, calib, ROWS_FROM, float_parts=VARIANTS[name])
        nets[name] = lambda mel, idx, q=q: q(mel, cache.select(idx), ROWS_FROM)
        log.info("%s: calibrated on %d frames in %.1f s", name, sum(len(a) for a, _ in calib),
                 time.perf_counter() - start)
    acc = {}
    for name, net in nets.items():
        with torch.inference_mode():
            out = net(test_mels, test_idx)
        diff = (out - ref).abs()
        levels = ((out * 255).to(torch.uint8).float() - (ref * 255).to(torch.uint8).float()).abs()
        acc[name] = {"psnr_db": round(psnr(out, ref), 2), "max_abs_diff": round(float(diff.max()), 4),
                     "mean_abs_levels": round(float(levels.mean()), 3)}
    best = {b: {n: math.inf for n in nets} for b in (1, 8)}
    for r in range(rounds):
        for b in (1, 8):
            mel, idx = test_mels[:b], test_idx[:b]
            for name, net in nets.items():
                with torch.inference_mode():
                    if r == 0:
                        net(mel, idx)  # warm-up
                    calls = max(1, 16 // b)
                    start = time.perf_counter()
                    for _ in range(calls):
                        net(mel, idx)
                    best[b][name] = min(best[b][name], (time.perf_counter() - start) / (calls * b))
        log.info("round %d/%d done", r + 1, rounds)
    fps = {n: {str(b): round(1.0 / best[b][n], 1) for b in (1, 8)} for n in nets}
    for name in nets:
        a = acc[name]
        print(f"{name:36s} B=1 {fps[name]['1']:6.1f} fps  B=8 {fps[name]['8']:6.1f} fps   PSNR {a['psnr_db']:6.2f} dB"
              f"  max|diff| {a['max_abs_diff']:.3f}  mean {a['mean_abs_levels']:.2f} levels")
    return {"fps": fps, "accuracy_vs_fp32_eager_rows36_95": acc, "threads": threads, "rounds": rounds,
            "calibration_frames": sum(len(a) for a, _ in calib), "held_out_frames": len(test_mels),
            "weights": f"bench.generator.realistic_random_wav2lip({seed}) (released weights not available)",
            "engine": torch.backends.quantized.engine}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=int, default=256, help="calibration frames (mel windows)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random generator weights")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    print(json.dumps(run(args.rounds, args.threads, args.calib, args.variants, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Generator throughput on CPU: the official eager forward vs our real-time path, at batch 1, 8 and 32.

    python bench/generator.py [--rounds 3] [--threads 2]

Random weights (seeded), made realistic enough for the accuracy numbers to mean something: convs get
He-normal weights and the BatchNorm statistics are calibrated on random inputs, so activations keep
their scale through the network and the output spans (0, 1) like a trained model's (with PyTorch's
default init the output sits at 0.5 +- 0.05 and every variant would "agree" trivially).

Paths timed (per frame = one 96x96 mouth):
- eager: what the official inference does per frame: fp32 full model (face encoder + audio encoder +
  decoder) under torch.no_grad.
- the real-time variants: the face input depends only on the avatar frame, so its work is precomputed
  per avatar frame (not timed, like an avatar's prepare step); per frame only the audio encoder and
  decoder run, including the gather of the cached tensors for the batch's frame indices.
- "+rows36": the decoder computes only output rows [36, 96), all the real-time compositor's feathered
  lower-face mask reads (CachedWav2Lip rows_from; exact for those rows). Its max|diff| is over those rows.
Timings interleave the variants and keep each one's best round, which damps (not removes) the noise
of a shared machine. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import realistic_random_wav2lip
from models.wav2lip import CachedWav2Lip, FaceCache, Wav2Lip

log = logging.getLogger("bench.generator")
BATCHES = (1, 8, 32)
ROWS_FROM = 36  # realtime.renderers.wav2lip.PASTED_ROWS_FROM (not imported: bench stays model-only)
OURS = "cached+heads+channels_last+rows36"  # what the real-time renderer runs by default (fp32, faithful)


def _time(fn: Callable[[], object], frames_per_call: int, min_frames: int) -> float:
    """Seconds per frame over enough calls to cover `min_frames` frames."""
    calls = max(1, -(-min_frames // frames_per_call))
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / (calls * frames_per_call)


class _NNPackConv(nn.Module):
    """Experiment only (not in the library): a 3x3 conv through NNPACK's Winograd kernels, a private
    torch API. Kept here so the measurement can be repeated on other machines."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return torch._nnpack_spatial_convolution(x.contiguous(), self.conv.weight, self.conv.bias, [1, 1], [1, 1])


def _with_nnpack(fast: CachedWav2Lip) -> CachedWav2Lip:
    """Route the 3x3 stride-1 convs that run at 24x24 and above (decoder stages 4-6, output head) to NNPACK."""
    if not torch._nnpack_available():
        raise RuntimeError("NNPACK unavailable")

    def eligible(conv: nn.Module) -> bool:
        return type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)

    for k in range(3, len(fast.tails)):  # tails 3.. run at 24, 48, 96, 96
        for block in fast.tails[k]:
            if hasattr(block, "conv") and eligible(block.conv):
                block.conv = _NNPackConv(block.conv)
        if eligible(fast.dec_heads[k]):
            fast.dec_heads[k] = _NNPackConv(fast.dec_heads[k])
    return fast


def _variants(model: Wav2Lip, face: Tensor) -> dict[str, tuple[nn.Module, FaceCache, torch.dtype, int]]:
    """name -> (fast model, its avatar cache, input dtype, rows_from)."""
    out = {}
    for name, kwargs in {"cached": dict(cache_heads=False, channels_last=False),
                         "cached+heads": dict(channels_last=False), "cached+heads+channels_last": {}}.items():
        fast = CachedWav2Lip(model, **kwargs)
        out[name] = (fast, fast.precompute(face), torch.float32, 0)
    out[OURS] = (*out["cached+heads+channels_last"][:3], ROWS_FROM)
    fast = CachedWav2Lip(model, channels_last=False)  # NNPACK wants NCHW
    cache = fast.precompute(face)
    try:
        out["cached+heads+nnpack_winograd (experiment)"] = (_with_nnpack(fast), cache, torch.float32, 0)
    except (RuntimeError, AttributeError) as exc:
        log.info("skipping the NNPACK variant: %s", exc)
    bf16 = CachedWav2Lip(model).to(torch.bfloat16)
    bf16_cache = bf16.precompute(face.bfloat16())
    out["cached+heads+channels_last+bf16 (NOT faithful)"] = (bf16, bf16_cache, torch.bfloat16, 0)
    out[f"{OURS}+bf16 (NOT faithful)"] = (bf16, bf16_cache, torch.bfloat16, ROWS_FROM)
    return out


def run(rounds: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = realistic_random_wav2lip()
    gen = torch.Generator().manual_seed(1)
    n_avatar = max(BATCHES)
    face = torch.rand(n_avatar, 6, 96, 96, generator=gen)
    audio_all = torch.rand(n_avatar, 1, 80, 16, generator=gen) * 8 - 4
    with torch.no_grad():
        features = model.encode_face(face)
        reference = model(audio_all[:8], face[:8])
    variants = _variants(model, face)

    def call(name: str, batch: int) -> Callable[[], Tensor]:
        audio, index = audio_all[:batch], torch.arange(batch)
        if name == "eager":
            return lambda: model(audio, face[:batch])
        if name == "decode_only":
            return lambda: model.decode(audio, [f[:batch] for f in features])
        fast, cache, dtype, rows_from = variants[name]
        rows = fast.cache_rows(rows_from)
        return lambda: fast(audio.to(dtype), cache.select(index, rows), rows_from).float()

    names = ["eager", "decode_only", *variants]
    diffs = {}
    for name in names[1:]:
        with torch.inference_mode():
            out = call(name, 8)()
            diffs[name] = float((out - reference[:, :, reference.shape[2] - out.shape[2]:]).abs().max())
    best = {b: {n: float("inf") for n in names} for b in BATCHES}
    for r in range(rounds):
        for batch in BATCHES:
            for name in names:
                fn = call(name, batch)
                ctx = torch.no_grad() if name in ("eager", "decode_only") else torch.inference_mode()
                with ctx:
                    if r == 0:
                        fn()  # warm-up: oneDNN primitive creation, allocator
                    spf = _time(fn, batch, min_frames=8)
                best[batch][name] = min(best[batch][name], spf)
        log.info("round %d/%d done", r + 1, rounds)
    fps = {name: {str(b): round(1.0 / best[b][name], 2) for b in BATCHES} for name in names}
    for name in names:
        print(f"{name:48s} " + "  ".join(f"B={b}: {fps[name][str(b)]:6.2f} fps" for b in BATCHES)
              + (f"   max|diff| vs eager {diffs[name]:.2e}" if name in diffs else ""))
    return {"eager_fps": fps["eager"], "ours_fps": fps[OURS], "ours": OURS,
            "max_abs_diff": {k: float(f"{v:.3e}") for k, v in diffs.items()}, "variants_fps": fps,
            "threads": threads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    result = run(args.rounds, args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

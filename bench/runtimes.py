"""Which runtime runs the Wav2Lip per-frame decode fastest on this CPU, at what accuracy.

    python bench/runtimes.py [--rounds 3] [--threads 2] [--compile] [--fp32-only]

An AVX2-only CPU can be approximated on an AVX-512 one with `ONEDNN_MAX_CPU_ISA=AVX2` (PyTorch and
OpenVINO both honour it; ONNX Runtime's own kernels do not, so ignore its line then) plus `--fp32-only`
(OpenVINO's bf16 kernels then refuse to compile). Measured so here: eager 18.3 fps, torch 32.7, OpenVINO
fp32 39.3 at batch 1.

The measurement behind `Wav2LipRenderer(runtime="auto")` choosing OpenVINO on CPU. Random calibrated weights
(seed 0), the default avatar's face crops, uniform random mel windows in the official range. All paths
compute the same thing, the renderer's per-frame work: audio encoder + decoder over output rows [36, 96)
from the cached avatar-constant tensors (CachedWav2Lip). Timed per batch of 1 and 8 (frames/s, best of
`--rounds` interleaved rounds); max |diff| against PyTorch fp32 on the same inputs.

- torch: PyTorch eager, channels_last, BatchNorm folded (the renderer's torch runtime).
- torch.compile: the same module through inductor (only with --compile: minutes of compiling on 2 cores).
- onnxruntime: the same graph exported to ONNX, CPU execution provider (only if onnxruntime is installed;
  it is not a dependency).
- openvino fp32 / bf16: the graph the renderer compiles (models/openvino_runtime.py).
- eager (for scale, not per-frame work only): the official full forward, face encoder included, as
  bench/sessions.py times it.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import realistic_random_wav2lip
from models import openvino_runtime as ovr
from models.wav2lip import CachedWav2Lip, faces_to_input

log = logging.getLogger("bench.runtimes")
ROWS_FROM = 36


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--fp32-only", action="store_true", help="skip OpenVINO bf16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    from realtime.avatars.default_avatar import load_default_avatar

    crops = load_default_avatar().face_crops(96)[:32]
    model = realistic_random_wav2lip(0)
    nchw = CachedWav2Lip(model, channels_last=False)
    cache = nchw.precompute(faces_to_input(crops), rows_from=ROWS_FROM)
    arrays = [t.numpy() for t in cache.tensors]
    torch_net = CachedWav2Lip(model, channels_last=True)
    torch_cache = torch_net.precompute(faces_to_input(crops), rows_from=ROWS_FROM)

    graph = ovr.export_frame_model(nchw, cache.tensors, ROWS_FROM)
    paths: dict[str, callable] = {}

    def torch_path(net, tensors):
        def run(idx, mel):
            with torch.inference_mode():
                return net(torch.from_numpy(mel), [t.index_select(0, torch.from_numpy(idx)) for t in tensors],
                           ROWS_FROM).float().numpy()
        return run

    paths["torch"] = torch_path(torch_net, torch_cache.tensors)
    if args.compile:
        compiled = torch.compile(torch_net)
        paths["torch.compile"] = torch_path(compiled, torch_cache.tensors)
    try:
        import io

        import onnxruntime as ort

        buffer = io.BytesIO()
        graph_module = ovr._FrameGraph(nchw, ROWS_FROM).eval()
        names = ["audio"] + [f"cached{k}" for k in range(len(arrays))]
        with torch.no_grad():
            torch.onnx.export(graph_module, (torch.zeros(2, 1, 80, 16), *[t[:2] for t in cache.tensors]), buffer,
                              input_names=names, output_names=["patch"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in [*names, "patch"]})
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        paths["onnxruntime"] = lambda idx, mel: session.run(
            None, dict(zip(names, [mel, *(a[idx] for a in arrays)], strict=True)))[0]
    except ImportError:
        log.info("onnxruntime not installed: skipped")
    for precision in ("fp32",) if args.fp32_only else ("fp32", "bf16"):
        compiled_ov = ovr.CompiledFrameModel(graph, precision, args.threads)
        paths[f"openvino-{precision}"] = (lambda c: lambda idx, mel: c(mel, [a[idx] for a in arrays]))(compiled_ov)

    from bench.common import eager_uint8

    paths["eager"] = lambda idx, mel: eager_uint8(model, crops[idx], mel[:, 0]).astype(np.float32)
    rng = np.random.default_rng(0)
    result: dict[str, dict] = {name: {"fps": {}, "max_abs_diff": None} for name in paths}
    for batch in (1, 8):
        idx = (np.arange(batch) * 5) % len(crops)
        mel = (rng.random((batch, 1, 80, 16), dtype=np.float32) * 8 - 4)
        ref = paths["torch"](idx, mel)
        for name, fn in paths.items():
            out = fn(idx, mel)  # warm-up (and torch.compile's compile)
            if name == "eager":  # uint8 NHWC full patches: compare on the same scale and rows
                out = out[:, ROWS_FROM:].transpose(0, 3, 1, 2) / 255.0
            diff = float(np.abs(out - ref).max())
            prev = result[name]["max_abs_diff"]
            result[name]["max_abs_diff"] = diff if prev is None else max(prev, diff)
        reps = max(2, 16 // batch)
        best = {name: float("inf") for name in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn(idx, mel)
                best[name] = min(best[name], (time.perf_counter() - t0) / (reps * batch))
        for name in paths:
            result[name]["fps"][str(batch)] = round(1.0 / best[name], 1)
        log.info("batch %d: %s", batch, "  ".join(f"{n} {1 / s:.1f} fps" for n, s in best.items()))
    for name, r in result.items():
        print(f"{name:16s} " + "  ".join(f"B={b}: {v:6.1f} fps" for b, v in r["fps"].items())
              + f"  max|diff| vs torch {r['max_abs_diff']:.1e}")
    print(json.dumps({"runtimes": result, "threads": args.threads, "rows_from": ROWS_FROM}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""OpenVINO runtime for the per-frame part of the Wav2Lip generator on CPU.

Why OpenVINO: measured on the 2-core development machine (bench/runtimes.py), the cached per-frame
decode (audio encoder + band decoder, `CachedWav2Lip.forward`) runs ~1.5x faster under OpenVINO's CPU
plugin than under PyTorch eager with the same fp32 numerics (it fuses the conv + bias + ReLU + skip-add
chains and picks its own conv kernels), ahead of ONNX Runtime (~1.4x); and its bf16 mode keeps fp32
accumulation with fewer intermediate roundings than PyTorch's bf16, so it is both faster and more
accurate than torch bf16 on this network.

The graph goes PyTorch -> ONNX (in memory, `torch.onnx.export`) -> `openvino.Core.read_model`. We do
not use `openvino.convert_model`: it belongs to OpenVINO's conversion tools, which send anonymous usage
telemetry by default; the runtime (`Core`) does not.

Inputs and outputs are numpy: the mel windows (B, 1, 80, 16) and the avatar-constant cached tensors of
the batch's frames (NCHW float32, the bottom bands `CachedWav2Lip.precompute(rows_from=...)` keeps);
the output is (B, 3, 96 - rows_from, 96) float32 in (0, 1), like `CachedWav2Lip.forward`.
"""
from __future__ import annotations

import importlib
import io
import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.wav2lip import CachedWav2Lip

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def available() -> bool:
    """True when the `openvino` package imports (it is a dependency, but keep the torch path as fallback)."""
    try:
        importlib.import_module("openvino")
    except Exception:  # a broken install must not take the server down: torch still works
        return False
    return True


def _core():
    import openvino as ov

    return ov.Core()


def cpu_supports_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 would be emulated."""
    try:
        return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return False


class _FrameGraph(nn.Module):
    """CachedWav2Lip's per-frame forward with the cached tensors as separate inputs (ONNX needs flat args)."""

    def __init__(self, net: CachedWav2Lip, rows_from: int) -> None:
        super().__init__()
        self.net = net
        self.rows_from = rows_from

    def forward(self, audio: Tensor, *cached: Tensor) -> Tensor:
        return self.net(audio, list(cached), self.rows_from)


def export_frame_model(net: CachedWav2Lip, cached_example: Sequence[Tensor], rows_from: int):
    """An `openvino.Model` of `net`'s per-frame forward (fp32, NCHW) with a dynamic batch dimension.

    cached_example: one frame's (or a few frames') cached tensors, as `FaceCache.select` returns them.
    """
    if net.channels_last:
        raise ValueError("export an NCHW CachedWav2Lip (channels_last=False): ONNX graphs are NCHW")
    graph = _FrameGraph(net, rows_from).eval().float()
    cached = [t[:2].float().contiguous() for t in cached_example]
    audio = torch.zeros(cached[0].shape[0], 1, 80, 16)
    names = ["audio"] + [f"cached{k}" for k in range(len(cached))]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the shape checks in forward (constant here)
        # The TorchScript exporter (dynamo=False) writes to file objects; torch annotates `f` as a path only.
        torch.onnx.export(graph, (audio, *cached), buffer,  # type: ignore[arg-type]
                          input_names=names, output_names=["patch"],
                          dynamic_axes={n: {0: "batch"} for n in [*names, "patch"]},
                          opset_version=17, dynamo=False)
    return _core().read_model(buffer.getvalue())


class CompiledFrameModel:
    """One compiled per-frame model (fp32 or bf16 inference precision) with its own infer request.

    Not thread-safe: call it from one thread (the render worker). `infer` releases the GIL while the
    CPU plugin runs, so the asyncio loop keeps running.
    """

    def __init__(self, model, precision: str = "fp32", threads: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        self.precision = precision
        self.threads = int(threads or torch.get_num_threads())
        config = {
            "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all threads on it
            "INFERENCE_NUM_THREADS": self.threads,
            # The process also runs the event loop, compositing and video encoding: pinning OpenVINO's
            # threads to cores would make them fight those instead of letting the OS schedule.
            "ENABLE_CPU_PINNING": False,
        }
        self._compiled = _core().compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()

    def __call__(self, mels: np.ndarray, cached: Sequence[np.ndarray]) -> np.ndarray:
        """(B, 1, 80, 16) float32 mels + per-frame cached arrays -> (B, 3, rows, 96) float32 (a new array)."""
        self._request.infer([np.ascontiguousarray(mels, dtype=np.float32),
                             *(np.ascontiguousarray(c, dtype=np.float32) for c in cached)],
                            share_inputs=True)
        return self._request.get_output_tensor(0).data.copy()


__all__ = ["PRECISIONS", "CompiledFrameModel", "available", "cpu_supports_bf16", "export_frame_model"]

"""Wav2Lip's per-frame work on CPU through OpenVINO (models/openvino_runtime.py), for Wav2LipRenderer.

Holds what the OpenVINO path needs per avatar (the cached decoder inputs as NCHW float32 arrays, only the
rows the band decode reads) and the compiled per-frame models. Precision:
- "fp32": faithful (equal to the official fp32 model within float rounding);
- "bf16": ~1.9x faster on CPUs with AVX512-BF16 / AMX, lossy;
- "auto": decided at the first `prepare` by `precision_gate.choose_precision` on this checkpoint and
  avatar: bf16 when its patches stay >= min_psnr_db from fp32 and it is really faster here, else fp32.
"""
from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import numpy as np
import torch

from models import openvino_runtime as ovr
from models.wav2lip import CachedWav2Lip, Wav2Lip, cache_values, faces_to_input
from realtime.avatars.avatar import Avatar
from realtime.renderers.precision_gate import DEFAULT_MIN_PSNR_DB, GateReport, choose_precision

log = logging.getLogger(__name__)


class OpenVinoFrames:
    """Generates uint8 patch rows [rows_from, 96) for (avatar frame, mel window) batches."""

    def __init__(self, model: Wav2Lip, rows_from: int, precision: str = "auto", *,
                 max_cache_bytes: float = 2**30, min_psnr_db: float = DEFAULT_MIN_PSNR_DB,
                 threads: int | None = None) -> None:
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"OpenVINO precision must be 'auto', 'fp32' or 'bf16', not {precision!r}")
        self.model = model  # fp32, not modified
        self.rows_from = rows_from
        self.requested = precision
        self.precision: str | None = None if precision == "auto" else precision
        self.max_cache_bytes = max_cache_bytes
        self.min_psnr_db = min_psnr_db
        self.threads = threads
        self.gate: GateReport | None = None
        if precision == "bf16" and not ovr.cpu_supports_bf16():
            log.warning("wav2lip: --precision bf16 on a CPU without native bf16 (AVX512-BF16 / AMX): "
                        "it will be slower than fp32, not faster")
        self._nets: dict[bool, CachedWav2Lip] = {}           # cache_heads -> NCHW fp32 net
        self._graphs: dict[bool, Any] = {}                   # cache_heads -> openvino.Model
        self._compiled: dict[tuple[bool, str], ovr.CompiledFrameModel] = {}
        self._caches: weakref.WeakKeyDictionary[Any, tuple[bool, list[np.ndarray]]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def _net(self, heads: bool) -> CachedWav2Lip:
        if heads not in self._nets:
            self._nets[heads] = CachedWav2Lip(self.model, cache_heads=heads, channels_last=False)
        return self._nets[heads]

    def _model(self, heads: bool, precision: str) -> ovr.CompiledFrameModel:
        key = (heads, precision)
        if key not in self._compiled:
            if heads not in self._graphs:
                net = self._net(heads)
                probe = net.precompute(torch.zeros(2, 6, 96, 96), rows_from=self.rows_from)
                self._graphs[heads] = ovr.export_frame_model(net, probe.tensors, self.rows_from)
            self._compiled[key] = ovr.CompiledFrameModel(self._graphs[heads], precision, self.threads)
        return self._compiled[key]

    def prepare(self, avatar: Avatar, crops: np.ndarray) -> int:
        """Cache the avatar's decoder inputs; on the first avatar, settle the precision. Returns bytes cached."""
        with self._lock:
            if avatar in self._caches:
                return 0
            log.info("wav2lip: encoding %d avatar frames and compiling the decoder for OpenVINO%s",
                     len(crops), "; then measuring bf16 against fp32" if self.precision is None else "")
            heads = len(crops) * cache_values(True, self.rows_from) * 4 <= self.max_cache_bytes
            if not heads:
                log.info("avatar cache: %d frames exceed %.0f MB with decoder heads, caching encoder features only",
                         len(crops), self.max_cache_bytes / 2**20)
            cache = self._net(heads).precompute(faces_to_input(crops), rows_from=self.rows_from)
            arrays = [np.ascontiguousarray(t.numpy()) for t in cache.tensors]
            self._caches[avatar] = (heads, arrays)
            try:
                if self.precision is None:
                    self._settle_precision(avatar, heads, len(crops))
                self._model(heads, self._settled_precision())  # compile now, not on the first live frame
            except BaseException:
                self._caches.pop(avatar, None)  # not served: a failed prepare leaves nothing behind
                raise
            return sum(a.nbytes for a in arrays)

    def _settle_precision(self, avatar: Avatar, heads: bool, n_frames: int) -> None:
        candidates = {}
        if ovr.cpu_supports_bf16():
            candidates["bf16"] = lambda i, m: self._run(avatar, heads, "bf16", i, m)
        else:
            log.info("wav2lip: this CPU has no native bf16 (AVX512-BF16 / AMX): using fp32")
        self.gate = choose_precision(("fp32", lambda i, m: self._run(avatar, heads, "fp32", i, m)),
                                     candidates, n_frames, self.min_psnr_db)
        self.precision = self.gate.chosen
        # The losing precision's compiled model (weights and all) is not needed any more.
        for key in [k for k in self._compiled if k[1] != self.precision]:
            del self._compiled[key]

    def _run(self, avatar: Avatar, heads: bool, precision: str, indices: np.ndarray, mels: np.ndarray) -> np.ndarray:
        arrays = self._caches[avatar][1]
        pred = self._model(heads, precision)(mels[:, None], [a[indices] for a in arrays])
        # Official conversion: x 255 then truncation (astype(uint8)); NCHW -> NHWC (BGR order kept).
        return np.ascontiguousarray((pred * 255.0).astype(np.uint8).transpose(0, 2, 3, 1))

    def has(self, avatar: Avatar) -> bool:
        return avatar in self._caches

    def serves_any(self) -> bool:
        """Whether some avatar is prepared (a renderer then keeps this runtime for good)."""
        return len(self._caches) > 0

    def release(self, avatar: Avatar) -> None:
        with self._lock:
            self._caches.pop(avatar, None)

    def frames(self, avatar: Avatar) -> int:
        return len(self._caches[avatar][1][0])

    def generate(self, avatar: Avatar, indices: np.ndarray, mels: np.ndarray) -> np.ndarray:
        """uint8 (B, 96 - rows_from, 96, 3) for a prepared avatar."""
        heads = self._caches[avatar][0]
        return self._run(avatar, heads, self._settled_precision(), indices, mels)

    def _settled_precision(self) -> str:
        """The precision in use: given at construction, or chosen by the first `prepare` ("auto")."""
        if self.precision is None:
            raise RuntimeError("OpenVINO precision 'auto' is settled by the first prepare(); none ran yet")
        return self.precision

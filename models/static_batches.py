"""Fixed-size batches for `CachedWav2Lip`'s per-frame forward: static buffers, padding, CUDA graphs.

Why: a GPU render worker runs one batch per tick whose size changes with the number of talking sessions.
At small batches the forward is bound by its ~100 kernel launches, not by arithmetic; a CUDA graph
replays them as one launch. A graph has fixed shapes and fixed addresses, hence:

- batch sizes are rounded up to a few buckets (`batch_buckets`: 1, 2, 4, ..., max_batch). Pad rows
  repeat the last real sample (valid inputs, no NaN risk) and their results are dropped;
- every input lives in a preallocated static tensor: the mel windows (staged in a pinned host buffer,
  copied without blocking), the avatar frame indices, and the cached rows gathered for those indices
  (`index_select(..., out=static)`). The gather runs outside the graph, so one set of graphs serves every
  avatar whose cache has the same layout (same `heads` and `rows_from`);
- the uint8 result (official conversion, x * 255 truncated) is made on the device and copied to a
  pinned host buffer, so only bytes cross the bus.

On CUDA every bucket is captured once (`capture`, at the renderer's prepare): warm-up iterations on a
side stream first (lazy cuDNN/cuBLAS initialisation must not happen inside a capture, as the PyTorch
CUDA graphs notes require), then one `torch.cuda.CUDAGraph` per bucket, all from one private memory pool.
Sharing the pool is safe here because every graph's live tensors (static inputs, its static output) stay
referenced, so another graph never reuses them, and replays are serialised by the runner's lock on one
stream. If capture fails the runner logs once and runs the same buffers eagerly. On CPU it always runs
eagerly with the same bucketing, padding and buffers, which is what the CPU tests check against the
plain forward.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from models.wav2lip import FACE_SIZE, MEL_BINS, MEL_STEPS, CachedWav2Lip, FaceCache

log = logging.getLogger(__name__)

# Below 32 a GPU batch costs about the same whatever its size (launch bound), so doubling wastes
# little; above, cost grows with the batch, so the steps are finer (at most 1.5x padding).
_BASE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)
_CAPTURE_ERROR_MODE = "capture_error_mode" in inspect.signature(torch.cuda.graph.__init__).parameters


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The fixed batch sizes for batches of up to `max_batch` frames, always ending at max_batch."""
    max_batch = int(max_batch)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in _BASE_BUCKETS if b < max_batch]
    b = _BASE_BUCKETS[-1] * 2
    while b < max_batch:  # beyond the table: keep doubling
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def _static_like(t: Tensor, rows: int) -> Tensor:
    """A zeroed (rows, *t.shape[1:]) buffer with t's dtype, device and memory format."""
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=fmt).zero_()


def _gather_rows(src: Tensor, index: Tensor, dst: Tensor) -> None:
    """dst[:] = src[index], written into dst's own memory (its address is what a graph reads).

    `index_select(out=)` with a dense `out` of the right shape writes in place on CPU and CUDA; a
    channels_last pair is viewed as dense NHWC for it. Anything else takes a copy through a temporary.
    """
    if src.is_contiguous() and dst.is_contiguous():
        torch.index_select(src, 0, index, out=dst)
        return
    if src.dim() == 4:
        s, d = src.permute(0, 2, 3, 1), dst.permute(0, 2, 3, 1)
        if s.is_contiguous() and d.is_contiguous():
            torch.index_select(s, 0, index, out=d)
            return
    dst.copy_(src.index_select(0, index))


class StaticBatchRunner:
    """Runs `net(mel, cache rows, rows_from)` for batches of up to `max_batch` frames at fixed sizes.

    net: a CachedWav2Lip already on its device and dtype. cache: any FaceCache of the layout this runner
    serves (it sizes the static row buffers; `accepts` tells whether another cache fits). cuda_graphs:
    capture the buckets as CUDA graphs (only on CUDA; call `capture()`). Not re-entrant by design: one
    lock serialises `run` (and `capture`), as one render worker per device calls it anyway.
    """

    def __init__(self, net: CachedWav2Lip, cache: FaceCache, rows_from: int, max_batch: int, *,
                 buckets: Sequence[int] | None = None, cuda_graphs: bool = True, warmup_iters: int = 3) -> None:
        param = next(net.parameters())
        self.net = net
        self.device, self.dtype = param.device, param.dtype
        self.rows_from = int(rows_from)
        self.heads = cache.heads
        self.buckets = tuple(sorted({int(b) for b in buckets})) if buckets else batch_buckets(max_batch)
        if self.buckets[0] < 1:
            raise ValueError(f"bucket sizes must be >= 1, got {self.buckets}")
        self.max_batch = self.buckets[-1]
        self.warmup_iters = int(warmup_iters)
        self.graphs_enabled = bool(cuda_graphs) and self.device.type == "cuda"
        self.fallback_reason: str | None = None  # why graphs are off after a failed capture
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._lock = threading.Lock()
        on_cuda = self.device.type == "cuda"
        b = self.max_batch
        out_rows = FACE_SIZE - self.rows_from
        with torch.inference_mode(), self._on_device():
            # Host staging: pinned on CUDA so the host-to-device copies can be asynchronous.
            self._host_mel = torch.zeros((b, 1, MEL_BINS, MEL_STEPS), dtype=self.dtype, pin_memory=on_cuda)
            self._host_index = torch.zeros(b, dtype=torch.int64, pin_memory=on_cuda)
            self._host_out = torch.zeros((b, out_rows, FACE_SIZE, 3), dtype=torch.uint8, pin_memory=on_cuda)
            # Device statics: what the graphs read.
            self._mel = torch.zeros((b, 1, MEL_BINS, MEL_STEPS), dtype=self.dtype, device=self.device)
            self._index = torch.zeros(b, dtype=torch.int64, device=self.device)
            self._rows = [_static_like(t, b) for t in cache.tensors]
        self._done = torch.cuda.Event() if on_cuda else None

    # -- public API -------------------------------------------------------------------------------
    @property
    def captured(self) -> tuple[int, ...]:
        """Bucket sizes that replay a CUDA graph."""
        return tuple(sorted(self._graphs))

    def bucket(self, n: int) -> int:
        """The smallest bucket holding n frames."""
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} exceeds the largest bucket {self.max_batch}")

    def accepts(self, cache: FaceCache) -> bool:
        """Whether `cache` has the layout the static row buffers were made for."""
        return (cache.heads == self.heads and len(cache.tensors) == len(self._rows)
                and all(t.shape[1:] == r.shape[1:] and t.dtype == r.dtype and t.device == r.device
                        for t, r in zip(cache.tensors, self._rows, strict=True)))

    def capture(self) -> bool:
        """Capture every bucket as a CUDA graph (once). False, with graphs off, on CPU or on failure."""
        with self._lock:
            if self._graphs or not self.graphs_enabled:
                return bool(self._graphs)
            try:
                self._graphs = self._capture_all()
            except Exception as exc:  # e.g. an op that cannot be captured, or out of memory
                self._graphs = {}
                self.graphs_enabled = False
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed on %s (%s); running batches eagerly",
                            self.device, self.fallback_reason)
                return False
            log.info("CUDA graphs captured on %s for batch sizes %s", self.device, list(self.captured))
            return True

    def run(self, cache: FaceCache, indices: np.ndarray, mels: np.ndarray) -> np.ndarray:
        """(b,) avatar frame indices + (b, 80, 16) mel windows -> (b, 96 - rows_from, 96, 3) uint8 BGR."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        b = len(indices)
        if b == 0:
            return np.zeros((0, FACE_SIZE - self.rows_from, FACE_SIZE, 3), dtype=np.uint8)
        mels = np.asarray(mels, dtype=np.float32)
        if mels.shape != (b, MEL_BINS, MEL_STEPS):
            raise ValueError(f"expected mels of shape ({b}, {MEL_BINS}, {MEL_STEPS}), got {mels.shape}")
        if not self.accepts(cache):
            raise ValueError("this cache's layout differs from the one the static buffers were made for")
        if indices.min() < 0 or indices.max() >= len(cache):
            # Checked here: an out-of-range gather on a GPU is a device-side assert that ends the process.
            raise IndexError(f"frame index out of range for a cache of {len(cache)} frames")
        n = self.bucket(b)
        with self._lock, torch.inference_mode(), self._on_device():
            # Stage on the host. The previous call ended with a synchronisation, so no copy still reads
            # these pinned buffers. Pad rows repeat the last sample.
            self._host_mel[:b, 0].copy_(torch.from_numpy(mels))
            self._host_index[:b].copy_(torch.from_numpy(indices))
            if n > b:
                self._host_mel[b:n] = self._host_mel[b - 1]
                self._host_index[b:n] = int(indices[-1])
            self._mel[:n].copy_(self._host_mel[:n], non_blocking=True)
            self._index[:n].copy_(self._host_index[:n], non_blocking=True)
            for src, dst in zip(cache.tensors, self._rows, strict=True):
                _gather_rows(src, self._index[:n], dst[:n])
            graph = self._graphs.get(n)
            if graph is not None:
                graph[0].replay()
                out = graph[1]
            else:
                out = self._compute(n)
            self._host_out[:n].copy_(out, non_blocking=True)
            if self._done is not None:
                # Wait for this stream only (not the whole device): other devices' workers keep going.
                self._done.record()
                self._done.synchronize()
            return self._host_out[:b].numpy().copy()  # the pinned buffer is reused by the next call

    # -- internals --------------------------------------------------------------------------------
    def _on_device(self) -> contextlib.AbstractContextManager:
        """Make this runner's GPU current: graph replay, events and streams use the current device."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _compute(self, n: int) -> Tensor:
        """The work a graph holds: the first n rows of the static inputs -> (n, rows, 96, 3) uint8."""
        pred = self.net(self._mel[:n], [r[:n] for r in self._rows], self.rows_from)
        # Official conversion: float32 x 255, then truncation.
        return (pred.float() * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def _capture_all(self) -> dict[int, tuple[torch.cuda.CUDAGraph, Tensor]]:
        graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        kwargs: dict[str, Any] = {"capture_error_mode": "thread_local"} if _CAPTURE_ERROR_MODE else {}
        with torch.inference_mode(), self._on_device():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for n in self.buckets:
                    for _ in range(self.warmup_iters):
                        self._compute(n)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            pool = torch.cuda.graph_pool_handle()
            # Largest first: the smaller captures then fit in blocks the larger one already reserved.
            for n in sorted(self.buckets, reverse=True):
                graph = torch.cuda.CUDAGraph()
                # thread_local: only this thread's capture-unsafe calls are checked, so a worker thread
                # rendering on another device meanwhile does not break (or get broken by) this capture.
                with torch.cuda.graph(graph, pool=pool, **kwargs):
                    out = self._compute(n)
                graphs[n] = (graph, out)
            torch.cuda.synchronize()
        return graphs

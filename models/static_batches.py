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

On CUDA every bucket is captured once (`capture`, at the renderer's prepare): warm-up iterations first
(lazy cuDNN/cuBLAS initialisation must not happen inside a capture, as the PyTorch CUDA graphs notes
require), then one `torch.cuda.CUDAGraph` per bucket, all from one private memory pool. Sharing the pool
is safe here because every graph's live tensors (static inputs, its static output) stay referenced, so
another graph never reuses them, and replays are serialised by the runner's lock on one stream.

One stream per runner, made on the runner's own device, carries the warm-up, the captures and every
run. Why not PyTorch's default capture stream: it is created once per process, on whichever device was
current at the first capture, so capturing cuda:1's graphs on it records an empty graph (PyTorch only
warns) whose replays return stale patches, the same frozen mouth for every session on that GPU.

Verified, not trusted: after capture every bucket replays once on random inputs (random avatar rows of
the cache it was captured for, random mel windows) with a sentinel written into its output buffer first,
and must match the eager forward on the same static inputs within one uint8 level (the eager path may
pick other kernels). Any mismatch (an untouched sentinel, stale or wrong output) drops every graph and
the runner runs eagerly, with the reason in `fallback_reason`; the per-bucket differences are kept in
`verified`. If capture fails the runner likewise logs once and runs the same buffers eagerly. On CPU it
always runs eagerly with the same bucketing, padding and buffers, which is what the CPU tests check
against the plain forward.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Iterator
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from models.cuda_numerics import cudnn_autotune
from models.wav2lip import FACE_SIZE, MEL_BINS, MEL_STEPS, CachedWav2Lip, FaceCache

log = logging.getLogger(__name__)

# Below 32 a GPU batch costs about the same whatever its size (launch bound), so doubling wastes
# little; above, cost grows with the batch, so the steps are finer (at most 1.5x padding).
_BASE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)
_CAPTURE_ERROR_MODE = "capture_error_mode" in inspect.signature(torch.cuda.graph.__init__).parameters
# Written into a graph's output before its verification replay: a replay that writes nothing leaves it.
SENTINEL = 0xA5
MAX_REPLAY_DIFF = 1  # uint8 levels a verified replay may differ from the eager forward (kernel choice)


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
    capture the buckets as CUDA graphs (only on CUDA; call `capture(cache)`). Not re-entrant by design:
    one lock serialises `run` (and each capture step), as one render worker per device calls it anyway.
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
        self.fallback_reason: str | None = None  # why graphs are off after a failed capture or check
        self.verified: dict[int, int] = {}  # bucket -> max |replay - eager| (uint8 levels) at capture
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._capture_done = False
        self._lock = threading.Lock()
        on_cuda = self.device.type == "cuda"
        # This runner's own stream on its own device: warm-up, captures and runs (module docstring).
        self._stream = torch.cuda.Stream(device=self.device) if on_cuda else None
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

    def capture(self, cache: FaceCache | None = None) -> bool:
        """Capture every bucket as a CUDA graph (once) and verify each against the eager forward on rows
        of `cache` (skipped without one). False, with graphs off, on CPU, on failure or on a mismatch."""
        for _ in self.capture_steps(cache):
            pass
        return bool(self._graphs)

    def capture_steps(self, cache: FaceCache | None = None) -> Iterator[None]:
        """`capture` in short steps (one bucket's warm-up, capture or check each), yielding in between,
        so that a render worker can run other batches between them (a capture synchronises the device).
        The graphs serve `run` only once the last step has passed."""
        if self._capture_done or not self.graphs_enabled:
            return
        self._capture_done = True
        graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        try:
            for _ in self._capture_all_steps(graphs):
                yield
            if cache is not None:
                self.verified = {}
                for n in self.buckets:
                    with self._lock:
                        self.verified[n] = self._verify_bucket(cache, n, graphs[n])
                    yield
                bad = {n: d for n, d in self.verified.items() if d > MAX_REPLAY_DIFF}
                if bad:
                    raise ReplayMismatch(bad)
        except Exception as exc:  # e.g. an op that cannot be captured, out of memory, or a wrong replay
            self._graphs = {}
            self.graphs_enabled = False
            self.fallback_reason = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graphs on %s failed (%s); running batches eagerly", self.device, self.fallback_reason)
            return
        self._graphs = graphs
        log.info("CUDA graphs captured on %s for batch sizes %s%s", self.device, list(self.captured),
                 f", replay within {max(self.verified.values())} uint8 level(s) of eager" if self.verified else "")

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
            self._stage(cache, indices, mels, n)
            graph = self._graphs.get(n)
            if graph is not None:
                graph[0].replay()
                out = graph[1]
            else:
                out = self._compute(n)
            return self._fetch(out, n)[:b].numpy().copy()  # the pinned buffer is reused by the next call

    # -- internals --------------------------------------------------------------------------------
    def _on_device(self) -> contextlib.AbstractContextManager:
        """Make this runner's GPU and stream current: copies, kernels, replays and events go there."""
        if self._stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self._stream))
        return stack

    def _stage(self, cache: FaceCache, indices: np.ndarray, mels: np.ndarray, n: int) -> None:
        """Fill the first n rows of the static inputs; pad rows repeat the last sample. The previous call
        ended with a synchronisation, so no copy still reads the pinned host buffers."""
        b = len(indices)
        if self._stream is not None:
            # The cache was written on another stream (the renderer's prepare): order after it.
            self._stream.wait_stream(torch.cuda.default_stream(self.device))
        self._host_mel[:b, 0].copy_(torch.from_numpy(mels))
        self._host_index[:b].copy_(torch.from_numpy(indices))
        if n > b:
            self._host_mel[b:n] = self._host_mel[b - 1]
            self._host_index[b:n] = int(indices[-1])
        self._mel[:n].copy_(self._host_mel[:n], non_blocking=True)
        self._index[:n].copy_(self._host_index[:n], non_blocking=True)
        for src, dst in zip(cache.tensors, self._rows, strict=True):
            _gather_rows(src, self._index[:n], dst[:n])

    def _fetch(self, out: Tensor, n: int) -> Tensor:
        """out (n rows on the device) -> the pinned host buffer's first n rows, once the copy is done."""
        self._host_out[:n].copy_(out, non_blocking=True)
        if self._done is not None:
            # Wait for this stream only (not the whole device): other devices' workers keep going.
            self._done.record()
            self._done.synchronize()
        return self._host_out[:n]

    def _compute(self, n: int) -> Tensor:
        """The work a graph holds: the first n rows of the static inputs -> (n, rows, 96, 3) uint8."""
        pred = self.net(self._mel[:n], [r[:n] for r in self._rows], self.rows_from)
        # Official conversion: float32 x 255, then truncation.
        return (pred.float() * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def _verify_bucket(self, cache: FaceCache, n: int, graph: tuple[torch.cuda.CUDAGraph, Tensor]) -> int:
        """Max |replay - eager| in uint8 levels for bucket n on random inputs; 256 when the replay left
        the sentinel in its output (it wrote nothing)."""
        rng = np.random.default_rng(n)
        indices = rng.integers(0, len(cache), n)
        mels = rng.uniform(-4.0, 4.0, (n, MEL_BINS, MEL_STEPS)).astype(np.float32)
        with torch.inference_mode(), self._on_device():
            self._stage(cache, indices, mels, n)
            replay, out = graph
            out.fill_(SENTINEL)
            replay.replay()
            got = self._fetch(out, n).numpy().copy()
            want = self._fetch(self._compute(n), n).numpy()
        if (got == SENTINEL).all() and not (want == SENTINEL).all():
            return 256
        return int(np.abs(got.astype(np.int16) - want).max())

    def _capture_all_steps(self, graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]]) -> Iterator[None]:
        """Warm up every bucket on this runner's stream (cuDNN autotuned), then capture them one by one
        into `graphs`, yielding after each step."""
        kwargs: dict[str, Any] = {"capture_error_mode": "thread_local"} if _CAPTURE_ERROR_MODE else {}
        for n in self.buckets:
            with self._lock, torch.inference_mode(), self._on_device(), cudnn_autotune():
                for _ in range(self.warmup_iters):
                    self._compute(n)
                torch.cuda.current_stream().synchronize()
            yield
        pool = torch.cuda.graph_pool_handle()
        # Largest first: the smaller captures then fit in blocks the larger one already reserved.
        for n in sorted(self.buckets, reverse=True):
            with self._lock, torch.inference_mode(), self._on_device():
                graph = torch.cuda.CUDAGraph()
                # thread_local: only this thread's capture-unsafe calls are checked, so a worker thread
                # rendering on another device meanwhile does not break (or get broken by) this capture.
                # stream=: this runner's stream on this device, never the process-wide default one.
                with torch.cuda.graph(graph, pool=pool, stream=self._stream, **kwargs):
                    out = self._compute(n)
                torch.cuda.current_stream().synchronize()
            graphs[n] = (graph, out)
            yield


class ReplayMismatch(RuntimeError):
    """Some captured bucket's replay differs from the eager forward: the graphs are not used."""

    def __init__(self, diffs: dict[int, int]) -> None:
        self.diffs = diffs
        shown = ", ".join(f"batch {n}: " + ("output untouched" if d > 255 else f"max |diff| {d}")
                          for n, d in sorted(diffs.items()))
        super().__init__(f"CUDA graph replay differs from eager ({shown})")

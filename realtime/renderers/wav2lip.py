"""The Wav2Lip mouth renderer: batched generator calls with the avatar-constant work cached per avatar.

`prepare(avatar)` crops every avatar frame the official way (avatar.face_crops(96)), builds the
[masked, reference] input and runs the face encoder once, keeping what the decoder needs per frame
(`models.wav2lip.CachedWav2Lip`: the encoder features, or by default the encoder's share of every
decoder stage's first conv, which saves ~6% of the per-frame work). `render` then runs only the audio
encoder and the decoder for a batch of (avatar frame, mel window) pairs, converts the result to uint8
the official way (x * 255, truncated) and returns one 96x96 BGR patch per frame with the avatar's box;
the compositor resizes it to the box and blends it.

Runtime and precision (`runtime`, `precision`, both "auto" by default):
- CPU: OpenVINO (realtime/renderers/openvino_frames.py; ~1.5x PyTorch at the same fp32 numerics,
  bench/runtimes.py). fp32 equals the official eager model within float rounding (uint8 patches within
  one level). bf16 is ~2x faster again on CPUs with AVX512-BF16/AMX but lossy, by an amount that depends
  on the weights (39-46.5 dB PSNR over 11 random weight seeds), so "auto" adopts it only when the start-up gate
  (precision_gate.py) measures it >= `min_psnr_db` (35) from fp32 on this checkpoint and avatar, and
  faster on this CPU. `runtime="torch"` keeps the PyTorch path (fp32, or bf16 when asked).
- CUDA: PyTorch fp16 with the cache resident on the GPU, batches at fixed sizes through CUDA graphs
  (models/static_batches.py). fp16 is checked, not assumed: with "auto", the first `prepare` checks the
  folded fp16 weights are finite and runs the same gate, fp16 against real fp32 (TF32 off) on the
  calibration set over the avatar's frames, accuracy alone deciding (`settle_cuda_precision`); below the
  bound it serves fp32. fp32 on CUDA means fp32: TF32 is switched off for the process
  (models/cuda_numerics.py). `describe()` reports the gate, TF32 and the graphs' check (/healthz).

Rows: by default (`rows_from=PASTED_ROWS_FROM`) only rows [36, 96) of each patch are generated
(CachedWav2Lip's band decode, exact for those rows, ~40% less decoder work); rows above are the
avatar's own reference crop. The compositor's default feathered lower-face mask is exactly 0 wherever
its bilinear resize would read patch rows < 39, so a feathered paste is unchanged. An "official" hard
paste shows the whole patch: construct with `rows_from=0` when any session pastes that way.

Sharing: the per-avatar caches are read-only after `prepare`, so one instance serves any number of
sessions; `render` is meant to be called from the single render-worker thread. `prepare_steps` is
`prepare` in short slices (crops, the gate, chunks of the face encoder, each bucket's capture and check)
so that the render worker can run it on its own thread between live batches (realtime/scheduling/scheduler.py):
cuDNN's plans are cached per thread, and a second avatar prepared while serving must not stall the
running sessions.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from models.cuda_numerics import cudnn_autotune, disable_tf32, strict_fp32, tf32_enabled
from models.static_batches import StaticBatchRunner
from models.wav2lip import CachedWav2Lip, FaceCache, Wav2Lip, cache_values, faces_to_input
from realtime.audio.mel import MelAlignment
from realtime.avatars.avatar import Avatar
from realtime.renderers.base import AudioNeeds, MouthPatch, MouthRenderer, RendererTraits, int_box
from realtime.renderers.openvino_frames import OpenVinoFrames
from realtime.renderers.precision_gate import DEFAULT_MIN_PSNR_DB, GateReport, Generate, choose_precision

log = logging.getLogger(__name__)

CROP_SIZE = 96
# First patch row the realtime compositor's default feathered mask can read: the mask is 0 for box rows
# y with (y + 0.5) / h <= 0.42, and bilinear resizing reads patch rows >= floor(0.42 * 96 - 0.5) = 39 for
# the others (tests/test_wav2lip_renderer.py checks it for box heights 8..600). 36 keeps a 3-row margin.
PASTED_ROWS_FROM = 36
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


RUNTIMES = ("auto", "openvino", "torch")


def _resolve_runtime(runtime: str, device: torch.device) -> str:
    """'auto': OpenVINO on CPU when it imports (faster, bench/runtimes.py), PyTorch on CUDA and otherwise."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "openvino" and device.type != "cpu":
        raise ValueError(f"the OpenVINO runtime runs on the CPU; for {device.type} use runtime 'torch'")
    if runtime == "auto":
        from models import openvino_runtime

        return "openvino" if device.type == "cpu" and openvino_runtime.available() else "torch"
    return runtime


def _resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in _DTYPES:
        raise ValueError(f"precision must be 'auto', 'fp32', 'fp16' or 'bf16', not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 is for CUDA; on CPU use fp32 (faithful) or bf16 (fast, not faithful)")
    return _DTYPES[precision]


# Face-encoder frames per prepare slice: a worker runs one slice between live batches.
PREPARE_CHUNK = 16


def weights_finite(net: torch.nn.Module) -> bool:
    """Whether every parameter is finite (folding BatchNorm can push a weight past fp16's 65504)."""
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


def settle_cuda_precision(half_net: torch.nn.Module, reference: Generate, candidate: Generate, n_frames: int,
                          min_psnr_db: float) -> tuple[str, GateReport | None, str]:
    """fp16 or fp32 for a CUDA renderer with precision "auto": (choice, the gate's report, why).

    fp16 only when its folded weights are all finite and the gate (precision_gate, accuracy alone: on a
    GPU fp16 is the default, not an opt-in for speed) finds its patches within min_psnr_db of fp32.
    """
    if not weights_finite(half_net):
        return "fp32", None, "folded fp16 weights are not finite (overflow): serving fp32"
    report = choose_precision(("fp32", reference), {"fp16": candidate}, n_frames, min_psnr_db, min_speedup=None)
    if report.chosen == "fp16":
        return "fp16", report, f"fp16 within the bound: {report.summary()}"
    return "fp32", report, f"fp16 below the bound, serving fp32: {report.summary()}"


def _uint8_patches(net: CachedWav2Lip, cache: FaceCache, indices: np.ndarray, mels: np.ndarray,
                   rows_from: int) -> np.ndarray:
    """The eager per-frame forward for (avatar frame, mel window) pairs -> uint8 (B, rows, 96, 3)."""
    param = next(net.parameters())
    with torch.inference_mode():
        # A copy (not a view of the caller's array): `mels` must not be referenced after return.
        audio = torch.tensor(mels[:, None]).to(device=param.device, dtype=param.dtype)
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(param.device)
        pred = net(audio, cache.select(index), rows_from)
        # Official conversion: float32 x 255 then truncation (astype(uint8)); done on the device
        # so that only bytes cross to the host.
        out = (pred.float() * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    result: np.ndarray = out.cpu().numpy()
    return result


class Wav2LipRenderer(MouthRenderer):
    """MouthRenderer backed by a Wav2Lip generator.

    model: a loaded generator (`models.wav2lip.load_wav2lip`); it is not modified.
    device: where to run (default: the model's device). precision: "auto" (CPU fp32, CUDA fp16),
    "fp32", "fp16" (CUDA), "bf16" (opt-in, not faithful).
    max_cache_mb: per-avatar cache budget. The decoder-head cache takes 5.6 MB per avatar frame in
    fp32 (3.8 MB with the default rows_from=36, so 200 frames fit the default 1 GB); above the budget
    the renderer keeps only the encoder features (1.2 MB per frame, ~0.9 MB with rows_from=36).
    max_batch: frames per generator call (larger batches are split) to bound activation memory.
    rows_from: generate only patch rows [rows_from, 96) (rows above come from the reference crop):
    PASTED_ROWS_FROM (default) for the feathered paste, 0 for full patches (official hard paste).
    cuda_graphs: on CUDA, run batches through `models.static_batches.StaticBatchRunner` (fixed batch
    sizes, static and pinned buffers, one CUDA graph per size, captured at prepare); ignored on CPU.
    `static_batches` (derived) may be set to True on CPU before `prepare` to run that padding path
    eagerly (tests do).
    """

    name = "wav2lip"

    def __init__(self, model: Wav2Lip, device: str | torch.device | None = None, *, precision: str = "auto",
                 max_cache_mb: float = 1024.0, max_batch: int | None = None,
                 rows_from: int = PASTED_ROWS_FROM, cuda_graphs: bool = True, runtime: str = "auto",
                 min_psnr_db: float = DEFAULT_MIN_PSNR_DB,
                 mel_alignment: MelAlignment = MelAlignment.OFFICIAL) -> None:
        param = next(model.parameters())
        # Where each frame's window starts (official inference or the training code's alignment, one
        # frame earlier): the engine's look-ahead follows it (212.5 ms or 172.5 ms at 25 fps).
        self.mel_alignment = MelAlignment(mel_alignment)
        self.device = torch.device(device) if device is not None else param.device
        self.runtime = _resolve_runtime(runtime, self.device)
        self._runtime_chosen = runtime != "auto"  # an explicit choice is never swapped for another
        self._requested_precision = precision
        self.dtype = _resolve_dtype(precision, self.device)  # validates precision for either runtime
        if self.runtime == "openvino":
            self.dtype = torch.float32  # the torch side only folds and precomputes; OpenVINO sets the numerics
        self.max_cache_bytes = max_cache_mb * 2**20
        self.max_batch = max_batch or (128 if self.device.type == "cuda" else 32)
        if not 0 <= int(rows_from) < CROP_SIZE:
            raise ValueError(f"rows_from must be in [0, {CROP_SIZE}), got {rows_from}")
        self.rows_from = int(rows_from)
        # render_mixed: one call per avatar within the worker's batch.
        self.traits = RendererTraits(mixes_avatars=True, rows_from=self.rows_from, device=str(self.device),
                                     audio_needs=AudioNeeds(offset_frames=self.mel_alignment.offset_frames))
        # Fold BatchNorm in fp32 even when the loaded model is fp16 (load_wav2lip(device="cuda")),
        # then cast once: the folded weights are rounded a single time.
        self._source = model if param.dtype == torch.float32 else copy.deepcopy(model).float()
        self.min_psnr_db = float(min_psnr_db)
        # CUDA "auto": fp16 only once the first prepare has checked it (settle_cuda_precision).
        self._cuda_gate_pending = self.device.type == "cuda" and precision == "auto" and self.runtime == "torch"
        self.gate: GateReport | None = None
        self.precision_note: str | None = None
        if self.device.type == "cuda" and self.dtype == torch.float32:
            disable_tf32("a Wav2Lip renderer runs fp32 on CUDA")
        # CPU through OpenVINO: fp32, bf16, or "auto" (bf16 only where measured accurate and faster).
        self._ov = (OpenVinoFrames(self._source, self.rows_from, precision, max_cache_bytes=self.max_cache_bytes,
                                   min_psnr_db=min_psnr_db, threads=torch.get_num_threads())
                    if self.runtime == "openvino" else None)
        self._nets: dict[bool, CachedWav2Lip] = {}  # cache_heads -> net, built on first need
        self._caches: weakref.WeakKeyDictionary[Any, FaceCache] = weakref.WeakKeyDictionary()
        # Reference crops' rows above rows_from (uint8 (N, rows_from, 96, 3)), the top of every patch.
        self._tops: weakref.WeakKeyDictionary[Any, np.ndarray] = weakref.WeakKeyDictionary()
        self._lock = threading.RLock()  # held across prepare_steps' slices (re-entered by render's prepare)
        self.cuda_graphs = bool(cuda_graphs)
        self.static_batches = self.cuda_graphs and self.device.type == "cuda"
        self._runners: dict[bool, StaticBatchRunner] = {}  # cache_heads -> runner, made at prepare

    def _use_torch(self) -> None:
        """Fall back from OpenVINO to the PyTorch runtime (fp32 unless bf16 was asked for)."""
        self._ov = None
        self.runtime = "torch"
        self.dtype = _resolve_dtype(self._requested_precision, self.device)

    def _is_prepared(self, avatar: Avatar) -> bool:
        return avatar in self._caches or (self._ov is not None and self._ov.has(avatar))

    @property
    def precision(self) -> str:
        """The numerics in use: fp32 / bf16 / fp16 ("auto" until an OpenVINO renderer's first prepare)."""
        if self._ov is not None:
            return self._ov.precision or "auto"
        if self._cuda_gate_pending:
            return "auto"
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def describe(self) -> dict[str, str]:
        """Runtime facts for logs and /healthz: runtime, device, precision and the precision gate's numbers."""
        info = {"runtime": self.runtime, "device": str(self.device), "precision": self.precision,
                "rows_from": str(self.rows_from), "mel_alignment": self.mel_alignment.value}
        gate = self._ov.gate if self._ov is not None else self.gate
        if gate is not None:
            info["precision_gate"] = gate.summary()
        elif self.precision_note is not None:
            info["precision_gate"] = self.precision_note
        if self.device.type == "cuda":
            info["tf32"] = "on" if tf32_enabled() else "off"
            runner = next(iter(self._runners.values()), None)
            if runner is not None:
                info["cuda_graphs"] = (f"batch sizes {list(runner.captured)}, replay within "
                                       f"{max(runner.verified.values(), default=0)} level(s) of eager"
                                       if runner.captured else f"off ({runner.fallback_reason or 'not captured'})")
        return info

    def warmup_context(self) -> contextlib.AbstractContextManager[Any]:
        """Entered by the render worker around its warm-up renders: cuDNN autotuning on CUDA."""
        return cudnn_autotune() if self.device.type == "cuda" else contextlib.nullcontext()

    def _build_net(self, cache_heads: bool, dtype: torch.dtype) -> CachedWav2Lip:
        net = CachedWav2Lip(self._source, cache_heads=cache_heads, channels_last=True)
        return net.to(device=self.device, dtype=dtype)

    def _net(self, cache_heads: bool) -> CachedWav2Lip:
        if cache_heads not in self._nets:
            self._nets[cache_heads] = self._build_net(cache_heads, self.dtype)
        return self._nets[cache_heads]

    def _settle_cuda_precision(self, crops: np.ndarray) -> None:
        """precision "auto" on CUDA, at the first prepare: fp16 if checked accurate, else fp32."""
        self._cuda_gate_pending = False
        # The calibration pairs spread over (at most 96 of) the avatar's frames; only those are encoded.
        sub = crops[np.unique(np.linspace(0, len(crops) - 1, min(len(crops), 96)).round().astype(np.int64))]
        half = self._build_net(True, torch.float16)
        full = self._build_net(True, torch.float32)
        faces = faces_to_input(sub).to(self.device)
        with strict_fp32():
            ref_cache = full.precompute(faces, rows_from=self.rows_from)
        half_cache = half.precompute(faces.half(), rows_from=self.rows_from)

        def reference(i: np.ndarray, m: np.ndarray) -> np.ndarray:
            with strict_fp32():
                return _uint8_patches(full, ref_cache, i, m, self.rows_from)

        def candidate(i: np.ndarray, m: np.ndarray) -> np.ndarray:
            return _uint8_patches(half, half_cache, i, m, self.rows_from)

        chosen, self.gate, self.precision_note = settle_cuda_precision(half, reference, candidate, len(sub),
                                                                       self.min_psnr_db)
        log.log(logging.INFO if chosen == "fp16" else logging.WARNING, "wav2lip on %s: %s",
                self.device, self.precision_note)
        self.dtype = _DTYPES[chosen]
        self._nets = {True: half} if chosen == "fp16" else {True: full}
        if chosen == "fp32":
            disable_tf32("the fp16 check fell back to fp32 on CUDA")

    def prepare(self, avatar: Avatar) -> None:
        """Run the face encoder on every avatar frame once and keep the result (on the device)."""
        for _ in self.prepare_steps(avatar):
            pass

    def prepare_steps(self, avatar: Avatar) -> Iterator[None]:
        """`prepare` in slices, yielding between them (see the module docstring); the avatar is served
        only once the last slice is done."""
        with self._lock:
            if self._is_prepared(avatar):
                return
            crops = avatar.face_crops(CROP_SIZE)
            n = len(crops)
            if self._ov is not None:
                try:
                    nbytes = self._ov.prepare(avatar, crops)
                except Exception:
                    if self._runtime_chosen or self._ov.serves_any():
                        raise
                    # runtime "auto": a graph OpenVINO cannot take (a torch or OpenVINO version we have
                    # not met) must not stop the server; the PyTorch path computes the same thing.
                    log.warning("wav2lip: OpenVINO failed to prepare the generator; using PyTorch instead",
                                exc_info=True)
                    self._use_torch()
                else:
                    self._tops[avatar] = np.ascontiguousarray(crops[:, :self.rows_from])
                    log.info("wav2lip: prepared %d avatar frames (OpenVINO CPU, %s, %.0f MB cached)",
                             n, self._ov.precision, nbytes / 2**20)
                    return
            yield
            if self._cuda_gate_pending:
                self._settle_cuda_precision(crops)
                yield
            frame_bytes = cache_values(True, self.rows_from) * torch.finfo(self.dtype).bits // 8
            cache_heads = n * frame_bytes <= self.max_cache_bytes
            if not cache_heads:
                log.info("avatar cache: %d frames x %.1f MB exceeds %.0f MB, caching encoder features only",
                         n, frame_bytes / 2**20, self.max_cache_bytes / 2**20)
            net = self._net(cache_heads)
            faces = faces_to_input(crops)
            parts: list[FaceCache] = []
            for start in range(0, n, PREPARE_CHUNK):  # only the rows the band decode reads
                chunk = faces[start:start + PREPARE_CHUNK].to(device=self.device, dtype=self.dtype)
                parts.append(net.precompute(chunk, rows_from=self.rows_from))
                yield
            cache = parts[0] if len(parts) == 1 else FaceCache(
                [torch.cat(ts).contiguous(memory_format=torch.channels_last)
                 for ts in zip(*(p.tensors for p in parts), strict=True)],
                heads=cache_heads, rows_from=self.rows_from)
            if self.static_batches and cache.heads not in self._runners:
                # Static buffers and (on CUDA) graphs are made once per cache layout, here rather than
                # on the first render, so that no session's frame pays for a capture.
                runner = StaticBatchRunner(net, cache, self.rows_from, self.max_batch,
                                           cuda_graphs=self.cuda_graphs)
                yield from runner.capture_steps(cache)
                self._runners[cache.heads] = runner
            self._caches[avatar] = cache
            self._tops[avatar] = np.ascontiguousarray(crops[:, :self.rows_from])
            log.info("wav2lip: prepared %d avatar frames on %s (%s, %.0f MB cached)",
                     n, self.device, str(self.dtype).removeprefix("torch."), cache.nbytes / 2**20)

    def release(self, avatar: Avatar) -> None:
        """Drop an avatar's cache now (it also goes when the avatar object is garbage-collected)."""
        with self._lock:
            self._caches.pop(avatar, None)
            self._tops.pop(avatar, None)
            if self._ov is not None:
                self._ov.release(avatar)

    def render(self, avatar: Avatar, frame_indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
        """One 96x96 uint8 BGR patch per (avatar frame, mel window (80, 16)), with the frame's face box."""
        indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        mels = np.asarray(mels, dtype=np.float32)
        if mels.shape != (len(indices), 80, 16):
            raise ValueError(f"expected mels of shape ({len(indices)}, 80, 16), got {mels.shape}")
        if not self._is_prepared(avatar):
            log.warning("wav2lip: render() on an avatar that was not prepared; preparing it now")
            self.prepare(avatar)
        ov = self._ov
        if ov is not None:
            n_frames = ov.frames(avatar)

            def generate(i: np.ndarray, m: np.ndarray) -> np.ndarray:
                return ov.generate(avatar, i, m)
        else:
            cache = self._caches[avatar]
            n_frames = len(cache)

            def generate(i: np.ndarray, m: np.ndarray) -> np.ndarray:
                return self._generate(cache, i, m)
        tops = self._tops[avatar]
        if len(indices) and (indices.min() < 0 or indices.max() >= n_frames):
            raise IndexError(f"frame index out of range for an avatar of {n_frames} frames: "
                             f"{indices.min()}..{indices.max()}")
        if not len(indices):
            return []
        images = np.concatenate([generate(indices[s:s + self.max_batch], mels[s:s + self.max_batch])
                                 for s in range(0, len(indices), self.max_batch)])
        if self.rows_from:
            images = np.concatenate([tops[indices], images], axis=1)
        boxes = np.asarray(avatar.boxes)
        return [MouthPatch(image=images[i], box=int_box(boxes[idx]))
                for i, idx in enumerate(indices)]

    def render_mixed(self, avatars: list[Avatar], frame_indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
        """`render` for a batch whose frames come from different avatars (`avatars[k]` for frame k): each
        avatar's cached features serve its frames, one generator call per avatar, results in order."""
        indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        groups: dict[int, list[int]] = {}
        for k, avatar in enumerate(avatars):
            groups.setdefault(id(avatar), []).append(k)
        out: list[MouthPatch | None] = [None] * len(indices)
        for ks in groups.values():
            for k, patch in zip(ks, self.render(avatars[ks[0]], indices[ks], mels[ks]), strict=True):
                out[k] = patch
        return [p for p in out if p is not None]

    def _generate(self, cache: FaceCache, indices: np.ndarray, mels: np.ndarray) -> np.ndarray:
        runner = self._runners.get(cache.heads) if self.static_batches else None
        if runner is not None and runner.accepts(cache) and len(indices) <= runner.max_batch:
            return runner.run(cache, indices, mels)
        return _uint8_patches(self._nets[cache.heads], cache, indices, mels, self.rows_from)

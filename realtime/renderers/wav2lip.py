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
  (models/static_batches.py).

Rows: by default (`rows_from=PASTED_ROWS_FROM`) only rows [36, 96) of each patch are generated
(CachedWav2Lip's band decode, exact for those rows, ~40% less decoder work); rows above are the
avatar's own reference crop. The compositor's default feathered lower-face mask is exactly 0 wherever
its bilinear resize would read patch rows < 39, so a feathered paste is unchanged. An "official" hard
paste shows the whole patch: construct with `rows_from=0` when any session pastes that way.

Sharing: the per-avatar caches are read-only after `prepare`, so one instance serves any number of
sessions; `render` is meant to be called from the single render-worker thread.
"""
from __future__ import annotations

import copy
import logging
import threading
import weakref
from typing import Any

import numpy as np
import torch

from models.static_batches import StaticBatchRunner
from models.wav2lip import CachedWav2Lip, FaceCache, Wav2Lip, cache_values, faces_to_input
from realtime.mel import MelAlignment
from realtime.renderers.base import AudioNeeds, MouthPatch, int_box
from realtime.renderers.openvino_frames import OpenVinoFrames
from realtime.renderers.precision_gate import DEFAULT_MIN_PSNR_DB

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


class Wav2LipRenderer:
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
        self.audio_needs = AudioNeeds(offset_frames=self.mel_alignment.offset_frames)
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
        # Fold BatchNorm in fp32 even when the loaded model is fp16 (load_wav2lip(device="cuda")),
        # then cast once: the folded weights are rounded a single time.
        self._source = model if param.dtype == torch.float32 else copy.deepcopy(model).float()
        # CPU through OpenVINO: fp32, bf16, or "auto" (bf16 only where measured accurate and faster).
        self._ov = (OpenVinoFrames(self._source, self.rows_from, precision, max_cache_bytes=self.max_cache_bytes,
                                   min_psnr_db=min_psnr_db, threads=torch.get_num_threads())
                    if self.runtime == "openvino" else None)
        self._nets: dict[bool, CachedWav2Lip] = {}  # cache_heads -> net, built on first need
        self._caches: weakref.WeakKeyDictionary[Any, FaceCache] = weakref.WeakKeyDictionary()
        # Reference crops' rows above rows_from (uint8 (N, rows_from, 96, 3)), the top of every patch.
        self._tops: weakref.WeakKeyDictionary[Any, np.ndarray] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.cuda_graphs = bool(cuda_graphs)
        self.static_batches = self.cuda_graphs and self.device.type == "cuda"
        self._runners: dict[bool, StaticBatchRunner] = {}  # cache_heads -> runner, made at prepare

    def _use_torch(self) -> None:
        """Fall back from OpenVINO to the PyTorch runtime (fp32 unless bf16 was asked for)."""
        self._ov = None
        self.runtime = "torch"
        self.dtype = _resolve_dtype(self._requested_precision, self.device)

    def _is_prepared(self, avatar: Any) -> bool:
        return avatar in self._caches or (self._ov is not None and self._ov.has(avatar))

    @property
    def precision(self) -> str:
        """The numerics in use: fp32 / bf16 / fp16 ("auto" until an OpenVINO renderer's first prepare)."""
        if self._ov is not None:
            return self._ov.precision or "auto"
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def describe(self) -> dict[str, str]:
        """Runtime facts for logs and /healthz: runtime, device, precision and the precision gate's numbers."""
        info = {"runtime": self.runtime, "device": str(self.device), "precision": self.precision,
                "rows_from": str(self.rows_from), "mel_alignment": self.mel_alignment.value}
        gate = self._ov.gate if self._ov is not None else None
        if gate is not None:
            info["precision_gate"] = gate.summary()
        return info

    def _net(self, cache_heads: bool) -> CachedWav2Lip:
        if cache_heads not in self._nets:
            net = CachedWav2Lip(self._source, cache_heads=cache_heads, channels_last=True)
            self._nets[cache_heads] = net.to(device=self.device, dtype=self.dtype)
        return self._nets[cache_heads]

    def prepare(self, avatar: Any) -> None:
        """Run the face encoder on every avatar frame once and keep the result (on the device)."""
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
            frame_bytes = cache_values(True, self.rows_from) * torch.finfo(self.dtype).bits // 8
            cache_heads = n * frame_bytes <= self.max_cache_bytes
            if not cache_heads:
                log.info("avatar cache: %d frames x %.1f MB exceeds %.0f MB, caching encoder features only",
                         n, frame_bytes / 2**20, self.max_cache_bytes / 2**20)
            net = self._net(cache_heads)
            faces = faces_to_input(crops).to(device=self.device, dtype=self.dtype)
            cache = net.precompute(faces, rows_from=self.rows_from)  # only the rows the band decode reads
            if self.static_batches and cache.heads not in self._runners:
                # Static buffers and (on CUDA) graphs are made once per cache layout, here rather than
                # on the first render, so that no session's frame pays for a capture.
                runner = StaticBatchRunner(net, cache, self.rows_from, self.max_batch,
                                           cuda_graphs=self.cuda_graphs)
                runner.capture()
                self._runners[cache.heads] = runner
            self._caches[avatar] = cache
            self._tops[avatar] = np.ascontiguousarray(crops[:, :self.rows_from])
            log.info("wav2lip: prepared %d avatar frames on %s (%s, %.0f MB cached)",
                     n, self.device, str(self.dtype).removeprefix("torch."), cache.nbytes / 2**20)

    def release(self, avatar: Any) -> None:
        """Drop an avatar's cache now (it also goes when the avatar object is garbage-collected)."""
        with self._lock:
            self._caches.pop(avatar, None)
            self._tops.pop(avatar, None)
            if self._ov is not None:
                self._ov.release(avatar)

    def render(self, avatar: Any, frame_indices: np.ndarray, mels: np.ndarray) -> list[MouthPatch]:
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

    def _generate(self, cache: FaceCache, indices: np.ndarray, mels: np.ndarray) -> np.ndarray:
        runner = self._runners.get(cache.heads) if self.static_batches else None
        if runner is not None and runner.accepts(cache) and len(indices) <= runner.max_batch:
            return runner.run(cache, indices, mels)
        net = self._nets[cache.heads]
        with torch.inference_mode():
            # A copy (not a view of the caller's array): `mels` must not be referenced after return.
            audio = torch.tensor(mels[:, None]).to(device=self.device, dtype=self.dtype)
            index = torch.from_numpy(indices).to(self.device)
            pred = net(audio, cache.select(index), self.rows_from)
            # Official conversion: float32 x 255 then truncation (astype(uint8)); done on the device
            # so that only bytes cross to the host.
            out = (pred.float() * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return out.cpu().numpy()

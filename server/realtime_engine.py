"""RealtimeEngine: the server's avatars, its renderer(s) and one render worker per device, over `realtime/`.

Avatars: an `realtime.avatars.avatar_library.AvatarLibrary` holds the server's default avatar (the embedded one,
or --avatar), the embedded one always, the avatars of --avatars DIR, and those added over the API. A
session names one (`options.avatar`, an id; default: the server's default). Sessions on different
avatars share the render workers; renderers that `mixes_avatars` batch their frames together.

Every session gets a `realtime.timeline.session.LipSyncSession` on its avatar and on one worker: the one
with the fewest open sessions (ties: the first listed), so sessions spread evenly over the GPUs and a
closed session frees its slot. Each worker batches the due mouth frames of all of its sessions
(realtime/scheduling/scheduler.py). With one device (the default) there is one worker, as before. The per-avatar
precompute (CUDA graph capture included) and a warm-up render happen once per worker, here, before the
server accepts connections.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from realtime.avatars import avatar_cache
from realtime.avatars.avatar import Avatar
from realtime.avatars.avatar_library import AvatarLibrary, slug
from realtime.config import EngineConfig
from realtime.metrics import WorkerStats
from realtime.renderers.base import MouthRenderer
from realtime.renderers.factory import RendererSpec, build_renderer
from realtime.scheduling.scheduler import ThreadedRenderWorker
from realtime.timeline.session import LipSyncSession
from realtime.timeline.session_options import SessionOptions
from server.config import ServerConfig, device_list
from server.engine import Engine, EngineHealth, EngineStats, WorkerLoad

log = logging.getLogger(__name__)

REMOTE_BATCH_WAIT_MS = 2.0  # a front-end's wait to batch its own sessions' frames when rendering on the tier

def gpu_curve_sizes(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a GPU worker measures at warm-up: powers of two up to max_batch (and max_batch). A GPU
    batch costs nearly the same from 1 to dozens of frames, which the default curve (up to 8, then
    extrapolated in proportion) would overestimate many times over, holding batches back."""
    sizes = {min(2 ** k, max_batch) for k in range(1, max(max_batch, 2).bit_length() + 1)}
    return tuple(sorted(s for s in sizes if s >= 2))


class RealtimeEngine:
    """avatar: the default avatar (id `info["avatar"]`, else "default"). renderer: one renderer, or a list
    (one render worker each: one per GPU). devices: a label per renderer (default: the renderer's
    `device`, else "cpu"). avatar_cache_dir: where prepared library avatars are cached (default: the
    avatar cache's default). uploads_dir: where POST /avatars uploads are kept across restarts (None:
    not kept)."""

    def __init__(self, avatar: Avatar, renderer: MouthRenderer | Sequence[MouthRenderer],
                 config: EngineConfig | None = None, info: dict[str, str] | None = None,
                 devices: Sequence[str] | None = None, avatar_cache_dir: Path | None = None,
                 uploads_dir: Path | None = None) -> None:
        renderers: list[MouthRenderer] = [renderer] if isinstance(renderer, MouthRenderer) else list(renderer)
        if not renderers:
            raise ValueError("RealtimeEngine needs at least one renderer")
        self.avatar = avatar
        self.config = config or EngineConfig()
        self.fps = float(avatar.fps or self.config.fps)
        self.devices = [str(d) for d in devices] if devices else [r.traits.device for r in renderers]
        if len(self.devices) != len(renderers):
            raise ValueError(f"{len(renderers)} renderers but {len(self.devices)} device labels")
        self.workers: list[ThreadedRenderWorker] = []
        self._closers: list[Callable[[], None]] = []
        self._placed: list[weakref.WeakSet[Any]] = [weakref.WeakSet() for _ in renderers]
        self._lock = threading.Lock()
        try:
            t0 = time.monotonic()
            for i, (r, device) in enumerate(zip(renderers, self.devices, strict=True)):
                worker = ThreadedRenderWorker(r, max_batch=self.config.max_batch,
                                              max_wait_s=self.config.max_batch_wait_ms / 1000.0,
                                              name=f"render-{i}-{device}")
                self.workers.append(worker)
                if device.startswith("cuda"):
                    worker.curve_sizes = gpu_curve_sizes(worker.max_batch)
                worker.prepare(avatar, warmup=True)
            prepare_s = time.monotonic() - t0
        except BaseException:
            self._close_workers()
            raise
        self.worker = self.workers[0]  # the worker of a one-device engine (and the first one otherwise)
        height, width = avatar.frames[0].shape[:2]
        self.info = {
            "avatar": "default",
            "renderer": self.worker.name,
            "fps": f"{self.fps:g}",
            "avatar_frames": str(len(avatar.frames)),
            "avatar_size": f"{width}x{height}",
            "prepare_s": f"{prepare_s:.2f}",
            "workers": str(len(self.workers)),
            **(info or {}),
        }
        self.avatars = AvatarLibrary(avatar, default_id=slug(self.info["avatar"]),
                                     default_name=self.info["avatar"].capitalize(), cache_dir=avatar_cache_dir,
                                     prepare=self._prepare_on_workers, on_removed=self._forget_on_workers,
                                     uploads_dir=uploads_dir)
        described = self.worker.renderer.describe()  # Wav2Lip: runtime and the precision its gate settled on
        if described:
            self.info.update({k: v for k, v in described.items() if k != "device"})
            log.info("renderer ready", extra=described)

    def _prepare_on_workers(self, avatar: Avatar) -> None:
        """A new library avatar's renderer work (Wav2Lip: encoder features; built-in: lip geometry)."""
        for worker in self.workers:
            worker.prepare(avatar)

    def _forget_on_workers(self, avatar: Avatar) -> None:
        for worker in self.workers:
            worker.forget(avatar)

    def open_session(self, options: SessionOptions, name: str = "") -> LipSyncSession:
        """A session on its avatar (`options.avatar`, an id; realtime.avatars.avatar_library errors when unknown
        or not ready) and on the least-loaded worker (fewest open sessions; ties go to the first).
        ValueError: valid options this engine cannot serve (an official paste over partial patches)."""
        if options.paste_mode == "official" and self.worker.renderer.traits.rows_from > 0:
            raise ValueError("options.paste_mode 'official' needs whole Wav2Lip patches: "
                             "start the server with --paste-mode official")
        config = self.config.with_overrides(**options.engine_overrides())
        avatar_id, avatar = self.avatars.acquire(options.avatar)
        try:
            with self._lock:  # choose and register together, so concurrent opens cannot pile onto one worker
                i = min(range(len(self.workers)), key=lambda k: (len(self._placed[k]), k))
                session = LipSyncSession(avatar, self.workers[i], config, name=name, on_close=self._release,
                                         avatar_id=avatar_id)
                self._placed[i].add(session)
        except BaseException:
            self.avatars.release(avatar_id)
            raise
        if len(self.workers) > 1:
            log.debug("session %s placed on render worker %d (%s)", name, i, self.devices[i])
        return session

    def _release(self, session: LipSyncSession) -> None:
        with self._lock:
            found = any(session in placed for placed in self._placed)
            for placed in self._placed:
                placed.discard(session)
        if found:  # the avatar is given back once
            self.avatars.release(session.avatar_id)

    def sessions_per_worker(self) -> list[int]:
        with self._lock:
            return [len(placed) for placed in self._placed]

    def metrics(self) -> EngineStats:
        """All-worker totals and each worker with its device and open sessions."""
        counts = self.sessions_per_worker()
        loads = tuple(WorkerLoad(i, device, n, worker.stats())
                      for i, (worker, device, n) in enumerate(zip(self.workers, self.devices, counts, strict=True)))
        return EngineStats(WorkerStats.combined([w.stats for w in loads]), sum(counts), loads)

    def health(self) -> EngineHealth:
        """Render threads that are down now (died, restart pending) and restarts so far."""
        down = [f"{i}:{device}" for i, (worker, device) in enumerate(zip(self.workers, self.devices, strict=True))
                if not worker.healthy]
        return EngineHealth(workers_down=down, restarts=sum(w.restarts for w in self.workers))

    def close(self) -> None:
        self.avatars.close()
        self._close_workers()

    def _close_workers(self) -> None:
        for worker in self.workers:
            worker.close()
        for close in self._closers:  # e.g. leave the Ray cluster
            close()
        self._closers.clear()

    @classmethod
    def load(cls, config: ServerConfig) -> "RealtimeEngine":
        """The avatar (embedded default or --avatar) and the renderers (no-weights or --checkpoint), one
        per --device entry."""
        from realtime.avatars import avatar_prepare, default_avatar

        t0 = time.monotonic()
        if config.avatar is None:
            avatar, avatar_name = default_avatar.load_default_avatar(), "default"
        else:
            avatar, avatar_name = avatar_prepare.prepare_avatar(config.avatar), Path(config.avatar).stem
        log.info("avatar loaded", extra={"avatar": avatar_name, "frames": len(avatar.frames),
                                         "seconds": round(time.monotonic() - t0, 2)})
        entries = device_list(config.device)
        # Size each session's fixed delay from the measured render cost: a generator slower than the
        # default compute budget (Wav2Lip on a small CPU) would otherwise drop every mouth frame, and the
        # built-in renderer (~0.6 ms a frame) needs a third less (still fixed per session, and capped by
        # EngineConfig.max_compute_budget_ms).
        engine_config = EngineConfig(fit_budget_to_renderer=True, paste_mode=config.paste_mode)
        spec = RendererSpec(checkpoint=config.checkpoint, precision=config.precision, runtime=config.runtime,
                            min_psnr_db=config.min_psnr_db, paste_mode=config.paste_mode,
                            mel_alignment=config.mel_alignment)
        closers: list[Callable[[], None]] = []
        if config.render_backend == "ray":
            renderers, devices = remote_renderers(config, spec, closers)
            # The replica gathers due frames across every front-end by deadline; this front-end waits only
            # long enough to send its own sessions' simultaneous frames in one request (one call in flight
            # at a time), not the local 10 ms (bench/scale.py: +12 ms p50 with both waits).
            engine_config = engine_config.with_overrides(max_batch_wait_ms=REMOTE_BATCH_WAIT_MS)
        elif config.checkpoint is None:
            # The no-weights renderer runs on the CPU whatever the device; "cpu" listed k times gives it
            # k worker threads (it is thread-safe, so they share one instance).
            shared = build_renderer(spec)
            renderers = [shared] * max(1, entries.count("cpu"))
            devices = ["cpu"] * len(renderers)
        else:
            from models.wav2lip import load_wav2lip

            devices = [str(d) for d in torch_devices(entries)]
            model = load_wav2lip(config.checkpoint, "cpu")  # once, shared by the renderers of every device
            renderers = [build_renderer(replace(spec, device=d), model) for d in devices]
            if devices[0].startswith("cuda"):
                # One GPU batch of many sessions' frames costs little more than one frame: let a worker
                # take as many as its renderer runs in one call (fixed sizes, CUDA graphs).
                engine_config = engine_config.with_overrides(max_batch=renderers[0].max_batch)
        info = {"avatar": avatar_name, "device": ",".join(devices),
                "checkpoint": str(config.checkpoint) if config.checkpoint else "none"}
        try:
            engine = cls(avatar, renderers, engine_config, info=info, devices=devices,
                         avatar_cache_dir=config.avatar_cache_dir,
                         uploads_dir=avatar_cache.cache_root(config.avatar_cache_dir) / "uploads")
        except BaseException:
            for close in closers:
                close()
            raise
        engine._closers.extend(closers)
        try:
            if config.avatar is not None:  # the embedded one is always there, beside --avatar
                engine.avatars.add_builtin(default_avatar.load_default_avatar(), "default", "Default")
            if config.avatars_dir is not None:
                engine.avatars.add_folder(config.avatars_dir)
            engine.avatars.restore_uploads()  # POST /avatars uploads of earlier runs, same ids
        except BaseException:
            engine.close()
            raise
        return engine


def remote_renderers(config: ServerConfig, spec: RendererSpec,
                     closers: list[Callable[[], None]]) -> tuple[list[Any], list[str]]:
    """`--render-backend ray`: one front-end worker whose renderer is the shared Ray render tier."""
    from realtime.render_tier.remote_renderer import RemoteRenderer
    from server.ray_render_tier import RayRenderTier, RayTierSettings

    settings = RayTierSettings(address=config.ray_address, replicas=config.ray_replicas,
                               min_replicas=config.ray_min_replicas, max_replicas=config.ray_max_replicas,
                               cpus_per_replica=config.ray_cpus_per_replica,
                               gpus_per_replica=config.ray_gpus_per_replica, app_name=config.ray_app_name)
    replica_spec = replace(spec, device="cuda" if config.ray_gpus_per_replica > 0 else "cpu")
    tier = RayRenderTier.connect(settings, replica_spec)
    closers.append(tier.close)
    sender = config.instance_id or f"{socket.gethostname()}:{os.getpid()}"
    renderer = RemoteRenderer(tier, sender=sender, name=f"ray:{replica_spec.kind}", rows_from=replica_spec.rows_from,
                              audio_needs=replica_spec.audio_needs)
    return [renderer], ["ray"]


def torch_devices(entries: list[str]) -> list[Any]:
    """`server.config.device_list` entries -> torch devices: auto, cuda (the current GPU) and cuda:all
    resolved; a GPU named twice, or one that does not exist, is an error."""
    import torch

    from models.checkpoints import CheckpointError, resolve_device

    if entries == ["cuda:all"]:
        if not torch.cuda.is_available():
            raise CheckpointError("--device cuda:all: CUDA is not available")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    out = []
    for entry in entries:
        device = resolve_device(entry)
        if device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
            if index >= torch.cuda.device_count():
                raise CheckpointError(f"--device {entry}: only {torch.cuda.device_count()} GPU(s) visible")
            device = torch.device("cuda", index)
        out.append(device)
    gpus = [d for d in out if d.type != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise CheckpointError(f"--device {','.join(entries)}: a GPU is listed twice")
    return out


def load_engine(config: ServerConfig) -> Engine:
    """Load avatar, renderer and workers as configured. Slow (model load, face detection): call it
    from a thread, not the event loop."""
    return RealtimeEngine.load(config)

"""RealtimeEngine: the server's one avatar, one renderer and one render worker, over `realtime/`.

Every session gets a `realtime.session.LipSyncSession` on the shared avatar and worker; the per-avatar
precompute (and a warm-up render) happens once, here, before the server accepts connections.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from realtime.config import EngineConfig
from realtime.scheduler import ThreadedRenderWorker
from realtime.session import LipSyncSession
from server.config import ServerConfig

log = logging.getLogger(__name__)

# Engine settings a client may choose per session (POST /offer {"options": {...}}).
SESSION_OPTIONS = {
    "paste_mode": str,
    "vad_aggressiveness": int,
    "energy_gate_dbfs": float,
    "compute_budget_frames": float,
}


def session_overrides(options: dict) -> dict[str, Any]:
    """The engine fields among `options`, type-checked; ValueError names a bad one."""
    out: dict[str, Any] = {}
    for name, kind in SESSION_OPTIONS.items():
        if name not in options:
            continue
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, (kind, int) if kind is float else kind):
            raise ValueError(f"options.{name} must be a {kind.__name__}")
        out[name] = kind(value)
    return out


class RealtimeEngine:
    def __init__(self, avatar: Any, renderer: Any, config: EngineConfig | None = None,
                 info: dict[str, str] | None = None) -> None:
        self.avatar = avatar
        self.config = config or EngineConfig()
        self.fps = float(getattr(avatar, "fps", 0) or self.config.fps)
        self.worker = ThreadedRenderWorker(renderer, max_batch=self.config.max_batch,
                                           max_wait_s=self.config.max_batch_wait_ms / 1000.0)
        try:
            t0 = time.monotonic()
            self.worker.prepare(avatar, warmup=True)
            prepare_s = time.monotonic() - t0
        except BaseException:
            self.worker.close()
            raise
        height, width = avatar.frames[0].shape[:2]
        self.info = {
            "avatar": "default",
            "renderer": self.worker.name,
            "fps": f"{self.fps:g}",
            "avatar_frames": str(len(avatar.frames)),
            "avatar_size": f"{width}x{height}",
            "prepare_s": f"{prepare_s:.2f}",
            **(info or {}),
        }

    def open_session(self, options: dict, name: str = "") -> LipSyncSession:
        overrides = session_overrides(options)
        if overrides.get("paste_mode") == "official" and getattr(self.worker.renderer, "rows_from", 0) > 0:
            raise ValueError("options.paste_mode 'official' needs whole Wav2Lip patches: "
                             "start the server with --paste-mode official")
        config = self.config.with_overrides(**overrides)
        return LipSyncSession(self.avatar, self.worker, config, name=name)

    def metrics(self) -> dict:
        return self.worker.stats()

    def close(self) -> None:
        self.worker.close()

    @classmethod
    def load(cls, config: ServerConfig) -> "RealtimeEngine":
        """The avatar (embedded default or --avatar) and the renderer (no-weights or --checkpoint)."""
        from realtime import avatar as avatars

        t0 = time.monotonic()
        if config.avatar is None:
            avatar, avatar_name = avatars.load_default_avatar(), "default"
        else:
            avatar, avatar_name = avatars.prepare_avatar(config.avatar), Path(config.avatar).stem
        log.info("avatar loaded", extra={"avatar": avatar_name, "frames": len(avatar.frames),
                                         "seconds": round(time.monotonic() - t0, 2)})
        if config.checkpoint is None:
            from realtime.renderers.default import DefaultRenderer

            renderer, device = DefaultRenderer(), "cpu"
        else:
            from models.checkpoints import resolve_device
            from models.wav2lip import load_wav2lip
            from realtime.renderers.wav2lip import PASTED_ROWS_FROM, Wav2LipRenderer

            device = str(resolve_device(config.device))
            # Feathered pastes never show the top rows of a patch, so the generator skips them;
            # official pastes show the whole 96x96 patch.
            rows_from = 0 if config.paste_mode == "official" else PASTED_ROWS_FROM
            renderer = Wav2LipRenderer(load_wav2lip(config.checkpoint, device), device=device,
                                       precision=config.precision, rows_from=rows_from)
        info = {"avatar": avatar_name, "device": device,
                "checkpoint": str(config.checkpoint) if config.checkpoint else "none"}
        # A generator slower than the default compute budget (Wav2Lip on a small CPU) would otherwise
        # drop every mouth frame: size each session's fixed delay from the measured render cost instead
        # (still fixed per session, and capped by EngineConfig.max_compute_budget_ms).
        engine_config = EngineConfig(fit_budget_to_renderer=config.checkpoint is not None,
                                     paste_mode=config.paste_mode)
        return cls(avatar, renderer, engine_config, info=info)

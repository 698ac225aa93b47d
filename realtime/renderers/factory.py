"""Which mouth renderer to build, as a value: the same spec builds it in the server process (local
render workers) or in a render replica on another machine (server/ray_render_tier.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realtime.audio.mel import MelAlignment
from realtime.renderers.base import AudioNeeds, MouthRenderer


@dataclass(frozen=True)
class RendererSpec:
    checkpoint: Path | None = None   # None: the no-weights built-in renderer
    device: str = "cpu"              # a torch device string ("cpu", "cuda:0"); the built-in renderer is CPU only
    precision: str = "auto"
    runtime: str = "auto"
    min_psnr_db: float = 35.0
    paste_mode: str = "feather"      # official: Wav2Lip generates whole patches (rows_from = 0)
    mel_alignment: str = "official"  # Wav2Lip: where each frame's mel window starts (realtime.audio.mel.MelAlignment)

    @property
    def kind(self) -> str:
        return "builtin" if self.checkpoint is None else "wav2lip"

    @property
    def audio_needs(self) -> AudioNeeds:
        """The look-ahead of the renderer this spec builds (the built-in renderer's: its config's)."""
        if self.checkpoint is None:
            from realtime.renderers.mouth_params import MouthParamsConfig

            return MouthParamsConfig().audio_needs
        return AudioNeeds(offset_frames=MelAlignment(self.mel_alignment).offset_frames)

    @property
    def rows_from(self) -> int:
        if self.checkpoint is None or self.paste_mode == "official":
            return 0
        from realtime.renderers.wav2lip import PASTED_ROWS_FROM

        return PASTED_ROWS_FROM


def build_renderer(spec: RendererSpec, model: Any | None = None) -> MouthRenderer:
    """The renderer `spec` describes. `model`: an already loaded fp32 Wav2Lip to share between several
    renderers (one per GPU) instead of loading the checkpoint again."""
    if spec.checkpoint is None:
        from realtime.renderers.default import DefaultRenderer

        return DefaultRenderer()
    from models.wav2lip import load_wav2lip
    from realtime.renderers.wav2lip import Wav2LipRenderer

    # Loaded in fp32 on the CPU: each renderer folds BatchNorm in fp32 and casts once to its device's
    # precision (no fp16 copy of the whole model is kept on the GPU).
    model = model if model is not None else load_wav2lip(spec.checkpoint, "cpu")
    return Wav2LipRenderer(model, device=spec.device, precision=spec.precision, rows_from=spec.rows_from,
                           runtime=spec.runtime, min_psnr_db=spec.min_psnr_db,
                           mel_alignment=MelAlignment(spec.mel_alignment))

"""SyncNet_color, the expert lip-sync discriminator (lipsync_expert.pth), key-compatible with the release.

Written from shared/wav2lip/README.md and syncnet_state_dict.tsv. Used to score lip sync (audio/face
embedding cosine similarity), never in the real-time render path.

- face `(B, 15, 48, 96)`: lower halves of 5 consecutive BGR 96x96 crops stacked along channels, in [0, 1]
- mel `(B, 1, 80, 16)`
- returns (audio_embedding, face_embedding), each `(B, 512)` and L2-normalised.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints import load_into, place
from models.layers import ConvBlock


def _res(channels: int, n: int) -> list[nn.Module]:
    return [ConvBlock(channels, channels, 3, 1, 1, residual=True) for _ in range(n)]


def _face_encoder() -> nn.Sequential:
    """48x96 -> 48x96 -> 46x47 -> 23x24 -> 12x12 -> 6x6 -> 3x3 -> 1x1, 512 channels."""
    return nn.Sequential(
        ConvBlock(15, 32, 7, 1, 3),
        ConvBlock(32, 64, 5, (1, 2), 1),
        *_res(64, 2),
        ConvBlock(64, 128, 3, 2, 1),
        *_res(128, 3),
        ConvBlock(128, 256, 3, 2, 1),
        *_res(256, 2),
        ConvBlock(256, 512, 3, 2, 1),
        *_res(512, 2),
        ConvBlock(512, 512, 3, 2, 1),
        ConvBlock(512, 512, 3, 1, 0),
        ConvBlock(512, 512, 1, 1, 0),
    )


def _audio_encoder() -> nn.Sequential:
    """80x16 -> 27x16 -> 9x6 -> 3x3 -> 1x1, 512 channels (the generator's audio encoder plus one residual)."""
    return nn.Sequential(
        ConvBlock(1, 32, 3, 1, 1),
        *_res(32, 2),
        ConvBlock(32, 64, 3, (3, 1), 1),
        *_res(64, 2),
        ConvBlock(64, 128, 3, 3, 1),
        *_res(128, 2),
        ConvBlock(128, 256, 3, (3, 2), 1),
        *_res(256, 2),
        ConvBlock(256, 512, 3, 1, 0),
        ConvBlock(512, 512, 1, 1, 0),
    )


class SyncNet_color(nn.Module):
    """Attribute names and order define the checkpoint keys: do not rename."""

    def __init__(self) -> None:
        super().__init__()
        self.face_encoder = _face_encoder()
        self.audio_encoder = _audio_encoder()

    def forward(self, audio_sequences: Tensor, face_sequences: Tensor) -> tuple[Tensor, Tensor]:
        face = self.face_encoder(face_sequences).flatten(1)
        audio = self.audio_encoder(audio_sequences).flatten(1)
        return F.normalize(audio, p=2, dim=1), F.normalize(face, p=2, dim=1)


def sync_similarity(audio_embedding: Tensor, face_embedding: Tensor) -> Tensor:
    """Cosine similarity per sample (the embeddings are already unit length)."""
    return (audio_embedding * face_embedding).sum(dim=1)


def load_syncnet(path: str | os.PathLike, device: str | torch.device = "cpu") -> SyncNet_color:
    """Load lipsync_expert.pth (official layout or bare state_dict) in eval mode; fp16 on CUDA like load_wav2lip."""
    model = load_into(SyncNet_color(), path, "syncnet")
    return place(model.eval(), device)

"""What crosses between a front-end and a render replica.

In: mel windows and avatar frame indices (about 5 KB a frame). Out: mouth patches. The avatar itself
never travels with a frame: a front-end shares it once (`AvatarRef.payload`, a Ray object reference on
the Ray tier) and each replica fetches and prepares it the first time it sees `AvatarRef.key`.

`key` is a fingerprint of the avatar's content, so front-ends that serve the same avatar share one
prepared copy per replica, and their frames can be rendered in one batch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from realtime.renderers.base import MouthPatch


@dataclass(frozen=True)
class AvatarRef:
    key: str        # content fingerprint (avatar_fingerprint)
    payload: Any    # how a replica gets the avatar's arrays (avatar_to_wire's dict, or a reference to it)


@dataclass
class RenderRequest:
    sender: str                 # the front-end's id: a replica waits for others' frames only with several
    avatar: AvatarRef
    frame_indices: np.ndarray   # (B,) int64 avatar frame indices
    mels: np.ndarray            # (B, 80, 16) float32 mel windows
    deadline_in_s: float        # seconds from sending until the front-end needs the patches


@dataclass
class RenderReply:
    patches: list[MouthPatch] | None  # None: the replica could not make them in time (the front-end holds)
    batch_size: int                   # frames in the replica's renderer call, across front-ends
    queued_s: float                   # time the request waited in the replica for its batch
    render_s: float                   # the renderer call that made it
    replica: str


def _public_fields(avatar: Any) -> list[str]:
    return [f.name for f in fields(avatar) if not f.name.startswith("_")]


def avatar_to_wire(avatar: Any) -> dict[str, Any]:
    """The avatar's data fields (arrays and scalars; no caches or locks): what a replica rebuilds it from."""
    return {"type": type(avatar), **{name: getattr(avatar, name) for name in _public_fields(avatar)}}


def avatar_from_wire(data: dict[str, Any]) -> Any:
    values = dict(data)
    kind = values.pop("type")
    return kind(**values)


def avatar_fingerprint(avatar: Any) -> str:
    """A content hash over the avatar's fields. Frames are sampled (every 4th pixel of every frame,
    all of the other arrays), which is ~0.02 s for a 200-frame 512 px avatar instead of ~0.3 s."""
    h = hashlib.blake2b(digest_size=16)
    for name in _public_fields(avatar):
        value = getattr(avatar, name)
        h.update(name.encode())
        if isinstance(value, np.ndarray):
            sample = value[:, ::4, ::4] if name == "frames" and value.ndim == 4 else value
            h.update(str((value.shape, value.dtype.str)).encode())
            h.update(np.ascontiguousarray(sample).tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()

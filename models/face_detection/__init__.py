"""Offline face detectors: BlazeFace + face mesh (default), OpenCV Haar (fallback), official S3FD (bring
your own s3fd.pth). See `detectors.py`; nothing here downloads anything."""
from models.face_detection.detectors import (
                                             DETECTORS,
                                             DetectorError,
                                             FaceDetector,
                                             FaceResult,
                                             box_from_landmarks,
                                             create_detector,
)
from models.face_detection.model_files import INSTALL_HINT, mesh_models_available

__all__ = [
                                             "DETECTORS",
                                             "INSTALL_HINT",
                                             "DetectorError",
                                             "FaceDetector",
                                             "FaceResult",
                                             "box_from_landmarks",
                                             "create_detector",
                                             "mesh_models_available",
]

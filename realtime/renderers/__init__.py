"""Mouth renderers: the protocol (base.py) and its implementations (wav2lip.py, default.py)."""
from realtime.renderers.base import MouthPatch, MouthRenderer

__all__ = ["MouthPatch", "MouthRenderer"]

"""Process-wide CUDA numerics switches, in one place: TF32 off for faithful fp32, cuDNN autotuning at warm-up.

- TF32: PyTorch lets cuDNN convolutions use TF32 by default (`torch.backends.cudnn.allow_tf32`), so an
  "fp32" convolution on an Ampere or newer GPU computes with a 10-bit mantissa. A reference meant to be
  the official fp32 model, and `--precision fp32` on CUDA, must switch it off (`strict_fp32`,
  `disable_tf32`). fp16 and bf16 work is unaffected by these flags, so switching them off for the whole
  process costs the fp16 path nothing.
- cuDNN autotuning (`cudnn_autotune`): with `torch.backends.cudnn.benchmark` cuDNN times its candidate
  algorithms for every new input shape and caches the winner (the cache is per thread, which is why the
  render worker warms up on its own thread). Enabled only while warming up: the warm-up renders every
  batch size the worker will use, and a live frame must never pay for a search. The flag is global, so
  overlapping warm-ups (one worker per GPU) share it through a count.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_autotune_lock = threading.Lock()
_autotune_users = 0
_autotune_saved = False


@contextlib.contextmanager
def cudnn_autotune() -> Iterator[None]:
    """cudnn.benchmark on while any caller is inside; the previous value is restored after the last."""
    global _autotune_users, _autotune_saved
    with _autotune_lock:
        if _autotune_users == 0:
            _autotune_saved = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
        _autotune_users += 1
    try:
        yield
    finally:
        with _autotune_lock:
            _autotune_users -= 1
            if _autotune_users == 0:
                torch.backends.cudnn.benchmark = _autotune_saved


def tf32_enabled() -> bool:
    """Whether fp32 matmuls or convolutions on CUDA may use TF32 now."""
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 CUDA matmuls and convolutions in real fp32 (TF32 off) inside; the flags are restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def disable_tf32(reason: str) -> None:
    """TF32 off for the rest of the process (a renderer that promises fp32 on CUDA)."""
    if tf32_enabled():
        log.info("TF32 off for CUDA matmuls and convolutions: %s", reason)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


__all__ = ["cudnn_autotune", "disable_tf32", "strict_fp32", "tf32_enabled"]

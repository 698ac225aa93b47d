"""The render worker's warm-up: throw-away renders that also measure the batch cost curve.

The first renders of a renderer are slow (allocations, cuDNN autotuning, OpenVINO's first inference), so
the worker renders a few frames of silence before the first real one, and times them: cost(b) for each
batch size b it will use, the fastest of a few calls (a noise spike on a shared CPU must not set a
session's fixed delay). Sessions size their delay from that curve (realtime/timeline/clock.py). One slice per
size, so a worker that is already serving renders between them (realtime/scheduling/scheduler.py).
"""
from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import numpy as np

from realtime.avatars.avatar import Avatar
from realtime.renderers.base import MouthRenderer


def warmup_steps(renderer: MouthRenderer, avatar: Avatar, sizes: Sequence[int], clock: Callable[[], float],
                 observe: Callable[[int, float], None]) -> Generator[None, None, None]:
    """For each batch size: yield (a slice boundary), then render it untimed once and timed 3 times (b = 1)
    or twice (larger b) inside the renderer's `warmup_context`, and `observe(b, fastest)`."""
    context = renderer.warmup_context
    for b in sizes:
        yield
        mel = np.full((b, 80, 16), -4.0, dtype=np.float32)
        timed = []
        with context():
            for attempt in range(4 if b == 1 else 3):
                t0 = clock()
                renderer.render(avatar, np.zeros(b, dtype=np.int64), mel)
                if attempt:
                    timed.append(clock() - t0)
        observe(b, min(timed))

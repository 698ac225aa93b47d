"""Which worker process a visitor's offers go to, so per-address limits hold across `--workers N`.

Each worker counts `--max-sessions-per-ip` and `--max-offers-per-minute` in its own `ClientLimits`. If the
supervisor sent a visitor's offers to whichever worker had the most free slots, every worker would count
that visitor afresh: N workers, N times the limits. So a visitor (its address key: IPv4, or the IPv6 /64,
as `limits.address_key` counts it) gets a home worker at its first offer, the freest one, and every offer
and `/ice-servers` request from it goes there while the home lives. The home is kept for
`--max-session-s` plus a margin after the visitor's last offer: by then every session that offer opened
has ended (`--max-session-s` ends them), so moving the visitor cannot let it hold more than its limit.
A visitor whose home is full gets that worker's 503 + Retry-After, even when another worker has room:
limits before balance. With no per-address limit set (both 0), offers simply go to the freest worker.
A home whose worker restarted (new generation) has lost its sessions and is chosen again.

Memory is bounded: at most `capacity` visitors are remembered, the least recently seen forgotten first
(a flood of distinct addresses could make a forgotten visitor count afresh in another worker: it would
need that many addresses, which the per-address limits already allow it).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from server.access.limits import address_key


@dataclass(frozen=True)
class Home:
    worker: int
    generation: int
    seen: float


class VisitorHomes:
    def __init__(self, keep_s: float, capacity: int = 65536) -> None:
        self.keep_s = keep_s
        self.capacity = capacity
        self._homes: OrderedDict[str, Home] = OrderedDict()

    def __len__(self) -> int:
        return len(self._homes)

    def worker_for(self, client: str, now: float, generation_of: Callable[[int], int | None],
                   freest: Callable[[], int]) -> int:
        """The worker for `client`'s offer: its home while that lives (`generation_of(worker)` is the
        worker's current generation, None when it is not serving), else `freest()`, which becomes home."""
        key = address_key(client)
        home = self._homes.get(key)
        if home is not None and now - home.seen <= self.keep_s and generation_of(home.worker) == home.generation:
            worker = home.worker
        else:
            worker = freest()
        generation = generation_of(worker)
        self._homes[key] = Home(worker, -1 if generation is None else generation, now)
        self._homes.move_to_end(key)
        while len(self._homes) > self.capacity:
            self._homes.popitem(last=False)
        return worker

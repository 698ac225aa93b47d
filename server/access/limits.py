"""Bounded work: per-client offer limits and the pool that decodes uploads and runs TTS.

- `ClientLimits`: at most `--max-sessions-per-ip` live or negotiating sessions and
  `--max-offers-per-minute` offers (sliding 60 s window) per client address; 429 + Retry-After beyond.
  "Address" is `address_key`: an IPv4 address, or an IPv6 address's /64 (one subscriber's prefix holds
  2^64 addresses, so keying on the exact address would limit nobody).
- `WorkPool`: the server's own small thread pool (`--max-concurrent-decodes` threads) for upload
  decodes and TTS. It is never asyncio's default executor, which aiortc's video encoders use, so a
  burst of uploads cannot starve live sessions' encoders. When every slot is busy the request gets 503
  + Retry-After at once instead of queueing (a queue would only hold the memory longer). A slot is
  taken only for work that is ready: an upload's body is read first (server/routes/upload_body.py), so a
  sender that stalls holds no slot. Per `Holder`: one slot per session at a time (429) and at most
  `--max-decodes-per-ip` per client address (429), so one client cannot take the whole pool.
  bench/abuse.py, six 30 MB uploads at once on a shared 2-core machine: decoded on the default executor,
  a live session fell to 0.26 fps (1 kHz files; the server passed 6 GB and was killed) and 1.4 fps
  (8 kHz files); on this pool it kept 23.8 and 24.4 fps, two decoding and four refused at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from server.errors import ApiError
from server.media.media_executor import start_every_thread

T = TypeVar("T")

WINDOW_S = 60.0
MAX_TRACKED_ADDRESSES = 10000  # the rate limiter forgets the least recently seen address beyond this


def address_key(address: str) -> str:
    """The key per-address limits count under: IPv4 as is, IPv6 by its /64 ('2001:db8::/64'), an
    IPv4-mapped IPv6 address as its IPv4; anything else (a Unix socket's empty remote) as given."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ClientLimits:
    """Every method takes the client's address as the server sees it and counts it under `address_key`."""

    def __init__(self, max_sessions_per_ip: int, max_offers_per_minute: int) -> None:
        self.max_sessions_per_ip = max_sessions_per_ip
        self.max_offers_per_minute = max_offers_per_minute
        self._offers: OrderedDict[str, deque[float]] = OrderedDict()
        self._negotiating: dict[str, int] = {}
        self.refused_total = 0

    def check_rate(self, address: str, now: float | None = None) -> None:
        """Count one offer from `address`; 429 when it makes more than the per-minute limit."""
        if self.max_offers_per_minute <= 0:
            return
        address = address_key(address)
        now = time.monotonic() if now is None else now
        times = self._offers.pop(address, None) or deque()
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        self._offers[address] = times
        while len(self._offers) > MAX_TRACKED_ADDRESSES:
            self._offers.popitem(last=False)
        if len(times) >= self.max_offers_per_minute:
            retry = max(1, math.ceil(times[0] + WINDOW_S - now))
            self.refused_total += 1
            raise ApiError(429, f"more than {self.max_offers_per_minute} offers a minute from this address; "
                                f"retry in {retry} s", {"Retry-After": str(retry)}, retry_after_s=retry)
        times.append(now)

    def check_sessions(self, address: str, live_remotes: Iterable[str]) -> None:
        """429 when `address` already holds its share of live and negotiating sessions."""
        if self.max_sessions_per_ip <= 0:
            return
        address = address_key(address)
        held = sum(1 for remote in live_remotes if address_key(remote) == address) + \
            self._negotiating.get(address, 0)
        if held >= self.max_sessions_per_ip:
            self.refused_total += 1
            raise ApiError(429, f"this address already has {held} session(s), the limit is "
                                f"{self.max_sessions_per_ip}; end one first", {"Retry-After": "5"},
                           retry_after_s=5, max_sessions_per_ip=self.max_sessions_per_ip)

    @contextlib.contextmanager
    def negotiating(self, address: str) -> Iterator[None]:
        """Count an offer being answered against its address until it is a live session (or failed)."""
        address = address_key(address)
        self._negotiating[address] = self._negotiating.get(address, 0) + 1
        try:
            yield
        finally:
            self._negotiating[address] -= 1
            if not self._negotiating[address]:
                del self._negotiating[address]


class PoolBusy(ApiError):
    def __init__(self, size: int) -> None:
        super().__init__(503, f"all {size} decode/TTS slots are busy; retry in 1 s",
                         {"Retry-After": "1"}, retry_after_s=1)


@dataclass(frozen=True)
class Holder:
    """Who a slot is for: the session the work belongs to and the address that asked for it."""

    session: str
    address: str


def started_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads all exist from the start (`start_every_thread`)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    start_every_thread(pool)
    return pool


class WorkPool:
    """`size` threads and `size` admission slots; `run` and `slot` refuse when all are taken (503), when
    the holder's session already has one or its address has `per_address` (429)."""

    def __init__(self, size: int, per_address: int = 0) -> None:
        self.size = size
        self.per_address = per_address  # 0: no per-address share
        self.busy = 0
        self.refused_total = 0
        self.sessions: set[str] = set()  # sessions holding a slot
        self._addresses: dict[str, int] = {}
        self._executor = started_pool(size, "lipsync-decode")

    def check_free(self, holder: Holder | None = None) -> None:
        """Refuse now, before any work starts: this session already holds a slot (429), every slot is
        taken (503), or this address holds its share (429)."""
        if holder is not None and holder.session in self.sessions:
            self.refused_total += 1
            raise ApiError(429, "this session is already decoding or synthesising; wait for it",
                           {"Retry-After": "1"}, retry_after_s=1)
        if self.busy >= self.size:
            self.refused_total += 1
            raise PoolBusy(self.size)
        if holder is not None and self.per_address and self._addresses.get(holder.address, 0) >= self.per_address:
            self.refused_total += 1
            raise ApiError(429, f"this address already uses {self.per_address} of the {self.size} "
                                "decode/TTS slots; retry in 1 s", {"Retry-After": "1"}, retry_after_s=1)

    @contextlib.contextmanager
    def slot(self, holder: Holder | None = None) -> Iterator[None]:
        self.check_free(holder)
        self.busy += 1
        if holder is not None:
            self.sessions.add(holder.session)
            self._addresses[holder.address] = self._addresses.get(holder.address, 0) + 1
        try:
            yield
        finally:
            self.busy -= 1
            if holder is not None:
                self.sessions.discard(holder.session)
                self._addresses[holder.address] -= 1
                if not self._addresses[holder.address]:
                    del self._addresses[holder.address]

    async def run(self, fn: Callable[..., T], *args: Any, holder: Holder | None = None) -> T:
        """`fn(*args)` on the pool, in a slot of its own."""
        with self.slot(holder):
            return await self.run_in_slot(fn, *args)

    async def run_in_slot(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the pool for a caller that already holds a slot."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

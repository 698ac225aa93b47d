"""The board the front-end processes of `--workers N` share: each one's free slots, sessions and state.

One `multiprocessing` shared-memory array (no lock: each worker writes only its own row, every value is
one aligned C int, and a reader that sees a row a moment old only sends one offer to a worker that then
answers 503 itself). The supervisor (server/ops/workers.py) reads it to send each new session to the worker
with the most free capacity; every worker reads it so that its `/healthz` `free_slots` is the whole
server's, the number a load balancer in front of the port needs.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

# Row layout: [generation, ready, free_slots, sessions, capacity, beat]; beat: CLOCK_MONOTONIC (one clock for
# every process of the machine) in ms at the worker's last publication, which its event loop makes every
# 100 ms: a worker whose loop stands still falls silent.
_FIELDS = 6
_GEN, _READY, _FREE, _SESSIONS, _CAPACITY, _BEAT = range(_FIELDS)
SILENT_AFTER_S = 3.0  # a ready worker not heard from in this long is taken for stuck (its loop stands still)


@dataclass(frozen=True)
class WorkerRow:
    index: int
    generation: int  # restarts of this worker so far: its sessions' ids carry it
    ready: bool      # serving (engine loaded, capacity measured)
    free_slots: int
    sessions: int
    capacity: int
    silent_s: float = 0.0  # since its last publication

    @property
    def stuck(self) -> bool:
        """Ready, but not heard from in SILENT_AFTER_S: its event loop stands still (or it is stopped)."""
        return self.ready and self.silent_s > SILENT_AFTER_S


class Board:
    """Created by the supervisor before the workers start; handed to each (pickled with the process)."""

    def __init__(self, workers: int, context: Any = None) -> None:
        ctx = context or multiprocessing.get_context("spawn")
        self.workers = workers
        self._cells = ctx.Array("q", workers * _FIELDS, lock=False)  # 64-bit: the beat is in ms
        # The supervisor's private directory (mode 0700) of the workers' peer sockets (server/ops/worker_peers.py);
        # set before the workers start, None where workers cannot reach each other.
        self.peers_dir: str | None = None

    def peer_socket(self, index: int) -> str:
        """Where worker `index` answers the other workers (a Unix socket in `peers_dir`)."""
        assert self.peers_dir is not None, "the supervisor sets peers_dir before it starts workers"
        return os.path.join(self.peers_dir, f"w{index}.sock")

    def _get(self, index: int, field: int) -> int:
        return int(self._cells[index * _FIELDS + field])

    def _set(self, index: int, field: int, value: int) -> None:
        self._cells[index * _FIELDS + field] = int(value)

    def row(self, index: int) -> WorkerRow:
        silent_s = max(0.0, time.monotonic() - self._get(index, _BEAT) / 1000.0)
        return WorkerRow(index, self._get(index, _GEN), bool(self._get(index, _READY)),
                         self._get(index, _FREE), self._get(index, _SESSIONS), self._get(index, _CAPACITY),
                         silent_s)

    def rows(self) -> list[WorkerRow]:
        return [self.row(i) for i in range(self.workers)]

    # -- the supervisor -------------------------------------------------------------------------------

    def starting(self, index: int, generation: int) -> None:
        """A (re)started worker: nothing free until it says it is ready."""
        for field in (_READY, _FREE, _SESSIONS, _CAPACITY, _BEAT):
            self._set(index, field, 0)
        self._set(index, _GEN, generation)

    def took_offer(self, index: int) -> None:
        """The supervisor sent an offer there: one slot less (one session more) until the worker publishes."""
        self._set(index, _FREE, max(0, self._get(index, _FREE) - 1))
        self._set(index, _SESSIONS, self._get(index, _SESSIONS) + 1)

    # -- a worker --------------------------------------------------------------------------------------

    def publish(self, index: int, free_slots: int, sessions: int, capacity: int) -> None:
        self._set(index, _FREE, free_slots)
        self._set(index, _SESSIONS, sessions)
        self._set(index, _CAPACITY, capacity)
        self._set(index, _BEAT, int(time.monotonic() * 1000))
        self._set(index, _READY, 1)

    def total_free_slots(self) -> int:
        return sum(r.free_slots for r in self.rows() if r.ready)

    def describe(self) -> list[dict[str, Any]]:
        return [{"worker": r.index, "generation": r.generation, "ready": r.ready, "free_slots": r.free_slots,
                 "sessions": r.sessions, "capacity": r.capacity, "stuck": r.stuck} for r in self.rows()]


@dataclass(frozen=True)
class WorkerSeat:
    """A worker's place on the board: its index and generation (the tag in its session ids)."""

    board: Board
    index: int
    generation: int

    @property
    def tag(self) -> str:
        return worker_tag(self.index, self.generation)

    def others_sessions(self) -> int:
        """Sessions the other workers hold now (their last publication)."""
        return sum(r.sessions for r in self.board.rows() if r.index != self.index and r.ready)


def worker_tag(index: int, generation: int) -> str:
    """The instance-id suffix of worker `index` in its `generation`-th life: "w1g0"."""
    return f"w{index}g{generation}"


# -- a worker's end of the connection hand-over -------------------------------------------------------------


def receive_connections(channel: socket.socket, protocol_factory: Callable[[], asyncio.BaseProtocol],
                        ssl_context: ssl.SSLContext | None = None,
                        on_closed: Callable[[], object] | None = None) -> Callable[[], None]:
    """Serve every TCP connection the supervisor hands over on `channel` (a Unix SOCK_SEQPACKET socket:
    one byte and one descriptor per message, SCM_RIGHTS) with `protocol_factory` (aiohttp's server), as
    if this process had accepted it. Returns the function that stops receiving. `on_closed` is called
    when the supervisor's end closes (it died): a worker then shuts down rather than live on unreachable.
    The supervisor only peeked at the request line, so the worker reads the request from its first byte."""
    loop = asyncio.get_running_loop()
    channel.setblocking(False)
    pending: set[asyncio.Task[Any]] = set()

    def readable() -> None:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(channel, 1, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.exception("the supervisor's channel failed")
                loop.remove_reader(channel.fileno())
                return
            if not fds:  # the supervisor closed its end: it is gone, and so should this worker be
                loop.remove_reader(channel.fileno())
                log.warning("the supervisor closed the hand-over channel: stopping")
                if on_closed is not None:
                    on_closed()
                return
            for fd in fds:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                task = loop.create_task(_serve(sock))
                pending.add(task)
                task.add_done_callback(pending.discard)

    async def _serve(sock: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(protocol_factory, sock, ssl=ssl_context)
        except Exception:
            log.debug("a handed-over connection failed before its request", exc_info=True)
            sock.close()

    loop.add_reader(channel.fileno(), readable)

    def stop() -> None:
        loop.remove_reader(channel.fileno())

    return stop


async def publish_forever(publish: Callable[[], None], interval_s: float = 0.1) -> None:
    """Keep this worker's row current between session changes (its measured capacity moves with live
    measurements and with the other workers' sessions); the supervisor routes offers by it."""
    while True:
        publish()
        await asyncio.sleep(interval_s)

"""The worker processes of `--workers N` asking each other, for the answers that are the whole server's.

A session lives in the worker that opened it and each worker holds its own avatar library, so a few
answers need every worker: `GET /sessions` lists every worker's sessions, `GET /metrics` merges every
worker's page, `POST /avatars` has every worker take in the new upload, `DELETE /avatars/{id}` removes it
from every worker or from none. The worker that takes such a request (the supervisor routes it round-robin;
the access policy, server/access/auth.py, has already let it through: one access table) asks the others here.

The channel: each worker also serves a small internal app (server/ops/peer_api.py) on a Unix socket in the
supervisor's private directory (`mkdtemp`: mode 0700, so only the server's own user can connect). It never
listens on the network, so it has no rows in the access table and takes no token. Plain HTTP over it, with
aiohttp on both ends: no second protocol to write, and every call has a status and a JSON error.

Cost, bounded: one request per other worker, all at once, each under PEER_TIMEOUT_S in all (connect,
answer and body); an answer body is read up to MAX_PEER_ANSWER_BYTES. A stuck worker (its loop frozen) or a
dead one (connection refused) is left out of the answer, which names it (`workers_missing`): it never hangs
the request; one already silent on the board for SILENT_AFTER_S (server/ops/worker_board.py) is not even
asked. Workers that are not ready on the board (starting, restarting) are not asked: their sessions
are gone, and a (re)started worker loads the kept avatar uploads from disk itself.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from server.ops.worker_board import WorkerRow, WorkerSeat

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 2.0                  # one worker's whole answer; a stuck worker costs a request this long
MAX_PEER_ANSWER_BYTES = 16 * 1024 * 1024  # a metrics page or a session list: far below this


@dataclass(frozen=True)
class PeerAnswer:
    """One worker's answer: its HTTP status and body (JSON, or text), or status 0 and why there is none."""

    worker: int
    status: int
    body: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def missing(self) -> dict[str, Any]:
        """How an answer that lacks this worker says so (`workers_missing` entries)."""
        if self.status:
            reason = self.body.get("error", "") if isinstance(self.body, dict) else ""
            return {"worker": self.worker, "status": self.status, "error": reason or f"status {self.status}"}
        return {"worker": self.worker, "error": self.error}


@dataclass
class WorkerPeers:
    """This worker's way to the other workers' peer sockets (`seat.board.peer_socket(i)`)."""

    seat: WorkerSeat
    timeout_s: float = PEER_TIMEOUT_S

    def others(self) -> list[WorkerRow]:
        """The other workers serving now (ready on the board)."""
        return [r for r in self.seat.board.rows() if r.index != self.seat.index and r.ready]

    async def ask(self, method: str, path: str, *, text: bool = False) -> list[PeerAnswer]:
        """`method path` on every other ready worker at once; each answer within `timeout_s` or none. A
        worker already silent on the board (stuck) is not waited for at all."""
        return list(await asyncio.gather(*(
            self._silent(row) if row.stuck else self._ask_one(row.index, method, path, text)
            for row in self.others())))

    async def _silent(self, row: WorkerRow) -> PeerAnswer:
        return PeerAnswer(row.index, 0, error=f"not answering: silent for {row.silent_s:.0f} s")

    async def _ask_one(self, index: int, method: str, path: str, text: bool) -> PeerAnswer:
        connector = aiohttp.UnixConnector(path=self.seat.board.peer_socket(index))
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http, \
                    http.request(method, f"http://worker{index}{path}") as resp:
                raw = await resp.content.read(MAX_PEER_ANSWER_BYTES + 1)
                if len(raw) > MAX_PEER_ANSWER_BYTES:
                    return PeerAnswer(index, 0, error=f"its answer is over {MAX_PEER_ANSWER_BYTES} bytes")
                body: Any = raw.decode("utf-8", errors="replace")
                if not text or resp.content_type == "application/json":  # errors are JSON
                    body = json.loads(body)
                return PeerAnswer(index, resp.status, body)
        except asyncio.TimeoutError:
            log.warning("worker %d did not answer %s %s within %g s", index, method, path, self.timeout_s)
            return PeerAnswer(index, 0, error=f"no answer within {self.timeout_s:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.warning("worker %d unreachable for %s %s: %s", index, method, path, exc)
            return PeerAnswer(index, 0, error=f"unreachable ({type(exc).__name__})")

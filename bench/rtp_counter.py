"""The capacity bench's client: receives the sessions' RTP on loopback and counts whole video frames, decoding
nothing, in a process of its own, so what the bench measures is the server.

    python bench/rtp_counter.py VIDEO_PAYLOAD_TYPE

Prints the UDP port it listens on (127.0.0.1), then reads datagrams until a line arrives on stdin, then
prints one JSON object: {"streams": {ssrc: {"frames": n, "first_s": t, "last_s": t, "max_gap_ms": g,
"packets": p}}, "cpu_s": its own CPU seconds, "wall_s": seconds it listened}.

SRTP leaves the RTP header in the clear (RFC 3711), so the payload type, marker bit, sequence number,
timestamp and SSRC are read without keys. A video frame counts when its last packet (the marker bit, as a
browser's receive buffer completes a frame: bench/netimpair.py MarkerJitterBuffer) arrives and every packet
since the previous frame's marker did; its arrival time is that packet's. Only the standard library is
imported: the process starts in milliseconds and costs the machine next to nothing.
"""
from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

HEADER = struct.Struct("!BBHII")  # V/P/X/CC, M/PT, sequence number, timestamp, SSRC
RECEIVE_BUFFER = 4 << 20


class Stream:
    """One SSRC's video frames, assembled by marker bit from sequence numbers."""

    def __init__(self) -> None:
        self.frames = 0
        self.packets = 0
        self.first: float | None = None
        self.last: float | None = None
        self.max_gap = 0.0
        self._start: int | None = None   # sequence number the current frame starts at
        self._seen = 0                   # packets of the current frame received

    def add(self, sequence: int, marker: bool, now: float) -> None:
        self.packets += 1
        if self._start is None:
            self._start = sequence
        self._seen += 1
        if not marker:
            return
        expected = (sequence - self._start) % (1 << 16) + 1
        if self._seen == expected:
            if self.last is not None:
                self.max_gap = max(self.max_gap, now - self.last)
            self.first = now if self.first is None else self.first
            self.last = now
            self.frames += 1
        self._start, self._seen = (sequence + 1) % (1 << 16), 0

    def summary(self) -> dict:
        return {"frames": self.frames, "packets": self.packets, "first_s": self.first, "last_s": self.last,
                "max_gap_ms": round(1000.0 * self.max_gap, 1)}


def main() -> int:
    video_pt = int(sys.argv[1])
    cpu0, wall0 = time.process_time(), time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    print(sock.getsockname()[1], flush=True)
    streams: dict[int, Stream] = {}

    def drain() -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            if len(data) < HEADER.size:
                continue
            _, second, sequence, _, ssrc = HEADER.unpack_from(data)
            if second & 0x7F == video_pt:
                streams.setdefault(ssrc, Stream()).add(sequence, bool(second & 0x80), time.monotonic())

    while True:
        ready, _, _ = select.select([sock, sys.stdin], [], [], 1.0)
        if sock in ready:
            drain()
        if sys.stdin in ready:
            drain()
            break
    print(json.dumps({"streams": {str(k): v.summary() for k, v in streams.items()},
                      "cpu_s": round(time.process_time() - cpu0, 3), "wall_s": round(time.monotonic() - wall0, 3)}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

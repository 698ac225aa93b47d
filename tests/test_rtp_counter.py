"""bench/rtp_counter.py, the capacity bench's client: whole video frames counted from RTP headers (marker bit,
sequence numbers), a frame with a lost packet not counted, other payload types ignored; end to end over
loopback as a process of its own."""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rtp_counter import Stream

COUNTER = Path(__file__).resolve().parents[1] / "bench" / "rtp_counter.py"


def header(pt: int, sequence: int, timestamp: int, ssrc: int, marker: bool) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, sequence % 65536, timestamp, ssrc) + b"x" * 20


def test_frames_complete_at_their_marker_and_a_lost_packet_loses_its_frame():
    stream = Stream()
    sequence = 65530  # wraps within the run
    for frame in range(6):
        for part in range(3):
            if frame == 2 and part == 1:   # lost
                sequence += 1
                continue
            stream.add(sequence, part == 2, now=frame * 0.04)
            sequence += 1
    assert stream.frames == 5 and stream.packets == 17
    assert stream.summary()["max_gap_ms"] == pytest.approx(80.0)


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("loopback_only")
def test_counts_each_ssrcs_video_frames_over_loopback():
    proc = subprocess.Popen([sys.executable, str(COUNTER), "97"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for ssrc, frames in ((11, 4), (22, 7)):
                for k in range(frames):
                    sock.sendto(header(97, 2 * k, 3600 * k, ssrc, False), ("127.0.0.1", port))
                    sock.sendto(header(97, 2 * k + 1, 3600 * k, ssrc, True), ("127.0.0.1", port))
                    sock.sendto(header(111, k, 960 * k, ssrc + 1, True), ("127.0.0.1", port))  # audio: ignored
        out, _ = proc.communicate("stop\n", timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    result = json.loads(out.splitlines()[-1])
    assert {k: v["frames"] for k, v in result["streams"].items()} == {"11": 4, "22": 7}
    assert result["cpu_s"] >= 0.0

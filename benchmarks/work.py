"""The work a cancellation probe cancels: a CPU-bound loop that leaves a heartbeat.

Module-level and free of heavy imports, so that worker processes (trio-parallel, process pools)
import it cheaply. The loop writes ``time.monotonic_ns()`` into a shared 8-byte file every
~0.5 ms of work; after a cancellation, the last heartbeat says when the work really stopped,
whether it ran in a thread (stopped only when it returns), or in a process (stopped when
killed, or when it returns).
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable


def busy(heartbeat_path: str, seconds: float, check: Callable[[], object] | None = None) -> int:
    """Burn one core for ``seconds`` (unless killed), beating into ``heartbeat_path``; with
    ``check``, call it between beats (it raises to stop the work cooperatively)."""
    fd = os.open(heartbeat_path, os.O_RDWR)
    try:
        beat = mmap.mmap(fd, 8)
    finally:
        os.close(fd)
    deadline = time.monotonic() + seconds
    rounds = 0
    try:
        while time.monotonic() < deadline:
            total = 0
            for i in range(2000):  # ~0.1-0.5 ms of pure-Python work between beats
                total += i * i
            rounds += 1
            beat[:8] = struct.pack("q", time.monotonic_ns())
            if check is not None:
                check()
    finally:
        beat.close()
    return rounds


def noop() -> None:
    """A call that does nothing: warms a pool up (its worker exists before timing starts)."""


def new_heartbeat(path: str) -> None:
    with open(path, "wb") as file:
        file.write(b"\0" * 8)


def last_beat(path: str) -> int:
    with open(path, "rb") as file:
        return int(struct.unpack("q", file.read(8))[0])

"""A client load process: many websocket connections, driven over stdin/stdout JSON lines.

``python -m benchmarks.loadclient`` reads one command per line and answers each with one line:

- ``{"cmd": "connect", "url", "key", "n", "slow": false}``: open ``n`` more connections (a slow
  one completes its handshake and then never reads again); answers ``connected`` / ``failed``.
- ``{"cmd": "record", "on": true}``: start (clearing) or stop recording delivery latencies.
- ``{"cmd": "stats", "t0": ns, "t1": ns}``: messages delivered between two CLOCK_MONOTONIC
  instants (10 ms buckets), totals, recorded latencies (ns, subsampled), this process's CPU time.
- ``{"cmd": "wait_closed", "timeout": s}``: wait until every connection has ended; close codes.
- ``{"cmd": "close"}``: close every connection (code 1000) and exit.

End of stdin (the harness is gone) ends the process at once.

Why a plain ``epoll`` loop and not trio: the clients share two cores with the server under test,
so every microsecond they spend per delivered message is taken from it. A trio task per
connection cost ~25-45 µs per received frame here (one task wake-up per frame); one epoll loop
over all sockets, a ``recv`` per ready socket and a hand-written frame parser cost a fraction
of that. The harness reports the clients' CPU per delivery next to the server's.

Counting is kept cheap for the same reason: a change message is one occurrence of
``"interface"`` in a frame (a frame holds one message or a JSON array of them), and a latency
is read with one regex over the frame: the writer puts its ``time.monotonic_ns()`` in the
updated field as ``bench-ts-<ns>``, and CLOCK_MONOTONIC is one clock for every process of the
machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import socket
import struct
import sys
import time
from array import array
from collections import Counter
from typing import Any

from benchmarks.rawws import (
    ABNORMAL,
    FrameReader,
    HandshakeError,
    bearer,
    client_frame,
    handshake_request,
    handshake_response,
)

BUCKET_NS = 10_000_000
MAX_LATENCIES = 50_000
TIMESTAMP = re.compile(rb"bench-ts-(\d+)")
_RECEIVE = 1 << 18
_CLOSE = 0x8


class Load:
    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.sockets: dict[int, socket.socket] = {}
        self.readers: dict[int, FrameReader] = {}
        self.slow: list[socket.socket] = []
        self.buckets: Counter[int] = Counter()
        self.messages = 0
        self.frames = 0
        self.bytes = 0
        self.recording = False
        self.latencies = array("q")
        self.close_codes: Counter[int] = Counter()
        self.last_close_ns = 0
        # One receive buffer for every socket: recv(n) would allocate n bytes per call (an
        # mmap and munmap for 256 KiB), which cost more than everything else per frame.
        self._received = bytearray(_RECEIVE)
        self._view = memoryview(self._received)

    @property
    def open(self) -> int:
        return len(self.sockets)

    def on_frame(self, payload: bytes, now: int) -> None:
        self.frames += 1
        self.bytes += len(payload)
        count = payload.count(b'"interface"')
        if count:
            self.messages += count
            self.buckets[now // BUCKET_NS] += count
            if self.recording:
                append = self.latencies.append
                for match in TIMESTAMP.finditer(payload):
                    append(now - int(match.group(1)))

    def connect(self, url: str, key: str, n: int, slow: bool) -> dict[str, Any]:
        errors = []
        for _ in range(n):
            try:
                sock, leftover = _open(url, key, small_buffer=slow)
            except (OSError, HandshakeError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if slow:
                # Never read again: the kernel buffers fill up, then the server's.
                self.slow.append(sock)
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self.sockets[fd] = sock
            self.readers[fd] = FrameReader(self.on_frame)
            self.epoll.register(fd, select.EPOLLIN)
            if leftover:
                self._feed(fd, leftover, time.monotonic_ns())
        return {"connected": n - len(errors), "failed": len(errors), "errors": errors[:3]}

    def on_readable(self, fd: int, now: int) -> None:
        sock = self.sockets.get(fd)
        if sock is None:
            return
        try:
            size = sock.recv_into(self._received)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if not size:
            self._finish(fd, now)
        else:
            self._feed(fd, self._view[:size], now)

    def _feed(self, fd: int, data: bytes | memoryview, now: int) -> None:
        reader = self.readers[fd]
        reader.feed(data, now)
        if replies := reader.take_replies():
            with contextlib.suppress(OSError):
                self.sockets[fd].send(replies)
        # After a close frame the server closes the TCP connection: EOF finishes it.

    def _finish(self, fd: int, now: int) -> None:
        sock = self.sockets.pop(fd)
        reader = self.readers.pop(fd)
        self.epoll.unregister(fd)
        sock.close()
        self.close_codes[reader.close_code or ABNORMAL] += 1
        self.last_close_ns = max(self.last_close_ns, reader.closed_at_ns or now)

    def stats(self, t0: int | None, t1: int | None) -> dict[str, Any]:
        window = None
        if t0 is not None and t1 is not None:
            first, last = t0 // BUCKET_NS, t1 // BUCKET_NS
            window = sum(n for bucket, n in self.buckets.items() if first <= bucket < last)
        latencies = list(self.latencies)
        if len(latencies) > MAX_LATENCIES:
            latencies = random.sample(latencies, MAX_LATENCIES)
        return {
            "window_messages": window,
            "messages": self.messages,
            "frames": self.frames,
            "bytes": self.bytes,
            "latencies": latencies,
            "cpu_ns": time.process_time_ns(),
            "open": self.open,
            "close_codes": {str(k): v for k, v in self.close_codes.items()},
        }

    def closed_report(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "close_codes": {str(k): v for k, v in self.close_codes.items()},
            "last_close_ns": self.last_close_ns,
        }

    def send_close_all(self) -> None:
        frame = client_frame(_CLOSE, struct.pack("!H", 1000))
        for sock in self.sockets.values():
            with contextlib.suppress(OSError):
                sock.send(frame)


def _open(
    url: str, key: str, timeout: float = 30, small_buffer: bool = False
) -> tuple[socket.socket, bytes]:
    host, port, request = handshake_request(url, bearer(key))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if small_buffer:
            # A slow client's receive window: the smallest the kernel allows, so that the server
            # sees a stuck client within seconds instead of after megabytes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(request)
        response = b""
        while (rest := handshake_response(url, response)) is None:
            chunk = sock.recv(4096)
            if not chunk:
                raise HandshakeError(f"{url}: connection closed during the handshake")
            response += chunk
    except BaseException:
        sock.close()
        raise
    return sock, rest


def _answer(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def main() -> None:
    load = Load()
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    load.epoll.register(stdin, select.EPOLLIN)
    pending = b""
    waiting_until: float | None = None  # a wait_closed in progress
    exiting_at: float | None = None  # a close in progress
    while True:
        timeout = 0.05 if (waiting_until or exiting_at) else 1.0
        events = load.epoll.poll(timeout)
        now = time.monotonic_ns()
        commands = []
        for fd, _ in events:
            if fd == stdin:
                try:
                    chunk = os.read(stdin, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    return  # the harness is gone
                pending += chunk
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    commands.append(json.loads(line))
            else:
                load.on_readable(fd, now)
        for command in commands:
            match command["cmd"]:
                case "connect":
                    _answer(load.connect(command["url"], command["key"], command["n"],
                                         command.get("slow", False)))  # fmt: skip
                case "record":
                    load.recording = bool(command["on"])
                    if load.recording:
                        load.latencies = array("q")
                    _answer({"ok": True})
                case "stats":
                    _answer(load.stats(command.get("t0"), command.get("t1")))
                case "wait_closed":
                    waiting_until = time.monotonic() + float(command["timeout"])
                case "close":
                    load.send_close_all()
                    exiting_at = time.monotonic() + 2
                case other:
                    _answer({"error": f"unknown command {other!r}"})
        if waiting_until is not None and (not load.open or time.monotonic() >= waiting_until):
            _answer(load.closed_report())
            waiting_until = None
        if exiting_at is not None and (not load.open or time.monotonic() >= exiting_at):
            _answer({"ok": True})
            return


if __name__ == "__main__":
    main()

"""A client load process: many websocket connections, driven over stdin/stdout JSON lines.

``python -m benchmarks.loadclient`` reads one command per line and answers each with one line
(a command that arrives while another is still in progress waits for it):

- ``{"cmd": "connect", "url", "key", "n", "slow": false, "track": false, "window": 64}``: open
  ``n`` more clients, at most ``window`` handshakes in progress at once (0: all at once); a
  slow one completes its handshake and then never reads again; a tracked one records the
  position of every change message it receives (see below). Answers ``connected``,
  ``failed``, ``errors``, and the CLOCK_MONOTONIC instants the first attempt started and the
  last handshake ended.
- ``{"cmd": "reconnect", "url", "window": 0, "target": P}``: every client whose connection has
  ended connects again to ``url``, with ``?since=`` the last position it received (if any);
  same answer as ``connect``. With ``target``, the time each tracked client reaches position
  ``P`` is noted from now on (see ``wait_position``).
- ``{"cmd": "record", "on": true}``: start (clearing) or stop recording delivery latencies.
- ``{"cmd": "stats", "t0": ns, "t1": ns}``: messages delivered between two CLOCK_MONOTONIC
  instants (10 ms buckets), totals, recorded latencies (ns, subsampled), this process's CPU time,
  and for tracked clients ``[count, crc32, violations, last position]`` each.
- ``{"cmd": "wait_position", "position": P, "timeout": s}``: wait until every tracked client
  has received a message at ``position`` or later; answers how many did and when the last did.
- ``{"cmd": "wait_closed", "timeout": s}``: wait until every connection has ended; close codes.
- ``{"cmd": "close"}``: close every connection (code 1000) and exit.

End of stdin (the harness is gone) ends the process at once.

Why a plain ``epoll`` loop and not trio: the clients share two cores with the server under test,
so every microsecond they spend per delivered message is taken from it. A trio task per
connection cost ~25-45 µs per received frame here (one task wake-up per frame); one epoll loop
over all sockets, a ``recv`` per ready socket and a hand-written frame parser cost a fraction
of that. The harness reports the clients' CPU per delivery next to the server's. Connections
are opened without blocking too (``connect`` in progress, handshake, frames: one loop), so that
thousands open in seconds and a reconnect of every client is really at once.

Counting is kept cheap for the same reason: a change message is one occurrence of
``"interface"`` in a frame (a frame holds one message or a JSON array of them), and a latency
is read with one regex over the frame: the writer puts its ``time.monotonic_ns()`` in the
updated field as ``bench-ts-<ns>``, and CLOCK_MONOTONIC is one clock for every process of the
machine.

A tracked client (the cluster benchmark's resume test) also reads each message's ``position``
(one more regex) and keeps, across its reconnections: how many it received, a CRC-32 of the
positions in the order received, how many were not after the one before (a duplicate or a
reordering), and the last. Two clients that received exactly the same changes in the same
order have the same count and CRC.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import resource
import select
import socket
import struct
import sys
import time
import zlib
from array import array
from collections import Counter, deque
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
POSITION = re.compile(rb'"position":"([0-9a-f]{22})"')
_RECEIVE = 1 << 18
_CLOSE = 0x8
CONNECT_TIMEOUT = 60.0
"""Seconds a connect command may take in all; attempts still in progress then fail."""

_CONNECTING, _HANDSHAKE, _OPEN = 1, 2, 3


class Client:
    """One logical client: what it received, across its connections."""

    __slots__ = ("conn", "count", "crc", "position", "reached_ns", "track", "violations")

    def __init__(self, track: bool) -> None:
        self.track = track
        self.conn: Conn | None = None
        self.count = 0
        self.crc = 0
        self.violations = 0
        self.position = b""
        self.reached_ns: int | None = None


class Conn:
    """One connection attempt or open connection of a client."""

    __slots__ = ("client", "fd", "reader", "response", "slow", "sock", "state", "url")

    def __init__(self, client: Client, sock: socket.socket, url: str, slow: bool) -> None:
        self.client = client
        self.sock = sock
        self.fd = sock.fileno()
        self.url = url
        self.slow = slow
        self.state = _CONNECTING
        self.response = b""
        self.reader: FrameReader | None = None


class Attempt:
    """A connect or reconnect command in progress."""

    def __init__(self, queue: list[tuple[Client, str, bool]], key: str, window: int) -> None:
        self.queue = deque(queue)
        self.key = key
        self.window = window or len(queue) or 1
        self.in_progress = 0
        self.connected = 0
        self.errors: list[str] = []
        self.started_ns = time.monotonic_ns()
        self.done_ns = self.started_ns
        self.deadline = time.monotonic() + CONNECT_TIMEOUT

    @property
    def finished(self) -> bool:
        return not self.queue and not self.in_progress

    def answer(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "failed": len(self.errors),
            "errors": self.errors[:3],
            "started_ns": self.started_ns,
            "done_ns": self.done_ns,
        }


class Load:
    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.clients: list[Client] = []
        self.slow: list[socket.socket] = []
        self.buckets: Counter[int] = Counter()
        self.messages = 0
        self.frames = 0
        self.bytes = 0
        self.recording = False
        self.latencies = array("q")
        self.close_codes: Counter[int] = Counter()
        self.last_close_ns = 0
        self.last_message_ns = 0
        self.attempt: Attempt | None = None
        self.key = ""
        self.target: bytes | None = None  # a wait_position in progress
        self.last_reached_ns = 0
        # One receive buffer for every socket: recv(n) would allocate n bytes per call (an
        # mmap and munmap for 256 KiB), which cost more than everything else per frame.
        self._received = bytearray(_RECEIVE)
        self._view = memoryview(self._received)

    @property
    def open(self) -> int:
        return sum(1 for conn in self.conns.values() if conn.state == _OPEN)

    # ---- frames ---------------------------------------------------------------------------

    def on_frame(self, payload: bytes, now: int) -> None:
        self.frames += 1
        self.bytes += len(payload)
        count = payload.count(b'"interface"')
        if count:
            self.messages += count
            self.last_message_ns = now
            self.buckets[now // BUCKET_NS] += count
            if self.recording:
                append = self.latencies.append
                for match in TIMESTAMP.finditer(payload):
                    append(now - int(match.group(1)))

    def tracker(self, client: Client) -> Any:
        def on_tracked_frame(payload: bytes, now: int) -> None:
            self.on_frame(payload, now)
            for match in POSITION.finditer(payload):
                position = match.group(1)
                if position <= client.position:
                    client.violations += 1
                client.count += 1
                client.crc = zlib.crc32(position, client.crc)
                client.position = position
            target = self.target
            if target is not None and client.reached_ns is None and client.position >= target:
                client.reached_ns = now
                self.last_reached_ns = max(self.last_reached_ns, now)

        return on_tracked_frame

    # ---- connecting, without blocking -----------------------------------------------------

    def connect(self, url: str, key: str, n: int, slow: bool, track: bool, window: int) -> None:
        self.key = key
        clients = [Client(track) for _ in range(n)]
        self.clients.extend(clients)
        self.attempt = Attempt([(client, url, slow) for client in clients], key, window)
        self._start_attempts()

    def reconnect(self, url: str, window: int) -> None:
        queue = []
        for client in self.clients:
            if client.conn is None:
                since = client.position.decode()
                sep = "&" if "?" in url else "?"
                queue.append((client, f"{url}{sep}since={since}" if since else url, False))
        self.attempt = Attempt(queue, self.key, window)
        self._start_attempts()

    def _start_attempts(self) -> None:
        attempt = self.attempt
        assert attempt is not None
        while attempt.queue and attempt.in_progress < attempt.window:
            client, url, slow = attempt.queue.popleft()
            attempt.in_progress += 1
            try:
                self._begin(client, url, slow)
            except OSError as exc:
                self._failed(None, f"{type(exc).__name__}: {exc}")

    def _begin(self, client: Client, url: str, slow: bool) -> None:
        host, port, _ = handshake_request(url, None)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if slow:
            # A slow client's receive window: the smallest the kernel allows, so that the server
            # sees a stuck client within seconds instead of after megabytes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(code, os.strerror(code))
        conn = Conn(client, sock, url, slow)
        client.conn = conn
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, select.EPOLLOUT)

    def _on_connected(self, conn: Conn) -> None:
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._failed(conn, f"ConnectionError: {os.strerror(code)}")
            return
        _, _, request = handshake_request(conn.url, bearer(self.key))
        try:
            conn.sock.send(request)  # a few hundred bytes: the empty send buffer takes them
        except OSError as exc:
            self._failed(conn, f"{type(exc).__name__}: {exc}")
            return
        conn.state = _HANDSHAKE
        self.epoll.modify(conn.fd, select.EPOLLIN)

    def _on_handshake_data(self, conn: Conn, data: bytes, now: int) -> None:
        if not data:
            self._failed(conn, f"HandshakeError: {conn.url}: closed during the handshake")
            return
        conn.response += data
        try:
            rest = handshake_response(conn.url, conn.response)
        except HandshakeError as exc:
            self._failed(conn, f"HandshakeError: {exc}")
            return
        if rest is None:
            return
        conn.response = b""
        conn.state = _OPEN
        attempt = self.attempt
        if attempt is not None:
            attempt.in_progress -= 1
            attempt.connected += 1
            attempt.done_ns = now
        if conn.slow:
            # Never read again: the kernel buffers fill up, then the server's.
            self.epoll.unregister(conn.fd)
            del self.conns[conn.fd]
            self.slow.append(conn.sock)
            conn.client.conn = None
            self.clients.remove(conn.client)
        else:
            client = conn.client
            conn.reader = FrameReader(self.tracker(client) if client.track else self.on_frame)
            if rest:
                self._feed(conn, rest, now)
        if attempt is not None:
            self._start_attempts()

    def _failed(self, conn: Conn | None, error: str) -> None:
        if conn is not None:
            self._drop(conn)
        attempt = self.attempt
        if attempt is not None:
            attempt.in_progress -= 1
            attempt.errors.append(error)
            self._start_attempts()

    def _drop(self, conn: Conn) -> None:
        self.conns.pop(conn.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(conn.fd)
        conn.sock.close()
        conn.client.conn = None

    def expire_attempt(self) -> None:
        """At the deadline: every attempt still in progress fails."""
        attempt = self.attempt
        if attempt is None or time.monotonic() < attempt.deadline:
            return
        for conn in [c for c in self.conns.values() if c.state != _OPEN]:
            self._failed(conn, f"TimeoutError: no handshake within {CONNECT_TIMEOUT:g} s")
        while attempt.queue:
            attempt.queue.popleft()
            attempt.errors.append(f"TimeoutError: not started within {CONNECT_TIMEOUT:g} s")

    # ---- reading --------------------------------------------------------------------------

    def on_event(self, fd: int, events: int, now: int) -> None:
        conn = self.conns.get(fd)
        if conn is None:
            return
        if conn.state == _CONNECTING:
            self._on_connected(conn)
            return
        try:
            size = conn.sock.recv_into(self._received)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if conn.state == _HANDSHAKE:
            self._on_handshake_data(conn, bytes(self._view[:size]), now)
        elif not size:
            self._finish(conn, now)
        else:
            self._feed(conn, self._view[:size], now)

    def _feed(self, conn: Conn, data: bytes | memoryview, now: int) -> None:
        reader = conn.reader
        assert reader is not None
        reader.feed(data, now)
        if replies := reader.take_replies():
            with contextlib.suppress(OSError):
                conn.sock.send(replies)
        # After a close frame the server closes the TCP connection: EOF finishes it.

    def _finish(self, conn: Conn, now: int) -> None:
        reader = conn.reader
        assert reader is not None
        self._drop(conn)
        self.close_codes[reader.close_code or ABNORMAL] += 1
        self.last_close_ns = max(self.last_close_ns, reader.closed_at_ns or now)

    # ---- reports --------------------------------------------------------------------------

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
            "last_message_ns": self.last_message_ns,
            "frames": self.frames,
            "bytes": self.bytes,
            "latencies": latencies,
            "cpu_ns": time.process_time_ns(),
            "open": self.open,
            "close_codes": {str(k): v for k, v in self.close_codes.items()},
            "tracked": [
                [c.count, c.crc, c.violations, c.position.decode()] for c in self.clients if c.track
            ],
        }

    def closed_report(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "close_codes": {str(k): v for k, v in self.close_codes.items()},
            "last_close_ns": self.last_close_ns,
        }

    def wait_position(self, position: str) -> None:
        self.target = position.encode()
        self.last_reached_ns = 0
        for client in self.clients:
            client.reached_ns = None
            if client.track and client.position >= self.target:
                client.reached_ns = time.monotonic_ns()
                self.last_reached_ns = max(self.last_reached_ns, client.reached_ns)

    def position_report(self) -> dict[str, Any]:
        tracked = [c for c in self.clients if c.track]
        reached = sum(1 for c in tracked if c.reached_ns is not None)
        self.target = None
        last = self.last_reached_ns
        return {"reached": reached, "tracked": len(tracked), "last_reached_ns": last,
                "open": self.open}  # fmt: skip

    def all_reached(self) -> bool:
        return all(c.reached_ns is not None for c in self.clients if c.track)

    def send_close_all(self) -> None:
        frame = client_frame(_CLOSE, struct.pack("!H", 1000))
        for conn in self.conns.values():
            if conn.state == _OPEN:
                with contextlib.suppress(OSError):
                    conn.sock.send(frame)


def _answer(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def _raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    _raise_open_file_limit()
    load = Load()
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    load.epoll.register(stdin, select.EPOLLIN)
    pending = b""
    commands: deque[dict[str, Any]] = deque()
    busy: str | None = None  # the command in progress
    until: float = 0.0  # its deadline (wait_closed, wait_position, close)
    while True:
        timeout = 0.05 if busy else 1.0
        events = load.epoll.poll(timeout)
        now = time.monotonic_ns()
        for fd, mask in events:
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
                load.on_event(fd, mask, now)
        # The command in progress, if any: done yet?
        if busy in ("connect", "reconnect"):
            load.expire_attempt()
            assert load.attempt is not None
            if load.attempt.finished:
                _answer(load.attempt.answer())
                load.attempt, busy = None, None
        elif busy == "wait_closed":
            if not load.open or time.monotonic() >= until:
                _answer(load.closed_report())
                busy = None
        elif busy == "wait_position":
            if load.all_reached() or time.monotonic() >= until:
                _answer(load.position_report())
                busy = None
        elif busy == "close" and (not load.open or time.monotonic() >= until):
            _answer({"ok": True})
            return
        while commands and busy is None:
            command = commands.popleft()
            match command["cmd"]:
                case "connect":
                    load.connect(command["url"], command["key"], int(command["n"]),
                                 bool(command.get("slow")), bool(command.get("track")),
                                 int(command.get("window", 64)))  # fmt: skip
                    busy = "connect"
                case "reconnect":
                    if command.get("target"):
                        load.wait_position(command["target"])
                    load.reconnect(command["url"], int(command.get("window", 0)))
                    busy = "reconnect"
                case "record":
                    load.recording = bool(command["on"])
                    if load.recording:
                        load.latencies = array("q")
                    _answer({"ok": True})
                case "stats":
                    _answer(load.stats(command.get("t0"), command.get("t1")))
                case "wait_closed":
                    until, busy = time.monotonic() + float(command["timeout"]), "wait_closed"
                case "wait_position":
                    if load.target != command["position"].encode():
                        load.wait_position(command["position"])
                    until, busy = time.monotonic() + float(command["timeout"]), "wait_position"
                case "close":
                    load.send_close_all()
                    until, busy = time.monotonic() + 2, "close"
                case other:
                    _answer({"error": f"unknown command {other!r}"})


if __name__ == "__main__":
    main()

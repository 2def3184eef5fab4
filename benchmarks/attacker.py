"""The fairness benchmark's attacker: one connection sending large JSON-RPC frames flat out.

``python -m benchmarks.attacker --url URL --key KEY --frames N --fields F`` connects, completes
the handshake and prints ``{"ready": true, "frame_bytes": ...}``; on a line from stdin it sends
``N`` copies of one masked text frame, a JSON-RPC request whose ``params`` hold ``F`` fields no
method has (``"f0": 1, "f1": 1, ...``), as fast as the socket takes them, while reading what
the server answers. It prints one JSON line and exits once every frame has been answered, or
the connection ended, or 120 s passed: ``started_ns`` (the first byte sent), ``sent_ns`` (the
last), ``ended_ns`` (the last answer), ``answers`` (JSON-RPC responses), ``close_code``.

A non-blocking ``select`` loop over one socket, so that the attacker is as fast as the
kernel lets it be, whatever the server does with what it reads.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time
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

TIME_LIMIT = 120.0
_TEXT = 0x1


def request_frame(fields: int) -> bytes:
    """The masked frame sent over and over: a ``samples.update`` with ``fields`` unknown fields."""
    params = ",".join(f'"f{i}":1' for i in range(fields))
    text = '{"jsonrpc":"2.0","id":1,"method":"samples.update","params":{' + params + "}}"
    return client_frame(_TEXT, text.encode())


def connect(url: str, key: str) -> tuple[socket.socket, bytes]:
    host, port, request = handshake_request(url, bearer(key))
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(request)
    response = b""
    while (rest := handshake_response(url, response)) is None:
        chunk = sock.recv(4096)
        if not chunk:
            raise HandshakeError(f"{url}: connection closed during the handshake")
        response += chunk
    return sock, rest


def attack(sock: socket.socket, leftover: bytes, frame: bytes, frames: int) -> dict[str, Any]:
    answers = 0
    ended_ns = 0

    def on_frame(payload: bytes, now: int) -> None:
        nonlocal answers, ended_ns
        if b'"jsonrpc"' in payload:
            answers += 1
            ended_ns = now

    reader = FrameReader(on_frame)
    sock.setblocking(False)
    view = memoryview(frame)
    to_send, offset = frames, 0
    started_ns = time.monotonic_ns()
    sent_ns = started_ns
    deadline = time.monotonic() + TIME_LIMIT
    closed = reader.feed(leftover, started_ns) if leftover else False
    while not closed and answers < frames and time.monotonic() < deadline:
        writing = [sock] if to_send else []
        readable, writable, _ = select.select([sock], writing, [], 1.0)
        if writable:
            try:
                offset += sock.send(view[offset:])
            except BlockingIOError:
                pass
            except OSError:
                break
            if offset == len(frame):
                to_send, offset = to_send - 1, 0
                if not to_send:
                    sent_ns = time.monotonic_ns()
        if readable:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                break
            closed = reader.feed(data, time.monotonic_ns())
            if replies := reader.take_replies():
                sock.setblocking(True)
                sock.sendall(replies)
                sock.setblocking(False)
    return {
        "started_ns": started_ns,
        "sent_ns": sent_ns,
        "ended_ns": ended_ns or time.monotonic_ns(),
        "answers": answers,
        "unsent": to_send,
        "close_code": reader.close_code or (None if answers >= frames else ABNORMAL),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacker")
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--fields", type=int, default=80_000)
    args = parser.parse_args()
    frame = request_frame(args.fields)
    sock, leftover = connect(args.url, args.key)
    sys.stdout.write(json.dumps({"ready": True, "frame_bytes": len(frame)}) + "\n")
    sys.stdout.flush()
    if not sys.stdin.readline():
        return  # the harness is gone
    result = attack(sock, leftover, frame, args.frames)
    sys.stdout.write(json.dumps({**result, "frame_bytes": len(frame)}) + "\n")
    sys.stdout.flush()
    sock.close()


if __name__ == "__main__":
    main()

"""A minimal websocket client on a raw trio stream, for load generation and control.

Why not trio-websocket: its wsproto state machine costs ~20-30 µs of Python per frame, and the
clients must not be what limits a fan-out benchmark (the servers under test share the same two
cores). This client parses server frames itself (unmasked; fragmentation supported), answers
pings, answers and records close frames, and sends masked text frames. It does what a benchmark
client needs and nothing else: no extensions, no TLS.

``WsClient.run_reader(on_frame)`` reads until the connection ends and returns the close code
(1006 when the connection ended without a close frame).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import struct
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import trio

ABNORMAL = 1006
_OP_CONT, _OP_TEXT, _OP_BIN, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_RECEIVE = 1 << 16  # below malloc's mmap threshold: recv(n) allocates n bytes

FrameHandler = Callable[[bytes, int], None]
"""``on_frame(payload, received_ns)`` for each complete text or binary message."""


class HandshakeError(Exception):
    pass


def _mask(payload: bytes) -> tuple[bytes, bytes]:
    key = os.urandom(4)
    if not payload:
        return key, payload
    # XOR as one big integer: C speed, without a per-byte Python loop.
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return key, masked.to_bytes(len(payload), "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    key, masked = _mask(payload)
    return header + key + masked


class FrameReader:
    """Parses the frames a server sends; collects the control frames to send back.

    ``feed(data, now)`` consumes what arrived and calls ``on_frame`` for each complete data
    message; it returns True once a close frame has been received (``close_code`` says which).
    ``take_replies()`` returns the pong / close-reply bytes to send, if any.
    """

    __slots__ = ("_buffer", "_fragments", "_on_frame", "_replies", "close_code", "closed_at_ns")

    def __init__(self, on_frame: FrameHandler, leftover: bytes = b"") -> None:
        self._buffer = bytearray(leftover)
        self._on_frame = on_frame
        self._fragments: list[bytes] = []
        self._replies: list[bytes] = []
        self.close_code: int | None = None
        self.closed_at_ns: int | None = None

    def take_replies(self) -> bytes:
        replies, self._replies = b"".join(self._replies), []
        return replies

    def feed(self, data: bytes | memoryview, now: int) -> bool:
        buffer = self._buffer
        buffer += data
        position, size = 0, len(buffer)
        closed = False
        while size - position >= 2:
            b0, b1 = buffer[position], buffer[position + 1]
            length, header = b1 & 0x7F, 2
            if length == 126:
                if size - position < 4:
                    break
                length, header = int.from_bytes(buffer[position + 2 : position + 4], "big"), 4
            elif length == 127:
                if size - position < 10:
                    break
                length, header = int.from_bytes(buffer[position + 2 : position + 10], "big"), 10
            mask = b""
            if b1 & 0x80:  # servers do not mask; tolerate it anyway
                if size - position < header + 4:
                    break
                mask = bytes(buffer[position + header : position + header + 4])
                header += 4
            end = position + header + length
            if end > size:
                break
            payload = bytes(buffer[position + header : end])
            if mask:
                payload = _unmask(mask, payload)
            position = end
            opcode = b0 & 0x0F
            if opcode in (_OP_TEXT, _OP_BIN):
                if b0 & 0x80:
                    self._on_frame(payload, now)
                else:
                    self._fragments = [payload]
            elif opcode == _OP_CONT:
                self._fragments.append(payload)
                if b0 & 0x80:
                    self._on_frame(b"".join(self._fragments), now)
                    self._fragments = []
            elif opcode == _OP_PING:
                self._replies.append(client_frame(_OP_PONG, payload))
            elif opcode == _OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_code, self.closed_at_ns = code, now
                self._replies.append(client_frame(_OP_CLOSE, struct.pack("!H", code)))
                closed = True
                break
        del buffer[:position]
        return closed


def handshake_request(url: str, headers: dict[str, str] | None) -> tuple[str, int, bytes]:
    """``(host, port, request bytes)`` of the opening handshake for ``url``."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode()


def handshake_response(url: str, response: bytes) -> bytes | None:
    """None while the response headers are incomplete; else the bytes after them.

    Raises HandshakeError unless the status is 101.
    """
    if b"\r\n\r\n" not in response:
        return None
    head, _, rest = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise HandshakeError(f"{url}: {status.decode(errors='replace')}")
    return rest


class WsClient:
    """One client connection on a trio stream. ``connect`` performs the opening handshake."""

    def __init__(self, stream: trio.SocketStream, leftover: bytes) -> None:
        self.stream = stream
        self._leftover = leftover
        self._send_lock = trio.Lock()
        self.close_code: int | None = None
        self.closed_at_ns: int | None = None

    @classmethod
    async def connect(
        cls, url: str, headers: dict[str, str] | None = None, timeout: float = 30
    ) -> WsClient:
        host, port, request = handshake_request(url, headers)
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            try:
                await stream.send_all(request)
                response = b""
                while (rest := handshake_response(url, response)) is None:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        raise HandshakeError(f"{url}: connection closed during the handshake")
                    response += chunk
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return cls(stream, rest)

    async def send_text(self, text: str) -> None:
        await self._send(client_frame(_OP_TEXT, text.encode()))

    async def _send(self, frame: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(frame)

    async def close(self, code: int = 1000, timeout: float = 5) -> None:
        """Send a close frame, wait (bounded) for the server to close, then drop the socket."""
        with trio.move_on_after(timeout):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._send(client_frame(_OP_CLOSE, struct.pack("!H", code)))
        await trio.aclose_forcefully(self.stream)

    async def run_reader(self, on_frame: FrameHandler) -> int:
        """Read frames until the connection ends; return the close code received (or 1006)."""
        reader = FrameReader(on_frame)
        data = self._leftover
        try:
            while True:
                closing = bool(data) and reader.feed(data, time.monotonic_ns())
                if replies := reader.take_replies():
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._send(replies)
                if closing:
                    # Close frame answered: the server now drops the TCP connection.
                    with trio.move_on_after(2):
                        while await self.stream.receive_some(_RECEIVE):
                            pass
                    break
                try:
                    data = await self.stream.receive_some(_RECEIVE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.close_code = reader.close_code or ABNORMAL
            self.closed_at_ns = reader.closed_at_ns or time.monotonic_ns()
            await trio.aclose_forcefully(self.stream)
        return self.close_code


def _unmask(mask: bytes, payload: bytes) -> bytes:
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(len(payload), "big")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")


class RpcClient:
    """JSON-RPC 2.0 over one ``WsClient``; change messages on the same connection are counted
    and otherwise ignored. Use inside ``async with RpcClient.open(...)``."""

    def __init__(self, ws: WsClient) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.changes = 0
        self.closed = trio.Event()

    @classmethod
    async def connect(cls, url: str, key: str) -> RpcClient:
        return cls(await WsClient.connect(url, bearer(key)))

    async def run(self) -> None:
        try:
            await self.ws.run_reader(self._on_frame)
        finally:
            self.closed.set()
            for event, box in self._waiting.values():
                box.append({"error": {"code": ABNORMAL, "message": "connection closed"}})
                event.set()

    def _on_frame(self, payload: bytes, now: int) -> None:
        if b'"jsonrpc"' not in payload:
            self.changes += payload.count(b'"interface"')
            return
        decoded = json.loads(payload)
        for response in decoded if isinstance(decoded, list) else [decoded]:
            if "interface" in response:
                self.changes += 1
                continue
            waiting = self._waiting.pop(response.get("id"), None)
            if waiting is not None:
                waiting[1].append(response)
                waiting[0].set()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call ``method``; return its result or raise RpcError."""
        response = await self.call_raw(method, params)
        if "error" in response:
            raise RpcError(response["error"])
        return response.get("result")

    async def call_raw(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        event, box = trio.Event(), list[dict[str, Any]]()
        self._waiting[request_id] = (event, box)
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        try:
            await self.ws.send_text(json.dumps(request, separators=(",", ":")))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._waiting.pop(request_id, None)
            return {"error": {"code": ABNORMAL, "message": "connection closed"}}
        if self.closed.is_set() and not box:
            return {"error": {"code": ABNORMAL, "message": "connection closed"}}
        await event.wait()
        return box[0]

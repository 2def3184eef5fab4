"""The write side of a websocket connection: frames go to the socket without waiting their turn.

trio-websocket sends a frame by encoding it, taking a lock and ``await stream.send_all``: two
trips through the scheduler per frame, ~45 µs of server CPU per delivered message here, for a
write that almost always fits the socket at once. Fanning one message out to 1,000 clients that
way costs 45 ms. vtrio therefore owns the socket's write side:

- a change message is framed once (server frames are not masked, so every client gets the same
  bytes) and written with one non-blocking ``write`` per client, from the dispatching task,
  without a task switch: ~5 µs per delivery;
- what does not fit waits in this stream's pending bytes, which are flushed, in order, before
  anything else is written; trio-websocket's own frames (handshake, pongs, close) go through
  :meth:`OutboundStream.send_all` into the same order.

trio-websocket still reads, parses and answers the protocol: the stream is handed to it with
its public ``wrap_server_stream``.
"""

from __future__ import annotations

import os
import struct
from collections import deque

import trio

_TEXT = 0x81  # FIN + text opcode


def text_frame(payload: bytes) -> bytes:
    """A complete server-to-client text frame holding ``payload`` (RFC 6455, section 5.2)."""
    size = len(payload)
    if size < 126:
        header = bytes((_TEXT, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", _TEXT, 126, size)
    else:
        header = struct.pack("!BBQ", _TEXT, 127, size)
    return header + payload


class OutboundStream(trio.abc.Stream):
    """A socket stream whose writes go out at once when the socket has room.

    Bytes are written in the order :meth:`write_nowait` and :meth:`send_all` are called.
    Reading is the wrapped stream's own.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._fd = stream.socket.fileno()
        self._pending: deque[memoryview] = deque()
        self._flushing = trio.Lock()  # trio allows one task at a time to wait for writability
        self._closed = False

    def __repr__(self) -> str:
        try:
            host, port, *_ = self.stream.socket.getpeername()
        except OSError:
            return "<closed connection>"
        return f"{host}:{port}"

    @property
    def idle(self) -> bool:
        """Nothing is waiting to be written: a write now goes straight to the socket."""
        return not self._pending

    def write_nowait(self, data: bytes | memoryview) -> None:
        """Write ``data`` after whatever is pending; what the socket cannot take now is kept
        for :meth:`flush`. Never waits. Raises trio.BrokenResourceError if the peer is gone
        and trio.ClosedResourceError after :meth:`aclose`."""
        if self._closed:  # the descriptor may already belong to another connection
            raise trio.ClosedResourceError("the connection is closed")
        if not self._pending:
            sent = self._write(data)
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self._pending.append(memoryview(data))

    async def flush(self) -> None:
        """Wait until everything written so far has reached the socket.

        Cancellation: the bytes not yet written stay pending, in order.
        """
        async with self._flushing:
            while self._pending:
                await trio.lowlevel.wait_writable(self._fd)
                self._write_pending()

    def _write_pending(self) -> None:
        while self._pending:
            head = self._pending[0]
            sent = self._write(head)
            if sent < len(head):
                self._pending[0] = head[sent:]
                return
            self._pending.popleft()

    def _write(self, data: bytes | memoryview) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"the peer is gone: {exc.strerror}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.write_nowait(bytes(data))
        if self._pending:
            await self.flush()
        else:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        self._closed = True
        self._pending.clear()
        await self.stream.aclose()

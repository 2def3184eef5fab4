"""One websocket connection, from the end of its handshake to its close: :class:`Connection`.

A connection owns its socket, its protocol state (wsproto), its outbox, its heartbeat state and
the tasks serving its requests. One task reads; nothing else waits on its behalf except, while
its socket is full, one task that writes the backlog out. Writing never waits: a frame goes
straight to the socket when the socket has room, so fanning a change out to 1,000 clients is
1,000 non-blocking writes from the publishing task, without a task switch; what does not fit
waits, in order, and what waits is coalesced (several change messages, one frame).

Reading is bounded per turn (one ``receive_some`` of at most 64 KiB, then the scheduler runs
others), and a message larger than ``max_message_size`` bytes closes the connection with 1009
before it is held whole. A message sent in one frame and larger than that, or than
``max_parsed_size``, is not even decoded: its header says its size, and its payload is dropped
as it arrives (:class:`~vtrio.framework._wire.FrameSkipper`). A client whose messages keep
being refused (:meth:`Connection.charge_refused`) is read no faster than ``refused_rate``, so
that it cannot take the machine's cores from the others. Protocol violations close it with the
code RFC 6455 names (1002, or 1007 for a text frame that is not UTF-8).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from wsproto.connection import Connection as Protocol
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event, Message, Ping, Pong, TextMessage

from vtrio.framework._wire import CloseCode, FrameSkipper, batch_frame, text_frame

__all__ = ["Connection", "ConnectionLimits", "Delivery", "OnMessage", "OnOversized", "message_size"]

log = logging.getLogger(__name__)

BATCH_CAP = 500
"""The most change messages one coalesced frame holds."""
RECEIVE_CHUNK = 1 << 16
"""The most bytes read from a client in one turn of the scheduler."""
_DISCARDED = bytearray(1 << 20)
"""Where the bytes of skipped messages go, 1 MiB per turn: nowhere on Linux, where ``recv``
with ``MSG_TRUNC`` drops them from a TCP socket without copying them."""
_DROP_FLAGS = socket.MSG_TRUNC if sys.platform == "linux" else 0

OnMessage = Callable[["Connection", str | bytes], None]
"""``on_message(connection, message)``: called for every complete message a client sends.

It must not wait: work that takes time runs in a task of the connection's own
(:meth:`Connection.start_soon`), which ends with the connection."""

OnOversized = Callable[["Connection", int], None]
"""``on_oversized(connection, size)``: called, instead of ``on_message``, for a message larger
than ``max_parsed_size`` (and no larger than ``max_message_size``) sent in one frame, which
was dropped unread. It must not wait."""


@dataclass(frozen=True)
class ConnectionLimits:
    max_message_size: int = 1 << 20
    """The largest message a client may send, in bytes (1009 beyond)."""
    max_parsed_size: int | None = None
    """The largest message sent in one frame that is decoded, in bytes; a larger one goes to
    ``on_oversized`` unread (None: as ``max_message_size``)."""
    send_queue_size: int = 1000
    """Messages waiting for one client before it is closed as too slow (4002)."""
    close_timeout: float = 20.0
    """How long a closing connection waits for the client's close frame (a slow client may
    first have a backlog to read): the heartbeat interval, which bounds an idle peer too."""
    refused_rate: float = 64 * (1 << 20)
    """Bytes a second of refused messages (see :meth:`Connection.charge_refused`) after which
    the server reads the client no faster."""
    refused_burst: int = 4 << 20
    """Bytes of refused messages a client may send at once before :attr:`refused_rate`
    applies."""


class Delivery:
    """Change messages for one user: encoded once, framed once, for all that user's clients."""

    __slots__ = ("_frames", "payloads", "position")

    def __init__(self, payloads: list[bytes], position: str) -> None:
        self.payloads = payloads
        self.position = position  # of the last message
        self._frames: dict[bool, list[bytes]] = {}

    def frames(self, batch: bool) -> list[bytes]:
        frames = self._frames.get(batch)
        if frames is None:
            if batch and len(self.payloads) > 1:
                frames = [batch_frame(self.payloads[i : i + BATCH_CAP])
                          for i in range(0, len(self.payloads), BATCH_CAP)]  # fmt: skip
            else:
                frames = [text_frame(payload) for payload in self.payloads]
            self._frames[batch] = frames
        return frames


_REPLY = None  # the position of an outbox entry that is a JSON-RPC response


class Connection:
    """One open websocket connection.

    Made by the listener once the handshake is done; :meth:`serve` runs it to its end. The hub
    and the JSON-RPC endpoint use the rest: :meth:`deliver` and :meth:`reply` to send,
    :meth:`close` to close, :meth:`heartbeat` to ping, :meth:`start_soon` to run a request.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        protocol: Protocol,
        identity: Any,
        *,
        batch: bool,
        limits: ConnectionLimits,
        on_message: OnMessage,
        on_oversized: OnOversized | None = None,
    ) -> None:
        self.identity = identity
        self.batch = batch
        self.position = ""
        """The position of the last change message handed to the socket: resume from here."""
        self.close_code: int | None = None
        self.requests_in_flight = 0
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._protocol = protocol
        self._limits = limits
        self._on_message = on_message
        self._on_oversized = on_oversized
        parsed = limits.max_message_size
        if on_oversized is not None and limits.max_parsed_size is not None:
            parsed = min(parsed, limits.max_parsed_size)
        self._skipper = FrameSkipper(larger_than=parsed)
        self._unsent: deque[memoryview] = deque()  # whole frames; the first maybe part-written
        self._outbox: deque[tuple[bytes, str | None]] = deque()  # messages not yet framed
        self._flushing = False
        self._awaiting_pong = False
        self._parts: list[Any] = []  # the message being received
        self._received = 0  # its size in bytes so far
        self._failed = False  # the client broke the protocol: nothing more is parsed
        self._reading = trio.CancelScope()
        self._tasks: trio.Nursery | None = None
        self._held: list[str] | None = []  # replies held while catching up; None once live
        self._sent = trio.lowlevel.ParkingLot()  # woken when nothing waits to be written
        self._peer = _peer_name(stream)
        self._refused = _Allowance(limits.refused_rate, limits.refused_burst)
        self._paced = False  # reading has been slowed for refused messages (logged once)

    def __repr__(self) -> str:
        return f"<Connection {self._peer} {getattr(self.identity, 'name', self.identity)!r}>"

    @property
    def waiting(self) -> int:
        """Messages in the outbox, waiting for the socket."""
        return len(self._outbox)

    @property
    def closing(self) -> bool:
        """The close has begun: nothing more is sent but what was already framed."""
        return self.close_code is not None

    # ---- sending: never waits ---------------------------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        """Send change messages: at once if the socket has room, else after what waits.

        A client whose outbox would exceed ``send_queue_size`` messages is closed with 4002;
        the close reason names the position to resume from.
        """
        if self.closing:
            return
        if not self._unsent and not self._outbox:
            for frame in delivery.frames(self.batch):
                self._send_frame(frame)
            self.position = delivery.position
            return
        if len(self._outbox) + len(delivery.payloads) > self._limits.send_queue_size:
            self._outbox.clear()  # bounded memory: the client resumes from self.position
            self.close(CloseCode.TOO_SLOW, f"too slow: reconnect with ?since={self.position}")
            return
        self._outbox.extend((payload, delivery.position) for payload in delivery.payloads)
        self._flush_soon()

    def reply(self, text: str) -> None:
        """Send the answer to a request, in a frame of its own, after what waits already.

        While the connection catches up (see :meth:`caught_up`), answers are held back, so
        that none overtakes a change it caused."""
        if self.closing:
            return
        if self._held is not None:
            self._held.append(text)
        elif not self._unsent and not self._outbox:
            self._send_frame(text_frame(text.encode()))
        else:
            self._outbox.append((text.encode(), _REPLY))
            self._flush_soon()

    def caught_up(self) -> None:
        """The connection has every change up to the live ones: send what answers were held."""
        held, self._held = self._held or [], None
        for text in held:
            self.reply(text)

    async def wait_sent(self) -> None:
        """Wait until everything sent so far has reached the socket (or the connection is
        closing)."""
        while (self._unsent or self._outbox) and not self.closing:
            await self._sent.park()

    def close(self, code: int, reason: str = "") -> None:
        """Start closing with ``code``: the close frame goes out after any frame already
        begun, queued messages are dropped, and :meth:`serve` waits up to ``close_timeout``
        for the client's own close frame. The first close wins."""
        if self.closing:
            return
        self.close_code = code
        self._outbox.clear()
        self._sent.unpark_all()
        if self._protocol.state is ConnectionState.OPEN:
            self._send_frame(self._protocol.send(CloseConnection(code, reason)))
        self._reading.deadline = min(
            self._reading.deadline, trio.current_time() + self._limits.close_timeout
        )

    def heartbeat(self) -> None:
        """Ping the client; close it with 4001 if it has not answered the previous ping.

        Called by the hub's one heartbeat task every interval, for every connection.
        """
        if self.closing:
            return
        if self._awaiting_pong:
            self.close(CloseCode.HEARTBEAT_TIMEOUT, "no pong within the heartbeat interval")
            self._reading.cancel()  # a peer that misses its pongs will not send a close frame
            return
        self._awaiting_pong = True
        self._send_frame(self._protocol.send(Ping()))

    def charge_refused(self, size: int) -> None:
        """Count ``size`` bytes the client sent that the server refused without serving them
        (too large, not JSON): beyond ``refused_burst`` bytes, it is read no faster than
        ``refused_rate`` bytes a second, so that sending what is refused takes a bounded share
        of the server's CPU (and of the machine's, the client's own sending included)."""
        self._refused.spend(size, trio.current_time())

    def start_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in a task of this connection's, cancelled when it ends."""
        assert self._tasks is not None, "the connection is not being served"
        self._tasks.start_soon(fn, *args)

    def _send_frame(self, frame: bytes) -> None:
        if self._unsent:
            self._unsent.append(memoryview(frame))
            return
        sent = self._write(frame)
        if sent < len(frame):
            self._unsent.append(memoryview(frame)[sent:])
            self._flush_soon()

    def _write(self, data: bytes | memoryview) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # the peer is gone; the reader sees it too and ends the connection
            self._lost()
            return len(data)

    def _lost(self) -> None:
        self._unsent.clear()
        self._outbox.clear()
        if not self.closing:
            self.close_code = 1006
        self._reading.cancel()
        self._sent.unpark_all()

    def _flush_soon(self) -> None:
        if not self._flushing and self._tasks is not None:
            self._flushing = True
            self._tasks.start_soon(self._flush)

    async def _flush(self) -> None:
        """Write what waits as the socket drains, coalescing queued change messages."""
        try:
            while self._unsent or self._outbox:
                if not self._unsent:
                    self._send_frame(self._next_frame())
                    continue
                await trio.lowlevel.wait_writable(self._fd)
                self._write_unsent()
        finally:
            self._flushing = False
            self._sent.unpark_all()

    def _write_unsent(self) -> None:
        while self._unsent:
            head = self._unsent[0]
            sent = self._write(head)
            if not self._unsent:
                return  # the peer is gone: what waited was dropped
            if sent < len(head):
                self._unsent[0] = head[sent:]
                return
            self._unsent.popleft()

    def _next_frame(self) -> bytes:
        payload, position = self._outbox.popleft()
        if position is _REPLY:
            return text_frame(payload)
        payloads = [payload]
        while (
            self.batch
            and self._outbox
            and len(payloads) < BATCH_CAP
            and self._outbox[0][1] is not _REPLY
        ):
            payload, position = self._outbox.popleft()
            payloads.append(payload)
        assert position is not None
        self.position = position
        return batch_frame(payloads) if len(payloads) > 1 else text_frame(payload)

    # ---- serving: the one reading task ----------------------------------------------------

    async def serve(
        self,
        first: Callable[[], Awaitable[None]] | None = None,
        *,
        farewell: Callable[[], tuple[int, str]] = lambda: (CloseCode.GOING_AWAY, ""),
    ) -> None:
        """Read and answer the client until the connection is closed; then close the socket.
        ``first()``, if given, runs meanwhile in a task of the connection's (catching up);
        ``farewell()`` says how to close a connection cancelled before anyone closed it.

        Resource handling: returns only once every task of the connection has ended and the
        socket is closed. Cancelled (the server's grace period is over), it closes at once:
        the requests' tasks end first (and answer, if they can), then the close frame is sent
        without waiting for the client's.

        Error handling: nothing escapes. A failure of vtrio's while serving is logged and the
        client is closed with 1011; a client that breaks the protocol is closed with the code
        RFC 6455 names; one that vanishes is simply gone (1006).
        """
        try:
            async with trio.open_nursery() as self._tasks:
                if first is not None:
                    self._tasks.start_soon(first)
                with self._reading:
                    await self._read_until_closed()
                self._tasks.cancel_scope.cancel()
        except Exception:
            log.exception("serving %r failed", self)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self.close(*farewell())  # if nobody closed it first
            self._write_unsent()
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _read_until_closed(self) -> None:
        while True:
            await self._pace()
            if self._skipper.to_drop:
                if await self._drop_skipped():
                    continue
                data = b""
            else:
                data = await self._receive_some()
            if not data:  # the peer is gone, close handshake or not
                if not self.closing:
                    self.close_code = 1006
                return
            for part in self._skipper.feed(data):
                if self._failed:
                    break  # drain what the client still sends, unread, until it closes
                if isinstance(part, int):
                    self._skipped(part)
                    continue
                self._protocol.receive_data(part)
                for event in self._protocol.events():
                    if self._handle(event):
                        return

    async def _pace(self) -> None:
        """Wait, before reading on, until the client's refused bytes are within its
        allowance again."""
        delay = self._refused.overdrawn(trio.current_time())
        if delay > 0:
            if not self._paced:
                self._paced = True
                log.warning("%r sends messages that are refused faster than %d bytes/s: "
                            "reading it no faster", self, self._limits.refused_rate)  # fmt: skip
            await trio.sleep(delay)

    async def _receive_some(self) -> bytes:
        try:
            return await self._stream.receive_some(RECEIVE_CHUNK)
        except trio.BrokenResourceError:
            return b""

    async def _drop_skipped(self) -> bool:
        """Drop what the client sends of a skipped message, in the kernel (on Linux no byte
        is copied); False if the peer is gone."""
        size = min(self._skipper.to_drop, len(_DISCARDED))
        try:
            dropped = await self._stream.socket.recv_into(_DISCARDED, size, _DROP_FLAGS)
        except OSError:
            return False
        self._skipper.dropped(dropped)
        return dropped > 0

    def _handle(self, event: Event) -> bool:
        """Act on one protocol event; True once the connection is done."""
        if isinstance(event, Message):
            self._receive_part(event)
        elif isinstance(event, Ping):
            if self._protocol.state is ConnectionState.OPEN:
                self._send_frame(self._protocol.send(event.response()))
        elif isinstance(event, Pong):
            self._awaiting_pong = False
        elif isinstance(event, CloseConnection):
            return self._received_close(event)
        return False

    def _received_close(self, event: CloseConnection) -> bool:
        state = self._protocol.state
        if state is ConnectionState.OPEN:
            # wsproto's word for a frame that broke the protocol: fail the connection with
            # the code it names, then read on (unparsed) until the client closes.
            self.close(event.code, event.reason or "")
            self._failed = True
            return False
        if state is ConnectionState.REMOTE_CLOSING:  # the client closes: answer, and done
            if not self.closing:
                self.close_code = event.code
            self._send_frame(self._protocol.send(event.response()))
        return True  # CLOSED: the client answered our close

    def _skipped(self, size: int) -> None:
        """A message sent in one frame was too large to decode: refuse it."""
        if self.closing:
            return
        if size > self._limits.max_message_size:
            self._close_too_big()
        elif self._on_oversized is not None:
            self._on_oversized(self, size)

    def _receive_part(self, event: Message[Any]) -> None:
        if self.closing:
            return
        data = event.data
        self._received += message_size(data)
        if self._received > self._limits.max_message_size:
            self._close_too_big()
            self._parts.clear()
            return
        self._parts.append(data)
        if event.message_finished:
            message = ("" if isinstance(event, TextMessage) else b"").join(self._parts)
            self._parts.clear()
            self._received = 0
            self._on_message(self, message)

    def _close_too_big(self) -> None:
        limit = self._limits.max_message_size
        self.close(CloseCode.MESSAGE_TOO_BIG, f"messages are limited to {limit} bytes")


class _Allowance:
    """A token bucket of bytes: up to ``burst`` at once, refilled at ``rate`` a second."""

    __slots__ = ("_at", "_burst", "_rate", "_spent")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        self._spent = 0.0  # bytes, as of self._at
        self._at = 0.0

    def spend(self, size: int, now: float) -> None:
        self._spent = self._left_over(now) + size
        self._at = now

    def overdrawn(self, now: float) -> float:
        """Seconds until what was spent is within the burst again (0: it is)."""
        if not self._spent:
            return 0.0
        return max(0.0, self._left_over(now) - self._burst) / self._rate

    def _left_over(self, now: float) -> float:
        return max(0.0, self._spent - (now - self._at) * self._rate)


def message_size(data: str | bytes | bytearray) -> int:
    """Bytes of a message, or of a part of one, as the client sent them (UTF-8 for text)."""
    if isinstance(data, str) and not data.isascii():
        return len(data.encode())
    return len(data)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"

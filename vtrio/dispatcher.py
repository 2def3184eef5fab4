"""The dispatcher: keeps every websocket client semi-synced with MongoDB.

Every acknowledged write becomes one change message, serialised once::

    {"interface": "samples", "operation": "insert" | "update" | "delete", "data": ...}

and offered to every connected client that may see it. Offering never waits: the message's frame
goes straight to the client's socket when it has room (see :mod:`vtrio.outbound`), and into the
client's bounded outbox when it has not, for the client's sender task to write as the socket
drains; so a slow or broken client can hold up neither the writer nor the other clients. When
the outbox holds several messages, the sender sends them as one frame holding a JSON array (in
order, up to :data:`BATCH_CAP`); a lone message goes out at once as a plain object. A client
that asked for ``?batch=0`` gets one message per frame.

Close codes a client can see:

====  ===================================================================================
1001  the server is shutting down
1002  the client broke the websocket protocol (a garbage frame)
1009  the client sent a frame larger than ``--max-message-size``
1011  vtrio failed while serving the connection (logged on the server)
4000  no API key, a wrong one, or one that has since been revoked
4001  no pong within the heartbeat interval: the peer is gone
4002  the client read too slowly and its outbox (``--send-queue-size``) overflowed;
      the queued messages are dropped, the client should reconnect and reload
====  ===================================================================================
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from enum import IntEnum
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from vtrio.encoding import dumps
from vtrio.outbound import OutboundStream, text_frame

log = logging.getLogger(__name__)

OPERATIONS = frozenset({"insert", "update", "delete"})
SHUTDOWN_REASON = "server shutting down"
BATCH_CAP = 500
"""The most messages one coalesced frame holds."""


class CloseCode(IntEnum):
    GOING_AWAY = 1001
    INTERNAL_ERROR = 1011
    UNAUTHENTICATED = 4000
    HEARTBEAT_TIMEOUT = 4001
    TOO_SLOW = 4002


Rule = Callable[[Any, Any], bool]
"""``rule(identity, subject)``: may this connection's user receive a message about ``subject``?
An interface without a rule goes to every connection."""

KeyCheck = Callable[[set[str]], Awaitable[set[str]]]
"""``await check(key_ids)``: which of these API keys are still valid."""


class Message:
    """One outgoing message: its JSON, and its frame, both made once for every client."""

    __slots__ = ("frame", "payload", "reply")

    def __init__(self, text: str, *, reply: bool = False) -> None:
        self.payload = text.encode()
        self.frame = text_frame(self.payload)
        self.reply = reply  # a JSON-RPC response: a frame of its own, never coalesced


class Client:
    """One websocket connection as the dispatcher sees it: its user, its outbox, its sender.

    A message offered to a client whose socket has room is written at once; otherwise it waits
    in the outbox, and the client's sender task writes the outbox out, coalesced, as the
    socket drains.
    """

    def __init__(
        self,
        websocket: WebSocketConnection,
        stream: OutboundStream,
        identity: Any,
        *,
        batch: bool,
        queue_size: int,
    ) -> None:
        self.websocket = websocket
        self.stream = stream
        self.identity = identity
        self.batch = batch
        self._queue_size = queue_size
        self._outbox: deque[Message] = deque()
        self._wakeup = trio.lowlevel.ParkingLot()
        self._closing = trio.Event()
        self.close_code: int | None = None
        self.close_reason = ""

    def __repr__(self) -> str:
        return f"<Client {self.stream!r} user={getattr(self.identity, 'user_id', '?')}>"

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def offer(self, message: Message) -> None:
        """Send ``message`` to this client without waiting; close it if it cannot keep up."""
        if self.closing or self.websocket.closed is not None:
            return
        if not self._outbox and self.stream.idle:
            try:
                self.stream.write_nowait(message.frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.close_soon(CloseCode.GOING_AWAY, "connection lost")
                return
            if not self.stream.idle:
                self._wakeup.unpark()  # the rest of the frame waits for the socket
            return
        if len(self._outbox) >= self._queue_size:
            self._outbox.clear()  # bounded memory: a client that fell behind reloads anyway
            self.close_soon(CloseCode.TOO_SLOW, "outbox overflowed: read faster or reconnect")
            return
        self._outbox.append(message)
        self._wakeup.unpark()

    def reply(self, text: str) -> None:
        """Send the answer to one of this client's requests, in a frame of its own."""
        self.offer(Message(text, reply=True))

    def close_soon(self, code: int, reason: str = "") -> None:
        """Ask for this connection to be closed with ``code``; the first request wins."""
        if not self.closing:
            self.close_code, self.close_reason = code, reason
            self._closing.set()
            self._wakeup.unpark()

    async def send_until_closed(self) -> None:
        """Write out what the socket could not take at once, coalescing the outbox, until the
        connection is closing."""
        try:
            # Once trio-websocket has answered a close from the peer, nothing more may follow.
            while not self.closing and self.websocket.closed is None:
                if not self.stream.idle:
                    await self.stream.flush()
                elif self._outbox:
                    self.stream.write_nowait(self._next_frame())
                else:
                    await self._wakeup.park()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_soon(CloseCode.GOING_AWAY, "connection lost")

    def _next_frame(self) -> bytes:
        outbox = self._outbox
        first = outbox.popleft()
        if not self.batch or first.reply or not outbox or outbox[0].reply:
            return first.frame
        payloads = [first.payload]
        while outbox and len(payloads) < BATCH_CAP and not outbox[0].reply:
            payloads.append(outbox.popleft().payload)
        return text_frame(b"[" + b",".join(payloads) + b"]")

    async def wait_closing(self) -> None:
        await self._closing.wait()


class Dispatcher:
    """Knows every open connection; turns database changes into messages for them.

    :meth:`dispatch` may be called before :meth:`running` starts or after it ends: with no
    connection, a message simply reaches no one.
    """

    def __init__(
        self,
        *,
        rules: Mapping[str, Rule] | None = None,
        close_timeout: float = 10.0,
    ) -> None:
        self._rules = dict(rules or {})
        self._clients: set[Client] = set()
        self._close_timeout = close_timeout
        self._client_left = trio.lowlevel.ParkingLot()
        self._closing_with: tuple[int, str] | None = None
        self._admitting = 0

    @property
    def clients(self) -> frozenset[Client]:
        return frozenset(self._clients)

    @property
    def connection_count(self) -> int:
        """Open connections, those still in their handshake included."""
        return len(self._clients) + self._admitting

    @property
    def closing(self) -> bool:
        """Every connection is being closed; new ones are turned away."""
        return self._closing_with is not None

    @contextmanager
    def admitting(self) -> Iterator[None]:
        """Count a connection that is still in its handshake."""
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1

    def dispatch(self, interface: str, operation: str, data: Any, subject: Any = None) -> None:
        """Send a change message to every connection that may see it. Never waits.

        The interface's rule judges ``subject`` (what the message is about: for a delete, the
        removed documents its list of ids stands for), or ``data`` when no subject is given.

        Raises ValueError for an unknown operation or an empty interface, and TypeError if
        ``data`` is of the wrong kind or cannot be sent as JSON; nothing is sent then.
        """
        message = Message(self.encode(interface, operation, data))
        rule = self._rules.get(interface)
        about = data if subject is None else subject
        for client in self._clients:
            try:
                if rule is None or rule(client.identity, about):
                    client.offer(message)
            except Exception:  # one client's bad luck is not everyone's
                log.exception("dispatching to %r failed", client)

    @staticmethod
    def encode(interface: str, operation: str, data: Any) -> str:
        if not isinstance(interface, str) or not interface:
            raise ValueError(f"interface must be a collection name, not {interface!r}")
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {sorted(OPERATIONS)}, not {operation!r}")
        expected = list if operation == "delete" else dict
        if not isinstance(data, expected):
            raise TypeError(f"{operation} data must be a {expected.__name__}, not {data!r}")
        return dumps({"interface": interface, "operation": operation, "data": data})

    @asynccontextmanager
    async def running(
        self,
        *,
        grace_period: float,
        check_keys: KeyCheck | None = None,
        key_check_interval: float = 2.0,
    ) -> AsyncIterator[trio.Nursery]:
        """Own the connections: yield the nursery every connection's tasks must run in.

        On exit, every open connection is closed with 1001 concurrently, for at most
        ``grace_period`` seconds; whatever is left then is cancelled (its peer sees 1006).
        If ``check_keys`` is given, connections whose API key is no longer valid are closed
        with 4000 within ``key_check_interval`` seconds.
        """
        async with trio.open_nursery() as nursery:
            if check_keys is not None:
                nursery.start_soon(self._close_revoked, check_keys, key_check_interval)
            try:
                yield nursery
            finally:
                with trio.move_on_after(grace_period):
                    await self.close_all(CloseCode.GOING_AWAY, SHUTDOWN_REASON)
                nursery.cancel_scope.cancel()

    def close_all_soon(self, code: int, reason: str = "") -> None:
        """Start closing every connection with ``code``, and any that opens from now on."""
        self._closing_with = (code, reason)
        for client in self._clients:
            client.close_soon(code, reason)

    async def close_all(self, code: int, reason: str = "") -> None:
        """Close every connection with ``code`` and wait until all are gone."""
        self.close_all_soon(code, reason)
        while self._clients:
            await self._client_left.park()

    async def serve(
        self,
        client: Client,
        on_message: Callable[[Client, str | bytes, trio.Nursery], Awaitable[None]],
        *,
        heartbeat_interval: float,
    ) -> None:
        """Serve ``client`` until it closes, or is closed: send, receive, heartbeat.

        ``on_message`` is awaited for every message the client sends, in the reader task; long
        work belongs in a task it starts in the nursery it is given, which is the connection's
        own (cancelled when the connection ends). Returns once the connection is closed;
        closing is bounded by the close timeout, after which the socket is dropped.
        """
        self._clients.add(client)
        if self._closing_with is not None:
            client.close_soon(*self._closing_with)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_until_closed)
                nursery.start_soon(_heartbeat, client, heartbeat_interval)
                nursery.start_soon(_receive_until_closed, client, on_message, nursery)
                await client.wait_closing()
                # A peer that missed its pongs is gone: no close handshake to wait for.
                dead = client.close_code == CloseCode.HEARTBEAT_TIMEOUT
                with trio.move_on_after(0 if dead else self._close_timeout):
                    await client.websocket.aclose(client.close_code or 1000, client.close_reason)
                nursery.cancel_scope.cancel()
        finally:
            self._clients.discard(client)
            self._client_left.unpark_all()

    async def _close_revoked(self, check_keys: KeyCheck, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            clients = list(self._clients)
            key_ids = {client.identity.key_id for client in clients}
            if not key_ids:
                continue
            try:
                valid = await check_keys(key_ids)
            except Exception:
                log.exception("could not check API keys; will try again")
                continue
            for client in clients:
                if client.identity.key_id not in valid:
                    client.close_soon(CloseCode.UNAUTHENTICATED, "API key revoked")


async def _receive_until_closed(
    client: Client,
    on_message: Callable[[Client, str | bytes, trio.Nursery], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    # Reading never stops while the connection is open: trio-websocket processes pings and close
    # frames only while its one-message receive queue has room.
    try:
        while True:
            message = await client.websocket.get_message()
            await on_message(client, message, nursery)
    except ConnectionClosed as closed:
        reason = closed.reason
        client.close_soon(reason.code if reason else 1006, "peer closed")


async def _heartbeat(client: Client, interval: float) -> None:
    try:
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval):
                await client.websocket.ping()
                continue
            client.close_soon(CloseCode.HEARTBEAT_TIMEOUT, f"no pong within {interval} s")
            return
    except ConnectionClosed:
        client.close_soon(CloseCode.GOING_AWAY)

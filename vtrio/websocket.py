"""The ``/ws`` endpoint: handshakes, authentication and one error boundary per connection.

Served with trio-websocket. Every connection's tasks run in the dispatcher's nursery
(``handler_nursery``), so the dispatcher owns them and closes them; this service owns only the
listening socket. Stopping it stops accepting new connections and nothing else.

A handshake is rejected with 404 for any path but ``/ws`` and with 503 beyond
``--max-connections``. Then the client must present an API key, as ``Authorization: Bearer KEY``
or, for browsers, as the ``token`` query parameter; without a valid one the connection is closed
with 4000. ``?batch=0`` asks for one change message per frame.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from socket import SO_SNDBUF, SOL_SOCKET
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import WebSocketRequest, wrap_server_stream

from vtrio.dispatcher import Client, CloseCode, Dispatcher
from vtrio.outbound import OutboundStream

log = logging.getLogger(__name__)

PATH = "/ws"

Authenticate = Callable[[str | None], Awaitable[object | None]]
OnMessage = Callable[[Client, str | bytes, trio.Nursery], Awaitable[None]]


async def ignore_message(client: Client, message: str | bytes, nursery: trio.Nursery) -> None:
    log.debug("%r sent a message and nothing handles messages: ignored", client)


@dataclass(frozen=True)
class WebsocketLimits:
    max_connections: int = 10_000
    max_message_size: int = 1 << 20
    send_queue_size: int = 1000
    heartbeat_interval: float = 20.0
    send_buffer_size: int = 0
    handshake_timeout: float = 10.0


@dataclass
class WebsocketServer:
    """The running ``/ws`` listener."""

    url: str
    _scope: trio.CancelScope

    def stop_accepting(self) -> None:
        """Close the listening socket now (open connections are the dispatcher's)."""
        self._scope.cancel()


@asynccontextmanager
async def serve_ws(
    *,
    host: str,
    port: int,
    dispatcher: Dispatcher,
    connections: trio.Nursery,
    authenticate: Authenticate,
    on_message: OnMessage = ignore_message,
    limits: WebsocketLimits = WebsocketLimits(),
) -> AsyncIterator[WebsocketServer]:
    """Accept websocket connections on ``host:port`` for the block; yield the running server.

    Connections run in ``connections`` (the dispatcher's nursery) and outlive this block;
    leaving it, or cancelling it, only closes the listening socket.
    """
    endpoint = _Endpoint(dispatcher, authenticate, on_message, limits)
    listeners = await trio.open_tcp_listeners(port, host=host)
    for listener in listeners:
        if limits.send_buffer_size:
            # Accepted sockets inherit it: kernel memory per connection stays bounded too.
            listener.socket.setsockopt(SOL_SOCKET, SO_SNDBUF, limits.send_buffer_size)
    bound_port = listeners[0].socket.getsockname()[1]
    # A scope of the listener's own: stopping it must not cancel the caller's block, which the
    # nursery's scope also covers.
    accepting = trio.CancelScope()

    async def accept(task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
        with accepting:
            serve = partial(trio.serve_listeners, handler_nursery=connections)
            await serve(endpoint.connection, listeners, task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(accept)
        try:
            yield WebsocketServer(f"ws://{host}:{bound_port}{PATH}", accepting)
        finally:
            accepting.cancel()


class _Endpoint:
    def __init__(
        self,
        dispatcher: Dispatcher,
        authenticate: Authenticate,
        on_message: OnMessage,
        limits: WebsocketLimits,
    ) -> None:
        self._dispatcher = dispatcher
        self._authenticate = authenticate
        self._on_message = on_message
        self._limits = limits

    async def connection(self, socket_stream: trio.SocketStream) -> None:
        """One TCP connection, start to end, in the dispatcher's nursery.

        Nothing raised here may escape: it would end the dispatcher's nursery, and with it
        every other connection. Whatever happens, the socket is closed on the way out.
        """
        stream = OutboundStream(socket_stream)
        client: Client | None = None
        try:
            async with trio.open_nursery() as nursery:  # trio-websocket's reader runs here
                with (
                    self._dispatcher.admitting(),
                    trio.move_on_after(self._limits.handshake_timeout),
                ):
                    request = await wrap_server_stream(
                        nursery, stream, max_message_size=self._limits.max_message_size
                    )
                    client = await self._admit(request, stream)
                # No checkpoint between the handshake's end and the client's registration:
                # a write acknowledged after the client saw its connection open reaches it.
                if client is not None:
                    await self._dispatcher.serve(
                        client, self._on_message, heartbeat_interval=self._limits.heartbeat_interval
                    )
                nursery.cancel_scope.cancel()
        except* Exception:  # also when it comes in a group with a Cancelled (at shutdown)
            log.exception("connection from %r failed", stream)
            if client is not None:
                with trio.move_on_after(1):
                    await client.websocket.aclose(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _admit(self, request: WebSocketRequest, stream: OutboundStream) -> Client | None:
        """Finish the handshake: the client to serve, or None if it was turned away."""
        target = urlsplit(request.path)
        if target.path != PATH:
            await request.reject(404, body=b"no such endpoint: connect to /ws\n")
            return None
        # This connection is one of those counted, hence ">".
        if self._dispatcher.connection_count > self._limits.max_connections:
            await request.reject(503, body=b"too many connections: try again later\n")
            return None
        query = parse_qs(target.query)
        identity = await self._authenticate(_presented_key(request, query))
        if self._dispatcher.closing:  # the server is stopping
            await request.reject(503, body=b"the server is shutting down\n")
            return None
        websocket = await request.accept()
        if identity is None:
            await websocket.aclose(CloseCode.UNAUTHENTICATED, "a valid API key is required")
            return None
        return Client(
            websocket,
            stream,
            identity,
            batch=query.get("batch") != ["0"],
            queue_size=self._limits.send_queue_size,
        )


def _presented_key(request: WebSocketRequest, query: dict[str, list[str]]) -> str | None:
    for name, value in request.headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip()
    tokens = query.get("token")
    return tokens[-1] if tokens else None

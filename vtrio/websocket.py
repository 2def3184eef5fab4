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
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from socket import SO_SNDBUF, SOL_SOCKET
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, WebSocketServer

from vtrio.dispatcher import Client, CloseCode, Dispatcher

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
) -> AsyncIterator[str]:
    """Accept websocket connections on ``host:port`` for the block; yield the ``ws://`` URL.

    Connections run in ``connections`` (the dispatcher's nursery) and outlive this block;
    leaving it, or cancelling it, only closes the listening socket.
    """
    endpoint = _Endpoint(dispatcher, authenticate, on_message, limits)
    listeners = await trio.open_tcp_listeners(port, host=host)
    for listener in listeners:
        if limits.send_buffer_size:
            # Accepted sockets inherit it: kernel memory per connection stays bounded too.
            listener.socket.setsockopt(SOL_SOCKET, SO_SNDBUF, limits.send_buffer_size)
    server = WebSocketServer(
        endpoint.handle,
        listeners,
        handler_nursery=connections,
        max_message_size=limits.max_message_size,
        connect_timeout=limits.handshake_timeout,
        # The dispatcher closes connections itself, bounded by the grace period.
        disconnect_timeout=math.inf,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            yield f"ws://{host}:{server.port}{PATH}"
        finally:
            nursery.cancel_scope.cancel()


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
        self._handshakes = 0

    async def handle(self, request: WebSocketRequest) -> None:
        """One connection, start to end. Nothing raised here may reach trio-websocket: an
        exception escaping a handler would crash the whole server, not just this connection."""
        websocket: WebSocketConnection | None = None
        try:
            target = urlsplit(request.path)
            if target.path != PATH:
                await request.reject(404, body=b"no such endpoint: connect to /ws\n")
                return
            if len(self._dispatcher.clients) + self._handshakes >= self._limits.max_connections:
                await request.reject(503, body=b"too many connections: try again later\n")
                return
            query = parse_qs(target.query)
            self._handshakes += 1
            try:
                identity = await self._authenticate(_presented_key(request, query))
                websocket = await request.accept()
            finally:
                self._handshakes -= 1
            if identity is None:
                await websocket.aclose(CloseCode.UNAUTHENTICATED, "a valid API key is required")
                return
            await self._serve(
                Client(
                    websocket,
                    identity,
                    batch=query.get("batch") != ["0"],
                    queue_size=self._limits.send_queue_size,
                )
            )
        except Exception:
            log.exception("connection from %s failed", request.remote)
            if websocket is not None:
                with trio.move_on_after(1):
                    await websocket.aclose(CloseCode.INTERNAL_ERROR, "internal error")

    async def _serve(self, client: Client) -> None:
        # No checkpoint between the handshake's end and the client's registration: a write
        # acknowledged after the client saw its connection open reaches it.
        await self._dispatcher.serve(
            client, self._on_message, heartbeat_interval=self._limits.heartbeat_interval
        )


def _presented_key(request: WebSocketRequest, query: dict[str, list[str]]) -> str | None:
    for name, value in request.headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip()
    tokens = query.get("token")
    return tokens[-1] if tokens else None

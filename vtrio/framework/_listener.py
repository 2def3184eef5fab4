"""The listening socket: every TCP connection's HTTP request, and the websocket handshake.

vtrio accepts each TCP connection itself and reads its first request with h11. ``GET /ws`` with
an upgrade becomes a websocket :class:`~vtrio.framework._connection.Connection`, served by the
hub; any other request is answered by the ``http`` handler (plain HTTP on the same port) and
the connection closed.

A websocket client presents an API key as ``Authorization: Bearer KEY`` or, from a browser, as
``?token=KEY``; without a valid one the connection is accepted and closed at once with 4000, so
that the client can tell why. ``?batch=0`` asks for one change message per frame.

Admission, so that idle or slow sockets cannot lock real clients out:

- a connection must finish its request within ``handshake_timeout``;
- at most ``max_handshakes`` connections may be in their handshake at once; one more makes
  room by dropping the one that has waited longest (a client that sends its request at once
  is never the one dropped, unless ``max_handshakes`` others arrive before its request);
- at most ``max_connections`` websocket connections may be open; beyond, 503;
- once the server is stopping, a websocket handshake is answered 503 (plain HTTP is still
  served while the connections drain, so that ``/ready`` can say the server is going).
"""

from __future__ import annotations

import logging
import resource
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from socket import SO_SNDBUF, SOL_SOCKET
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from wsproto.connection import Connection as Protocol
from wsproto.connection import ConnectionType
from wsproto.utilities import generate_accept_token

from vtrio.framework._connection import Connection, ConnectionLimits, OnMessage, OnOversized
from vtrio.framework._hub import Hub
from vtrio.framework._services import Stopping
from vtrio.framework._wire import CloseCode

__all__ = ["HttpHandler", "HttpResponse", "ListenerLimits", "serve_listener"]

log = logging.getLogger(__name__)

WEBSOCKET_PATH = "/ws"
MAX_REQUEST_HEAD = 16 * 1024
"""The largest request line and headers accepted, in bytes (431 beyond)."""

FILES_BESIDES = 1024
"""Open files the process needs besides its clients' sockets (MongoDB, workers, files)."""

Authenticate = Callable[[str | None], Awaitable[Any | None]]
"""``await authenticate(key)``: the identity an API key stands for, or None."""


@dataclass(frozen=True)
class HttpResponse:
    """A complete plain-HTTP response."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


HttpHandler = Callable[[h11.Request], Awaitable[HttpResponse]]
"""``await http(request)``: the response to a request that is not a websocket upgrade."""


async def not_found(request: h11.Request) -> HttpResponse:
    return HttpResponse(404, b"no such endpoint: connect to /ws\n")


@dataclass(frozen=True)
class ListenerLimits:
    max_connections: int = 10_000
    max_handshakes: int = 1_000
    handshake_timeout: float = 5.0
    send_buffer_size: int = 0
    """SO_SNDBUF of each connection, bytes (0: the kernel's own sizing)."""
    connection: ConnectionLimits = field(default_factory=ConnectionLimits)


@asynccontextmanager
async def serve_listener(
    *,
    host: str,
    port: int,
    hub: Hub,
    stopping: Stopping,
    authenticate: Authenticate,
    on_message: OnMessage,
    on_oversized: OnOversized | None = None,
    http: HttpHandler = not_found,
    limits: ListenerLimits = ListenerLimits(),
) -> AsyncIterator[str]:
    """Accept connections on ``host:port`` for the block; yield the websocket URL.

    Resource handling: each connection runs in the hub's nursery and may outlive the block;
    leaving the block, or cancelling it, closes the listening socket and nothing else. Once
    ``stopping`` is set, websocket handshakes are answered 503 while plain HTTP is still served
    (``/ready`` says 503 too), so that a load balancer sees the stop while clients drain.
    """
    assert hub.nursery is not None, "the hub must be running"
    endpoint = _Endpoint(hub, stopping, authenticate, (on_message, on_oversized), http, limits)
    raise_open_file_limit(limits.max_connections + limits.max_handshakes + FILES_BESIDES)
    listeners = await trio.open_tcp_listeners(port, host=host)
    for listener in listeners:
        if limits.send_buffer_size:  # accepted sockets inherit it
            listener.socket.setsockopt(SOL_SOCKET, SO_SNDBUF, limits.send_buffer_size)
    bound_port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_listeners, handler_nursery=hub.nursery)
        await nursery.start(serve, endpoint.handle, listeners)
        yield f"ws://{host}:{bound_port}{WEBSOCKET_PATH}"
        nursery.cancel_scope.cancel()


def raise_open_file_limit(wanted: int) -> None:
    """Raise this process's soft limit on open files towards ``wanted`` (up to the hard limit),
    so that that many connections can be held; log what it now is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open-file limit raised from %d to %d for --max-connections", soft, target)
    if target < wanted:
        log.warning("the open-file limit (%d) is below --max-connections (%d)", hard, wanted)


class _Handshakes:
    """The connections still in their handshake: counted, timed, and the oldest dropped first."""

    def __init__(self, limit: int, timeout: float) -> None:
        self._limit = limit
        self._timeout = timeout
        self._waiting: dict[trio.CancelScope, None] = {}  # in arrival order

    @contextmanager
    def admitted(self) -> Iterator[trio.CancelScope]:
        while len(self._waiting) >= self._limit:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.cancel()
        with trio.move_on_after(self._timeout) as scope:
            self._waiting[scope] = None
            try:
                yield scope
            finally:
                self._waiting.pop(scope, None)


class _Endpoint:
    def __init__(
        self,
        hub: Hub,
        stopping: Stopping,
        authenticate: Authenticate,
        handlers: tuple[OnMessage, OnOversized | None],
        http: HttpHandler,
        limits: ListenerLimits,
    ) -> None:
        self._hub = hub
        self._stopping = stopping
        self._authenticate = authenticate
        self._on_message, self._on_oversized = handlers
        self._http = http
        self._limits = limits
        self._handshakes = _Handshakes(limits.max_handshakes, limits.handshake_timeout)

    async def handle(self, stream: trio.SocketStream) -> None:
        """One TCP connection, start to end, in the hub's nursery.

        Error handling: nothing raised here escapes (it would end the hub's nursery and every
        other connection with it); the socket is closed on the way out, whatever happens.
        """
        connection: Connection | None = None
        try:
            with self._handshakes.admitted():
                connection, since = await self._handshake(stream)
            if connection is None:
                return
            if connection.identity is None:
                await connection.serve()  # closed with 4000 already: its close handshake
            else:
                await self._hub.serve(connection, since)
        except Exception:
            log.exception("connection failed during its handshake")
        finally:
            if connection is None:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _handshake(self, stream: trio.SocketStream) -> tuple[Connection | None, str | None]:
        """Read the request and answer it; the websocket connection, if it became one, and the
        position it resumes from (``?since=``), if any."""
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        request = await _read_request(stream, http)
        if request is None:
            return None, None
        if not isinstance(request, h11.Request):
            status = getattr(request, "error_status_hint", 400)
            await _respond(stream, HttpResponse(status, b"malformed request\n"))
            return None, None
        target = urlsplit(request.target.decode("latin-1"))
        if target.path != WEBSOCKET_PATH:
            head_only = request.method == b"HEAD"
            await _respond(stream, await self._http(request), head_only=head_only)
            return None, None
        refusal = self._refusal(request)
        if refusal is None:
            query = parse_qs(target.query)
            try:
                identity = await self._authenticate(_presented_key(request, query))
            except Exception:
                log.exception("cannot check an API key")
                refusal = HttpResponse(503, b"cannot check API keys now: try again\n")
        if refusal is None and self._stopping.requested:
            refusal = HttpResponse(503, b"the server is shutting down\n")
        if refusal is not None:
            await _respond(stream, refusal)
            return None, None
        since = query["since"][-1] if "since" in query else None
        return await self._accept(stream, http, request, identity, query), since

    def _refusal(self, request: h11.Request) -> HttpResponse | None:
        """Why an upgrade request to /ws cannot be accepted, as the response; or None."""
        headers = _headers(request)
        if request.method != b"GET" or headers.get(b"upgrade", b"").lower() != b"websocket":
            return HttpResponse(426, b"connect to /ws with a websocket client\n",
                                headers=(("Upgrade", "websocket"),))  # fmt: skip
        if headers.get(b"sec-websocket-version") != b"13" or b"sec-websocket-key" not in headers:
            return HttpResponse(400, b"unsupported websocket handshake: version 13 expected\n",
                                headers=(("Sec-WebSocket-Version", "13"),))  # fmt: skip
        if len(self._hub.connections) >= self._limits.max_connections:
            return HttpResponse(503, b"too many connections: try again later\n")
        return None

    async def _accept(
        self,
        stream: trio.SocketStream,
        http: h11.Connection,
        request: h11.Request,
        identity: Any | None,
        query: dict[str, list[str]],
    ) -> Connection:
        key = _headers(request)[b"sec-websocket-key"]
        accept = h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Accept", generate_accept_token(key)),
            ],
        )
        await stream.send_all(http.send(accept) or b"")
        trailing, _ = http.trailing_data  # what the client sent after its request
        connection = Connection(
            stream,
            Protocol(ConnectionType.SERVER, trailing_data=trailing),
            identity,
            batch=query.get("batch") != ["0"],
            limits=self._limits.connection,
            on_message=self._on_message,
            on_oversized=self._on_oversized,
        )
        if identity is None:
            connection.close(CloseCode.UNAUTHENTICATED, "a valid API key is required")
        return connection


async def _read_request(stream: trio.SocketStream, http: h11.Connection) -> Any:
    """The first h11 event of a connection: a Request, or a RemoteProtocolError (for a
    malformed or oversized one); None if the client left before sending it."""
    try:
        while True:
            event = http.next_event()
            if event is not h11.NEED_DATA:
                return None if isinstance(event, h11.ConnectionClosed) else event
            http.receive_data(await stream.receive_some(MAX_REQUEST_HEAD))
    except h11.RemoteProtocolError as exc:
        return exc
    except trio.BrokenResourceError:
        return None


async def _respond(
    stream: trio.SocketStream, response: HttpResponse, *, head_only: bool = False
) -> None:
    """Send ``response`` whole (its head only, for a HEAD request); the caller then closes
    the connection."""
    head = [
        f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    body = b"" if head_only else response.body
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # the client left
        await stream.send_all("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)


def _headers(request: h11.Request) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in request.headers}


def _presented_key(request: h11.Request, query: dict[str, list[str]]) -> str | None:
    authorization = _headers(request).get(b"authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer":
            return credentials.strip()
    tokens = query.get("token")
    return tokens[-1] if tokens else None

"""Command-line clients of a running server: ``vtrio call`` and ``vtrio watch``.

Both connect to ``/ws`` with trio-websocket, authenticated by an API key, and read frames that
hold one message or a JSON array of them (see :mod:`vtrio.dispatcher`).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, TextIO

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

DEFAULT_URL = "ws://127.0.0.1:9950/ws"


class ClientError(Exception):
    """The server could not be reached, refused us, or answered with an error."""


@asynccontextmanager
async def connection(url: str, key: str | None) -> AsyncIterator[WebSocketConnection]:
    """An open connection to ``url``, authenticated with ``key``; ClientError if there is none.

    Errors raised in the block pass unchanged: only failing to connect is a connection error.
    """
    if not key:
        raise ClientError("no API key: pass --key or set VTRIO_KEY (`vtrio keys create USER`)")
    headers = [(b"authorization", f"Bearer {key}".encode())]
    connected = False
    try:
        async with open_websocket_url(url, extra_headers=headers) as websocket:
            connected = True
            yield websocket
    except (OSError, HandshakeError, ValueError) as exc:
        if connected:
            raise
        raise ClientError(f"cannot connect to {url}: {str(exc) or type(exc).__name__}") from None


async def messages(websocket: WebSocketConnection) -> AsyncIterator[dict[str, Any]]:
    """Every message the server sends, arrays unpacked, until it closes the connection."""
    try:
        while True:
            frame = json.loads(await websocket.get_message())
            for message in frame if isinstance(frame, list) else [frame]:
                yield message
    except ConnectionClosed as closed:
        _check_closed(closed)


def _check_closed(closed: ConnectionClosed) -> None:
    """Raise ClientError unless the server closed the connection normally."""
    reason = closed.reason
    if reason is None or reason.code not in (1000, 1001):
        code = "" if reason is None else f"{reason.code} {reason.reason or ''}".strip()
        raise ClientError(f"the server closed the connection: {code or 'no reason given'}")


async def call(
    url: str, key: str | None, method: str, params: Any, out: TextIO = sys.stdout
) -> None:
    """Send one request; print its result as JSON. Raises ClientError for an error response.

    Cancellation (Ctrl-C): the connection is closed; the server cancels the request, but a
    write it had already sent to MongoDB completes.
    """
    async with connection(url, key) as websocket:
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        try:
            await websocket.send_message(json.dumps(request))
        except ConnectionClosed as closed:  # e.g. closed at once for a revoked key
            _check_closed(closed)
            raise ClientError("the server closed the connection before the request") from None
        async for message in messages(websocket):
            if message.get("id") == 1 and "jsonrpc" in message:
                if "error" in message:
                    error = message["error"]
                    raise ClientError(f"error {error['code']}: {error['message']}")
                print(json.dumps(message["result"], indent=2), file=out)
                return
    raise ClientError("the server closed the connection before answering")


async def watch(
    url: str,
    key: str | None,
    interfaces: Iterable[str] = (),
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> None:
    """Print change messages as JSON lines on ``out`` until Ctrl-C (which ends it quietly).

    Once connected, says so on ``err``: every change acknowledged after that line is printed.
    """
    wanted = set(interfaces)
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_first, interrupts, nursery.cancel_scope)
            async with connection(url, key) as websocket:
                shown = ", ".join(sorted(wanted)) or "all interfaces"
                print(f"watching {shown} at {url} (Ctrl-C to stop)", file=err, flush=True)
                async for message in messages(websocket):
                    if "interface" in message and (not wanted or message["interface"] in wanted):
                        print(json.dumps(message), file=out, flush=True)
            nursery.cancel_scope.cancel()


async def _cancel_on_first(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return

"""The baseline's dispatcher: one message, serialised once, sent to each connection in turn."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aiohttp import web

from vtrio.framework import dumps
from vtrio.virtool import COLLECTIONS, Identity

log = logging.getLogger(__name__)


class Connection:
    """One websocket connection: its user, and its RPC tasks."""

    def __init__(self, ws: web.WebSocketResponse, identity: Identity) -> None:
        self.ws = ws
        self.identity = identity
        self.tasks: set[Any] = set()

    async def send(self, text: str) -> None:
        # A closing transport: skip it; its handler removes it from the dispatcher shortly.
        with contextlib.suppress(ConnectionResetError):
            await self.ws.send_str(text)

    async def close(self, code: int) -> None:
        await self.ws.close(code=code)


class Dispatcher:
    def __init__(self) -> None:
        self.connections: list[Connection] = []

    def add(self, connection: Connection) -> None:
        self.connections.append(connection)

    def remove(self, connection: Connection) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(connection)

    async def dispatch(self, interface: str, operation: str, data: Any) -> None:
        message = dumps({"interface": interface, "operation": operation, "data": data})
        for connection in list(self.connections):
            # vtrio's own rule (a delete carries ids only: it goes to everyone here).
            if not isinstance(data, dict) or COLLECTIONS[interface].sees(connection.identity, data):
                await connection.send(message)

    async def close(self) -> None:
        """Close every connection with 1001, one after the other."""
        for connection in list(self.connections):
            try:
                await connection.close(1001)
            except Exception:
                log.exception("closing a websocket failed")

"""The baseline's dispatcher: one message, serialised once, sent to each connection in turn."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from vtrio.encoding import dumps

log = logging.getLogger(__name__)


class Identity:
    __slots__ = ("admin", "groups", "key_id", "user_id")

    def __init__(self, user_id: str, admin: bool, groups: frozenset[str], key_id: str) -> None:
        self.user_id = user_id
        self.admin = admin
        self.groups = groups
        self.key_id = key_id


def can_read(identity: Identity, document: Mapping[str, Any]) -> bool:
    return _allowed(identity, document, "read")


def can_write(identity: Identity, document: Mapping[str, Any]) -> bool:
    return _allowed(identity, document, "write")


def _allowed(identity: Identity, document: Mapping[str, Any], right: str) -> bool:
    # The same rule as vtrio.access, so both servers do the same checks.
    return (
        identity.admin
        or document.get("user") == identity.user_id
        or bool(document.get(f"all_{right}"))
        or (bool(document.get(f"group_{right}")) and document.get("group") in identity.groups)
    )


def may_receive(identity: Identity, data: Any) -> bool:
    return not isinstance(data, Mapping) or can_read(identity, data.get("access", data))


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
            if may_receive(connection.identity, data):
                await connection.send(message)

    async def close(self) -> None:
        """Close every connection with 1001, one after the other."""
        for connection in list(self.connections):
            try:
                await connection.close(1001)
            except Exception:
                log.exception("closing a websocket failed")

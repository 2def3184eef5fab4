"""The real service tree in-process, on the session's mongod, and websocket clients for it."""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from vtrio import virtool
from vtrio.config import Settings
from vtrio.framework import Change, Operation
from vtrio.server import App, open_app


def settings_for(mongodb_url: str, db_name: str, data_dir: Path, **overrides: Any) -> Settings:
    return dataclasses.replace(
        Settings(),
        host="127.0.0.1",
        port=0,
        mongodb_url=mongodb_url,
        db_name=db_name,
        data_dir=data_dir,
        shutdown_timeout=5.0,
        processes=1,
        **overrides,
    )


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[App]:
    async with open_app(settings) as app:
        yield app


def publish(app: App, operation: Operation, document: dict[str, Any]) -> None:
    """Hand the hub a change to ``notes`` (a collection without rules), as a write would."""
    fields = {key: value for key, value in document.items() if key != "id"}
    after = {"_id": document.get("id"), **fields} if operation != "delete" else None
    app.hub.publish([Change("notes", operation, document.get("id"), after=after)])


async def new_key(app: App, user: str = "alice", **user_options: Any) -> str:
    if await app.db.users.find_one({"name": user}) is None:
        await virtool.create_user(app.db, user, **user_options)
    _, key = await virtool.create_key(app.db, user)
    return key


@asynccontextmanager
async def connect(
    url: str, key: str | None, *, query: str = "", **options: Any
) -> AsyncIterator[WebSocketConnection]:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    async with open_websocket_url(url + query, extra_headers=headers, **options) as websocket:
        yield websocket


async def receive_json(websocket: WebSocketConnection, timeout: float = 10) -> Any:
    with trio.fail_after(timeout):
        return json.loads(await websocket.get_message())


async def receive_messages(websocket: WebSocketConnection, count: int, timeout: float = 10) -> list:
    """``count`` change messages, whether they came one per frame or coalesced in arrays."""
    messages: list = []
    with trio.fail_after(timeout):
        while len(messages) < count:
            frame = json.loads(await websocket.get_message())
            messages.extend(frame if isinstance(frame, list) else [frame])
    return messages


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """A client frame built by hand, broken as asked."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        header = bytes((first, mask_bit | size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return header + payload
    key = random.randbytes(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A websocket client on a bare socket: it reads only when told to, answers no ping on
    its own, and can misbehave in ways a library client will not."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.protocol = WSConnection(ConnectionType.CLIENT)

    @classmethod
    async def connect(
        cls, url: str, key: str, *, receive_buffer: int = 0, query: str = ""
    ) -> RawClient:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        sock = trio.socket.socket()
        if receive_buffer:  # a small window makes the server's socket block sooner
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        client = cls(sock)
        headers = [(b"authorization", f"Bearer {key}".encode())]
        await sock.send(client.protocol.send(Request(host="127.0.0.1", target="/ws" + query,
                                                     extra_headers=headers)))  # fmt: skip
        await client.next_event(AcceptConnection)
        return client

    async def next_event(self, kind: type, timeout: float = 30) -> Any:
        """Read until an event of ``kind`` arrives (skipping others); return it."""
        with trio.fail_after(timeout):
            while True:
                for event in self.protocol.events():
                    if isinstance(event, kind):
                        return event
                data = await self.sock.recv(65536)
                if not data:
                    raise ConnectionError("the server closed the TCP connection")
                self.protocol.receive_data(data)

    async def frames(self, count: int, timeout: float = 30) -> list[Any]:
        """The next ``count`` text frames, parsed as JSON."""
        frames, parts = [], []
        while len(frames) < count:
            event = await self.next_event(TextMessage, timeout)
            parts.append(event.data)  # a large frame arrives in pieces
            if event.message_finished:
                frames.append(json.loads("".join(parts)))
                parts.clear()
        return frames

    async def close_code(self, timeout: float = 30) -> int:
        """The code of the server's close frame; 1006 if the connection ended without one."""
        try:
            return (await self.next_event(CloseConnection, timeout)).code
        except (ConnectionError, OSError):
            return 1006

    def reset(self) -> None:
        """Vanish: close with an RST, as a killed client or a dropped network does."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


async def closed_with(websocket, timeout: float = 10) -> int:
    """Read until the server closes the connection; return its close code."""
    with trio.fail_after(timeout):
        try:
            while True:
                await websocket.get_message()
        except ConnectionClosed as closed:
            return closed.reason.code

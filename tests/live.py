"""The real service tree in-process, on the session's mongod, and websocket clients for it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from vtrio import auth
from vtrio.config import Settings
from vtrio.server import App, open_app


def test_settings(mongodb_url: str, db_name: str, data_dir: Path, **overrides: Any) -> Settings:
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


async def new_key(app: App, user: str = "alice", **user_options: Any) -> str:
    if await app.db.users.find_one({"name": user}) is None:
        await auth.create_user(app.db, user, **user_options)
    _, key = await auth.create_key(app.db, user)
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

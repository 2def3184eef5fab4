"""A JSON-RPC client for the tests: real requests on a real ``/ws`` connection.

Responses and change messages share the connection. :class:`RpcClient` reads frames in order;
a call waits for the response with its id, keeping every change message that arrives meanwhile
in :attr:`RpcClient.changes`, where :meth:`RpcClient.change` finds them, so that no message is
lost or mistaken for another.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection

from tests.live import connect, new_key
from vtrio.server import App


class CallFailed(Exception):
    """The server answered with an error."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error['code']}: {error['message']}")
        self.code: int = error["code"]
        self.message: str = error["message"]
        self.data: Any = error.get("data")


Change = dict[str, Any]


class RpcClient:
    def __init__(self, websocket: WebSocketConnection) -> None:
        self.websocket = websocket
        self.changes: list[Change] = []
        self._responses: dict[Any, dict[str, Any]] = {}
        self._batches: list[list[dict[str, Any]]] = []
        self._ids = itertools.count(1)

    # -- sending ----------------------------------------------------------------------------

    def request_object(self, method: str, params: Any = None, **extra: Any) -> dict[str, Any]:
        """A request with a fresh id (``id=None`` in ``extra`` keeps an explicit null)."""
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": next(self._ids), "method": method}
        if params is not None:
            request["params"] = params
        request.update(extra)
        return request

    async def send(self, payload: Any) -> None:
        await self.websocket.send_message(json.dumps(payload))

    async def send_text(self, text: str | bytes) -> None:
        await self.websocket.send_message(text)

    # -- calling ----------------------------------------------------------------------------

    async def request(self, method: str, params: Any = None, timeout: float = 10) -> dict:
        """Send one request; return its whole response."""
        request = self.request_object(method, params)
        await self.send(request)
        return await self.response(request["id"], timeout)

    async def call(self, method: str, params: Any = None, timeout: float = 10) -> Any:
        """The result of calling ``method``; CallFailed for an error response."""
        response = await self.request(method, params, timeout)
        if "error" in response:
            raise CallFailed(response["error"])
        return response["result"]

    async def fails(self, method: str, params: Any = None, timeout: float = 10) -> CallFailed:
        """The error of calling ``method``, which must fail."""
        response = await self.request(method, params, timeout)
        assert "error" in response, f"{method} {params} succeeded: {response}"
        assert "result" not in response
        return CallFailed(response["error"])

    # -- receiving --------------------------------------------------------------------------

    async def response(self, request_id: Any, timeout: float = 10) -> dict[str, Any]:
        """The response to ``request_id`` (a single response, not one inside a batch)."""
        with trio.fail_after(timeout):
            while request_id not in self._responses:
                await self._read_frame()
        return self._responses.pop(request_id)

    async def batch(self, timeout: float = 10) -> list[dict[str, Any]]:
        """The next batch response (a frame holding an array of responses)."""
        with trio.fail_after(timeout):
            while not self._batches:
                await self._read_frame()
        return self._batches.pop(0)

    async def change(
        self, matches: Callable[[Change], bool] = lambda change: True, timeout: float = 10
    ) -> Change:
        """The first change message (received or to come) for which ``matches`` is true. It is
        taken out of :attr:`changes`; the others stay, in order."""
        with trio.fail_after(timeout):
            while True:
                for index, change in enumerate(self.changes):
                    if matches(change):
                        del self.changes[index]
                        return change
                await self._read_frame()

    async def next_change(self, timeout: float = 10) -> Change:
        """The next change message, whatever it is."""
        return await self.change(timeout=timeout)

    async def _read_frame(self) -> None:
        frame = json.loads(await self.websocket.get_message())
        if isinstance(frame, list) and frame and all("jsonrpc" in item for item in frame):
            self._batches.append(frame)
            return
        for message in frame if isinstance(frame, list) else [frame]:
            if "jsonrpc" in message:
                assert message["id"] not in self._responses, f"two responses for {message}"
                self._responses[message["id"]] = message
            else:
                assert "interface" in message, f"neither a response nor a change: {message}"
                self.changes.append(message)


@asynccontextmanager
async def rpc_client(
    app: App, user: str = "alice", **user_options: Any
) -> AsyncIterator[RpcClient]:
    """A connection of ``user`` (created with ``user_options`` if new) to ``app``, one change
    message per frame."""
    key = await new_key(app, user, **user_options)
    async with connect(app.url, key, query="?batch=0") as websocket:
        yield RpcClient(websocket)


def is_change(interface: str, operation: str, **fields: Any) -> Callable[[Change], bool]:
    """A matcher for :meth:`RpcClient.change`: this operation, with these data fields."""

    def matches(change: Change) -> bool:
        data = change["data"]
        return (
            change["interface"] == interface
            and change["operation"] == operation
            and all(isinstance(data, dict) and data.get(k) == v for k, v in fields.items())
        )

    return matches

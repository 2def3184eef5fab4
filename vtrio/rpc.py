"""JSON-RPC 2.0 over the ``/ws`` connection.

Requests are ``{"jsonrpc": "2.0", "id": ..., "method": ..., "params": {...}}``; each gets a
response with ``result`` or ``error``, in its own frame. A JSON array is a batch, answered by one
frame holding the array of responses. Change messages from the dispatcher are interleaved with
responses on the same connection; they carry no ``id`` and no ``jsonrpc``.

Every request runs in a task of its own in the connection's nursery, so the reader keeps reading
(and answering pings) while it runs. At most ``max_in_flight`` requests run at once per
connection; one more is answered at once with :data:`BUSY`. When the connection closes, its
requests are cancelled: a database write already sent still completes and is dispatched (see
:mod:`vtrio.db`), but no response is sent.

A bad request never closes the connection and never changes data. Errors:

======  ==========================================================================
-32700  the frame is not JSON
-32600  not a JSON-RPC 2.0 request (or an empty or oversized batch)
-32601  no such method
-32602  invalid params: the message names each wrong field and what was expected
-32603  internal error (logged on the server)
404     not found (also: exists, but the caller may not read it)
403     forbidden: the caller may read it but not change it
409     conflict: e.g. a sample of that name exists
429     busy: too many requests in flight on this connection, or no capacity
502     an upstream service (NCBI, GitHub) failed or refused
======  ==========================================================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pydantic
import trio

from vtrio.dispatcher import Client
from vtrio.encoding import dumps

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
NOT_FOUND = 404
FORBIDDEN = 403
CONFLICT = 409
BUSY = 429
UPSTREAM_FAILED = 502

MAX_BATCH = 50


class RpcError(Exception):
    """An error response: raise it from a method to answer with ``code`` and ``message``."""

    code = INTERNAL_ERROR

    def __init__(self, message: str, *, code: int | None = None, data: Any = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.data = data

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.data is not None:
            error["data"] = self.data
        return error


class NotFound(RpcError):
    code = NOT_FOUND


class Forbidden(RpcError):
    code = FORBIDDEN


class Conflict(RpcError):
    code = CONFLICT


class Busy(RpcError):
    code = BUSY


class UpstreamFailed(RpcError):
    code = UPSTREAM_FAILED


class Params(pydantic.BaseModel):
    """Base of every method's parameters: unknown fields are errors, not silently ignored."""

    # Strict: "true" is not a bool and "3" is not an int; a wrong type is an error, not a guess.
    model_config = pydantic.ConfigDict(extra="forbid", strict=True, str_max_length=10_000)


P = TypeVar("P", bound=Params)
C = TypeVar("C")


@dataclass(frozen=True)
class Method(Generic[C, P]):
    """One callable method: its parameter model and the coroutine that answers it."""

    params: type[P]
    handler: Callable[[C, P], Awaitable[Any]]


class Methods(Generic[C]):
    """The method table: ``@methods.method("samples.get", GetParams)`` registers a handler."""

    def __init__(self) -> None:
        self._methods: dict[str, Method[C, Any]] = {}

    def method(
        self, name: str, params: type[P]
    ) -> Callable[[Callable[[C, P], Awaitable[Any]]], Callable[[C, P], Awaitable[Any]]]:
        def register(handler: Callable[[C, P], Awaitable[Any]]) -> Callable[[C, P], Awaitable[Any]]:
            if name in self._methods:
                raise ValueError(f"method {name!r} is registered twice")
            self._methods[name] = Method(params, handler)
            return handler

        return register

    def update(self, other: Methods[C]) -> None:
        for name, method in other._methods.items():
            if name in self._methods:
                raise ValueError(f"method {name!r} is registered twice")
            self._methods[name] = method

    def get(self, name: str) -> Method[C, Any] | None:
        return self._methods.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._methods)


class RpcEndpoint(Generic[C]):
    """Answers the JSON-RPC requests that arrive on every connection.

    ``context(client)`` makes what a method receives as its first argument (the app and the
    caller's identity, typically).
    """

    def __init__(
        self,
        methods: Methods[C],
        context: Callable[[Client], C],
        *,
        max_in_flight: int = 16,
    ) -> None:
        self._methods = methods
        self._context = context
        self._max_in_flight = max_in_flight
        self._in_flight: dict[Client, int] = {}

    async def on_message(self, client: Client, frame: str | bytes, nursery: trio.Nursery) -> None:
        """Handle one frame from ``client``: start its request(s) in ``nursery``. Never raises
        for bad input; answers it."""
        try:
            payload = json.loads(frame)
        except (ValueError, UnicodeDecodeError) as exc:
            client.reply(
                dumps(_error_response(None, RpcError(f"not JSON: {exc}", code=PARSE_ERROR)))
            )
            return
        if isinstance(payload, list) and not 0 < len(payload) <= MAX_BATCH:
            error = RpcError(f"a batch holds 1 to {MAX_BATCH} requests", code=INVALID_REQUEST)
            client.reply(dumps(_error_response(None, error)))
            return
        if not self._admit(client):
            if isinstance(payload, dict) and "id" in payload:
                client.reply(dumps(_error_response(payload["id"], _busy(self._max_in_flight))))
            return
        nursery.start_soon(self._answer, client, payload)

    def _admit(self, client: Client) -> bool:
        count = self._in_flight.get(client, 0)
        if count >= self._max_in_flight:
            return False
        self._in_flight[client] = count + 1
        return True

    async def _answer(self, client: Client, payload: Any) -> None:
        try:
            context = self._context(client)
            if isinstance(payload, list):
                responses: list[dict[str, Any] | None] = [None] * len(payload)
                async with trio.open_nursery() as batch:
                    for index, request in enumerate(payload):
                        batch.start_soon(self._fill, responses, index, context, request)
                answered = [response for response in responses if response is not None]
                if answered:
                    client.reply(dumps(answered))
            else:
                response = await self.call(context, payload)
                if response is not None:
                    client.reply(dumps(response))
        finally:
            self._in_flight[client] -= 1
            if not self._in_flight[client]:
                del self._in_flight[client]

    async def _fill(
        self, responses: list[dict[str, Any] | None], index: int, context: C, request: Any
    ) -> None:
        responses[index] = await self.call(context, request)

    async def call(self, context: C, request: Any) -> dict[str, Any] | None:
        """Answer one request object; None for a notification (a request without ``id``)."""
        if not _is_request(request):
            return _error_response(
                request.get("id") if isinstance(request, dict) else None,
                RpcError('not a JSON-RPC 2.0 request: expected {"jsonrpc": "2.0", "method": ...}',
                         code=INVALID_REQUEST),
            )  # fmt: skip
        request_id = request.get("id")
        try:
            result = await self._run(context, request["method"], request.get("params", {}))
        except RpcError as error:
            response = _error_response(request_id, error)
        except Exception:
            log.exception("method %s failed", request["method"])
            response = _error_response(request_id, RpcError("internal error: see the server log"))
        else:
            response = {"jsonrpc": "2.0", "id": request_id, "result": result}
        return response if "id" in request else None

    async def _run(self, context: C, name: str, params: Any) -> Any:
        method = self._methods.get(name)
        if method is None:
            raise RpcError(f"no method {name!r}", code=METHOD_NOT_FOUND)
        if not isinstance(params, Mapping):
            raise RpcError("params must be an object", code=INVALID_PARAMS)
        try:
            parsed = method.params.model_validate(params)
        except pydantic.ValidationError as exc:
            raise RpcError(_describe_invalid(exc), code=INVALID_PARAMS) from None
        return await method.handler(context, parsed)


def _is_request(request: Any) -> bool:
    return (
        isinstance(request, dict)
        and request.get("jsonrpc") == "2.0"
        and isinstance(request.get("method"), str)
        and isinstance(request.get("id", 0), str | int)
        and not isinstance(request.get("id", 0), bool)
    )


def _error_response(request_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_json()}


def _busy(limit: int) -> RpcError:
    return Busy(f"{limit} requests are already running on this connection: wait for one")


def _describe_invalid(exc: pydantic.ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "params"
        problems.append(f"{where}: {error['msg']}")
    return "invalid params: " + "; ".join(problems)

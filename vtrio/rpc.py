"""JSON-RPC 2.0 over the ``/ws`` connection.

Requests are ``{"jsonrpc": "2.0", "id": ..., "method": ..., "params": {...}}``; each gets a
response with ``result`` or ``error``, in its own frame. A JSON array is a batch, answered by one
frame holding the array of responses. Change messages from the dispatcher are interleaved with
responses on the same connection; they carry no ``id`` and no ``jsonrpc``.

Every request runs in a task of its own in the connection's nursery, so the reader keeps reading
(and answering pings) while it runs. At most ``max_in_flight`` requests run at once per
connection; one more is answered at once with :data:`BUSY`. A batch takes as many of the free
slots as it has requests (at least one, else all its requests are answered with :data:`BUSY`)
and runs its requests concurrently within them; its responses come in one frame, in the order
of the requests, notifications left out. When the connection closes, its requests are
cancelled: a database write already sent still completes and is dispatched (see
:mod:`vtrio.db`), but no response is sent.

Request ids are strings, integers or null; parameters are named (a JSON object) and validated
by the method's pydantic model: unknown fields and wrong types are errors, never coerced.

A bad request never closes the connection and never changes data. (A frame larger than
``--max-message-size`` is not read at all: the websocket layer closes the connection with 1009,
see :mod:`vtrio.dispatcher`.) Errors:

======  ==========================================================================
-32700  the frame is not JSON (or nested too deeply, or holds a lone UTF-16 surrogate)
-32600  not a JSON-RPC 2.0 request (or an empty batch, or one of more than MAX_BATCH)
-32601  no such method
-32602  invalid params: the message names each wrong field and what was expected;
        ``error.data`` lists them as ``{"field": ..., "problem": ...}``
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
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._methods = methods
        self._context = context
        self._max_in_flight = max_in_flight
        self._in_flight: dict[Client, int] = {}

    async def on_message(self, client: Client, frame: str | bytes, nursery: trio.Nursery) -> None:
        """Handle one frame from ``client``: start its request(s) in ``nursery`` (the
        connection's, so that they are cancelled with it). Never raises for bad input, and
        never waits: errors found here are answered at once."""
        try:
            payload = _parse(frame)
        except _Unparsable as exc:
            _send(client, _error_response(None, RpcError(str(exc), code=PARSE_ERROR)))
            return
        if isinstance(payload, list):
            self._start_batch(client, payload, nursery)
        elif self._take(client, 1):
            nursery.start_soon(self._answer_one, client, payload)
        elif _answered(payload):
            _send(client, _error_response(_id_of(payload), self._busy()))

    def _start_batch(self, client: Client, batch: list[Any], nursery: trio.Nursery) -> None:
        if not 0 < len(batch) <= MAX_BATCH:
            error = RpcError(f"a batch holds 1 to {MAX_BATCH} requests", code=INVALID_REQUEST)
            _send(client, _error_response(None, error))
            return
        slots = min(len(batch), self._max_in_flight - self._in_flight.get(client, 0))
        if slots > 0 and self._take(client, slots):
            nursery.start_soon(self._answer_batch, client, batch, slots)
            return
        busy = [_error_response(_id_of(r), self._busy()) for r in batch if _answered(r)]
        if busy:
            _send(client, busy)

    def _take(self, client: Client, slots: int) -> bool:
        count = self._in_flight.get(client, 0)
        if count + slots > self._max_in_flight:
            return False
        self._in_flight[client] = count + slots
        return True

    def _release(self, client: Client, slots: int) -> None:
        count = self._in_flight[client] - slots
        if count:
            self._in_flight[client] = count
        else:
            del self._in_flight[client]

    async def _answer_one(self, client: Client, request: Any) -> None:
        # The slot is released before the response is queued: a client that sends its next
        # request as soon as it reads a response is never told it has too many in flight.
        try:
            response = await self.call(self._context(client), request)
        finally:
            self._release(client, 1)
        if response is not None:
            _send(client, response)

    async def _answer_batch(self, client: Client, batch: list[Any], slots: int) -> None:
        responses: list[dict[str, Any] | None] = [None] * len(batch)
        try:
            context = self._context(client)
            limiter = trio.CapacityLimiter(slots)
            async with trio.open_nursery() as requests:
                for index, request in enumerate(batch):
                    requests.start_soon(self._fill, responses, index, context, request, limiter)
        finally:
            self._release(client, slots)
        answered = [response for response in responses if response is not None]
        if answered:
            _send(client, answered)

    async def _fill(
        self,
        responses: list[dict[str, Any] | None],
        index: int,
        context: C,
        request: Any,
        limiter: trio.CapacityLimiter,
    ) -> None:
        async with limiter:
            responses[index] = await self.call(context, request)

    async def call(self, context: C, request: Any) -> dict[str, Any] | None:
        """Answer one request object; None for a notification (a request without ``id``).

        Never raises but ``trio.Cancelled``: a method's own failure becomes an internal error
        response (and a logged traceback). Cancellation: the method is cancelled (see each
        method for what it leaves done) and nothing is returned.
        """
        problem = _request_problem(request)
        if problem is not None:
            return _error_response(_id_of(request), problem)
        try:
            result = await self._run(context, request["method"], request.get("params", {}))
        except RpcError as error:
            response = _error_response(request.get("id"), error)
        except Exception:
            log.exception("method %s failed", request["method"])
            internal = RpcError("internal error: see the server log")
            response = _error_response(request.get("id"), internal)
        else:
            response = {"jsonrpc": "2.0", "id": request.get("id"), "result": result}
        return response if "id" in request else None

    async def _run(self, context: C, name: str, params: Any) -> Any:
        method = self._methods.get(name)
        if method is None:
            raise RpcError(f"no method {_clip(name)!r}", code=METHOD_NOT_FOUND)
        if not isinstance(params, Mapping):
            raise RpcError(
                "invalid params: params must be an object of named parameters",
                code=INVALID_PARAMS,
            )
        try:
            parsed = method.params.model_validate(params)
        except pydantic.ValidationError as exc:
            raise _invalid_params(exc) from None
        return await method.handler(context, parsed)

    def _busy(self) -> RpcError:
        return Busy(
            f"{self._max_in_flight} requests are already running on this connection: "
            "wait for a response before sending more"
        )


class _Unparsable(Exception):
    pass


def _parse(frame: str | bytes) -> Any:
    try:
        payload = json.loads(frame)
    except RecursionError:
        raise _Unparsable("not JSON that can be read: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Unparsable(f"not JSON: {_clip(str(exc), 200)}") from None
    # "\ud800" is valid JSON but no Unicode text: it could be neither stored nor sent back.
    # Only a frame with a \u escape can hold one, so only those pay for the check.
    if isinstance(frame, bytes) or "\\u" in frame:
        try:
            json.dumps(payload, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise _Unparsable(
                "not JSON that can be read: a \\u escape makes a lone UTF-16 surrogate"
            ) from None
        except RecursionError:
            raise _Unparsable("not JSON that can be read: nested too deeply") from None
    return payload


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, str | int) and not isinstance(value, bool))


def _id_of(request: Any) -> Any:
    """The id to answer ``request`` with: its own if it is a usable one, else null."""
    if isinstance(request, dict) and _valid_id(request.get("id")):
        return request.get("id")
    return None


def _answered(request: Any) -> bool:
    """Whether ``request`` gets a response: anything but a valid notification does."""
    return _request_problem(request) is not None or "id" in request


def _request_problem(request: Any) -> RpcError | None:
    """Why ``request`` is not a JSON-RPC 2.0 request object, or None if it is one."""
    if not isinstance(request, dict) or request.get("jsonrpc") != "2.0":
        reason = 'expected an object with "jsonrpc": "2.0"'
    elif not isinstance(request.get("method"), str):
        reason = '"method" must be a string'
    elif not _valid_id(request.get("id")):
        reason = '"id" must be a string, an integer or null'
    elif not isinstance(request.get("params", {}), dict | list):
        reason = '"params" must be an object'
    else:
        return None
    return RpcError(f"not a JSON-RPC 2.0 request: {reason}", code=INVALID_REQUEST)


def _error_response(request_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_json()}


def _send(client: Client, response: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Queue ``response`` (or a batch of them) for ``client``, as one frame.

    A result that cannot be encoded is answered with an internal error instead (and logged):
    one bad result must not cost the client its connection.
    """
    if isinstance(response, list):
        client.reply("[" + ",".join(map(_encode, response)) + "]")
    else:
        client.reply(_encode(response))


def _encode(response: dict[str, Any]) -> str:
    try:
        return dumps(response)
    except (TypeError, ValueError):
        log.exception("cannot encode the response to request %r", response.get("id"))
        error = RpcError("internal error: see the server log")
        return dumps(_error_response(response.get("id"), error))


MAX_PROBLEMS = 10
"""Most invalid fields an error message lists (the first ones)."""


def _invalid_params(exc: pydantic.ValidationError) -> RpcError:
    problems = []
    for error in exc.errors(include_url=False)[:MAX_PROBLEMS]:
        where = ".".join(_clip(str(part)) for part in error["loc"]) or "params"
        problems.append({"field": where, "problem": _explain(error)})
    message = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    if exc.error_count() > MAX_PROBLEMS:
        message += f"; and {exc.error_count() - MAX_PROBLEMS} more"
    return RpcError(f"invalid params: {message}", code=INVALID_PARAMS, data=problems)


def _explain(error: Any) -> str:
    """Pydantic's message, in the words of a JSON client."""
    if error["type"] == "extra_forbidden":
        return "unknown parameter"
    if error["type"] == "missing":
        return "required"
    return str(error["msg"])


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."

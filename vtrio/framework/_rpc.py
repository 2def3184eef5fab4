"""JSON-RPC 2.0 over the ``/ws`` connection.

Requests are ``{"jsonrpc": "2.0", "id": ..., "method": ..., "params": {...}}``; each gets a
response with ``result`` or ``error``, in its own frame. A JSON array is a batch, answered by one
frame holding the array of responses. Change messages from the hub are interleaved with
responses on the same connection; they carry no ``id`` and no ``jsonrpc``.

Every request runs in a task of the connection's own, so the reader keeps reading
(and answering pings) while it runs. At most ``max_in_flight`` requests run at once per
connection; one more is answered at once with :data:`BUSY`. A batch takes as many of the free
slots as it has requests (at least one, else all its requests are answered with :data:`BUSY`)
and runs its requests concurrently within them; its responses come in one frame, in the order
of the requests, notifications left out. When the connection closes, its requests are
cancelled: a database write already sent still completes (see :mod:`vtrio.framework._database`),
but no response is sent. When the server stops before a request is done, the request is
answered with :data:`SHUTTING_DOWN` before the connection closes.

Request ids are strings, integers or null; parameters are named (a JSON object) and validated
by the method's pydantic model: unknown fields and wrong types are errors, never coerced.

A bad request never closes the connection and never changes data. (A frame larger than
``--max-message-size`` is not read at all: the websocket layer closes the connection with 1009,
see :mod:`vtrio.framework._connection`.) Errors:

======  ==========================================================================
-32700  the frame is not JSON (or nested too deeply, holds a lone UTF-16 surrogate, or NaN)
-32600  not a JSON-RPC 2.0 request (or an empty batch, one of more than MAX_BATCH, or a
        frame larger than MAX_REQUEST_SIZE)
-32601  no such method
-32602  invalid params: the message names each wrong field and what was expected;
        ``error.data`` lists them as ``{"field": ..., "problem": ...}``
-32603  internal error (logged on the server)
-32000  the server stopped before the request was done
404     not found (also: exists, but the caller may not read it)
403     forbidden: the caller may read it but not change it
409     conflict: e.g. a sample of that name exists
429     busy: too many requests in flight on this connection, or no capacity
502     an upstream service (NCBI) failed or refused
======  ==========================================================================
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pydantic
import trio

from vtrio.framework._connection import Connection, message_size
from vtrio.framework._metrics import Metrics
from vtrio.framework._wire import dumps

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

Handler = Callable[[Any, P], Awaitable[Any]]
"""``await handler(identity, params)``: a method's answer for the user ``identity``."""


@dataclass(frozen=True)
class Method(Generic[P]):
    """One callable method: its parameter model and the coroutine that answers it."""

    params: type[P]
    handler: Handler[P]


class Methods:
    """A table of methods by name: ``Methods({"samples.get": Method(IdParams, get)})``.

    Tables join with ``|``; a name in both is an error, not an override.
    """

    def __init__(self, methods: Mapping[str, Method[Any]] | None = None) -> None:
        self._methods = dict(methods or {})

    def __or__(self, other: Methods) -> Methods:
        if twice := self._methods.keys() & other._methods.keys():
            raise ValueError(f"methods registered twice: {sorted(twice)}")
        return Methods({**self._methods, **other._methods})

    def get(self, name: str) -> Method[Any] | None:
        return self._methods.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._methods)


SHUTTING_DOWN = -32000
"""A request the server did not finish because it is stopping (implementation-defined code)."""
MAX_REQUEST_SIZE = 256 * 1024
"""The largest frame read as JSON-RPC, in bytes: a larger one is refused unread."""


class RpcEndpoint:
    """Answers the JSON-RPC requests that arrive on every connection.

    Fairness: a frame larger than ``max_request_size`` is refused before it is parsed (give
    the connections :attr:`max_request_size` as their ``max_parsed_size`` and
    :meth:`on_oversized`, and it is not even decoded), and
    parameters with more fields than the method takes are refused before pydantic looks at
    them, so that no request costs the server work out of proportion to a valid one. Frames
    refused as too large or not JSON are charged to their connection
    (:meth:`Connection.charge_refused`): one that keeps sending them is read slower.
    """

    def __init__(
        self,
        methods: Methods,
        *,
        max_in_flight: int = 16,
        max_request_size: int = MAX_REQUEST_SIZE,
        metrics: Metrics | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._metrics = metrics
        self._methods = methods
        self._max_in_flight = max_in_flight
        self._max_request_size = max_request_size

    @property
    def max_request_size(self) -> int:
        """The largest frame read as JSON-RPC, in bytes."""
        return self._max_request_size

    def on_oversized(self, connection: Connection, size: int) -> None:
        """Refuse a frame of ``size`` bytes, larger than :attr:`max_request_size`, unread."""
        connection.charge_refused(size)
        problem = f"a request is at most {self._max_request_size} bytes, not {size}"
        _send(connection, _error_response(None, RpcError(problem, code=INVALID_REQUEST)))

    def on_message(self, connection: Connection, frame: str | bytes) -> None:
        """Handle one frame: start its request(s) in tasks of the connection's own (so that
        they end with it). Never raises for bad input, and never waits: errors found here are
        answered at once."""
        size = message_size(frame)  # bytes, as the limit and the pacing count them
        if size > self._max_request_size:
            self.on_oversized(connection, size)
            return
        try:
            payload = _parse(frame)
        except _Unparsable as exc:
            connection.charge_refused(size)
            _send(connection, _error_response(None, RpcError(str(exc), code=PARSE_ERROR)))
            return
        if isinstance(payload, list):
            self._start_batch(connection, payload)
        elif self._take(connection, 1):
            connection.start_soon(self._answer_one, connection, payload)
        elif _answered(payload):
            _send(connection, _error_response(_id_of(payload), self._busy()))

    def _start_batch(self, connection: Connection, batch: list[Any]) -> None:
        if not 0 < len(batch) <= MAX_BATCH:
            error = RpcError(f"a batch holds 1 to {MAX_BATCH} requests", code=INVALID_REQUEST)
            _send(connection, _error_response(None, error))
            return
        slots = min(len(batch), self._max_in_flight - connection.requests_in_flight)
        if slots > 0 and self._take(connection, slots):
            connection.start_soon(self._answer_batch, connection, batch, slots)
            return
        busy = [_error_response(_id_of(r), self._busy()) for r in batch if _answered(r)]
        if busy:
            _send(connection, busy)

    def _take(self, connection: Connection, slots: int) -> bool:
        if connection.requests_in_flight + slots > self._max_in_flight:
            return False
        connection.requests_in_flight += slots
        return True

    async def _answer_one(self, connection: Connection, request: Any) -> None:
        # The slot is released before the response is queued: a client that sends its next
        # request as soon as it reads a response is never told it has too many in flight.
        try:
            response = await self._call_or_refuse(connection, request)
        finally:
            connection.requests_in_flight -= 1
        if response is not None:
            _send(connection, response)

    async def _answer_batch(self, connection: Connection, batch: list[Any], slots: int) -> None:
        responses: list[dict[str, Any] | None] = [None] * len(batch)
        try:
            limiter = trio.CapacityLimiter(slots)
            async with trio.open_nursery() as requests:
                for index, request in enumerate(batch):
                    requests.start_soon(self._fill, responses, index, connection, request, limiter)
        finally:
            connection.requests_in_flight -= slots
        answered = [response for response in responses if response is not None]
        if answered:
            _send(connection, answered)

    async def _fill(
        self,
        responses: list[dict[str, Any] | None],
        index: int,
        connection: Connection,
        request: Any,
        limiter: trio.CapacityLimiter,
    ) -> None:
        async with limiter:
            responses[index] = await self._call_or_refuse(connection, request)

    async def _call_or_refuse(self, connection: Connection, request: Any) -> dict[str, Any] | None:
        """:meth:`call`, unless the connection is closing; cancelled (the server is
        stopping), the request is answered with :data:`SHUTTING_DOWN` before it ends."""
        try:
            return await self.call(connection.identity, request)
        except trio.Cancelled:
            if _answered(request):
                error = RpcError("the server is stopping: the request was not completed; "
                                 "retry on another connection", code=SHUTTING_DOWN)  # fmt: skip
                _send(connection, _error_response(_id_of(request), error))
            raise

    async def call(self, identity: Any, request: Any) -> dict[str, Any] | None:
        """Answer one request object for ``identity``; None for a notification.

        Never raises but ``trio.Cancelled``: a method's own failure becomes an internal error
        response (and a logged traceback). Cancellation: the method is cancelled (see each
        method for what it leaves done) and nothing is returned.
        """
        problem = _request_problem(request)
        if problem is not None:
            return _error_response(_id_of(request), problem)
        started = time.perf_counter()
        outcome = "ok"
        try:
            result = await self._run(identity, request["method"], request.get("params", {}))
        except RpcError as error:
            outcome = str(error.code)
            response = _error_response(request.get("id"), error)
        except Exception:
            log.exception("method %s failed", request["method"])
            outcome = str(INTERNAL_ERROR)
            internal = RpcError("internal error: see the server log")
            response = _error_response(request.get("id"), internal)
        else:
            response = {"jsonrpc": "2.0", "id": request.get("id"), "result": result}
        self._measure(request["method"], outcome, time.perf_counter() - started)
        return response if "id" in request else None

    def _measure(self, name: str, outcome: str, seconds: float) -> None:
        if self._metrics is None:
            return
        method = name if self._methods.get(name) is not None else "unknown"  # bounded labels
        self._metrics.rpc_calls.labels(method, outcome).inc()
        self._metrics.rpc_seconds.labels(method).observe(seconds)

    async def _run(self, identity: Any, name: str, params: Any) -> Any:
        method = self._methods.get(name)
        if method is None:
            raise RpcError(f"no method {_clip(name)!r}", code=METHOD_NOT_FOUND)
        if not isinstance(params, Mapping):
            raise RpcError(
                "invalid params: params must be an object of named parameters",
                code=INVALID_PARAMS,
            )
        _refuse_unknown_fields(method.params, params)
        try:
            parsed = method.params.model_validate(params)
        except pydantic.ValidationError as exc:
            raise _invalid_params(exc) from None
        return await method.handler(identity, parsed)

    def _busy(self) -> RpcError:
        return Busy(
            f"{self._max_in_flight} requests are already running on this connection: "
            "wait for a response before sending more"
        )


def _refuse_unknown_fields(model: type[Params], params: Mapping[str, Any]) -> None:
    """Refuse parameters the model does not have, cheaply, before pydantic's per-field work
    (tens of thousands of unknown fields would cost the event loop seconds)."""
    unknown = [name for name in itertools.islice(params, len(model.model_fields) + MAX_PROBLEMS)
               if name not in model.model_fields]  # fmt: skip
    if len(params) <= len(model.model_fields) and not unknown:
        return
    unknown = unknown or [name for name in params if name not in model.model_fields]
    problems = [{"field": _clip(str(name)), "problem": "unknown parameter"}
                for name in unknown[:MAX_PROBLEMS]]  # fmt: skip
    message = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    extra = sum(1 for name in params if name not in model.model_fields) - len(problems)
    if extra > 0:
        message += f"; and {extra} more"
    raise RpcError(f"invalid params: {message}", code=INVALID_PARAMS, data=problems)


class _Unparsable(Exception):
    pass


def _parse(frame: str | bytes) -> Any:
    try:
        payload = json.loads(frame, parse_constant=_refuse_constant)
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


def _refuse_constant(name: str) -> Any:
    # Python reads NaN, Infinity and -Infinity; JSON (RFC 8259) has no such values.
    raise ValueError(f"{name} is not a JSON value")


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


def _send(connection: Connection, response: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Queue ``response`` (or a batch of them) for ``connection``, as one frame.

    A result that cannot be encoded is answered with an internal error instead (and logged):
    one bad result must not cost the client its connection.
    """
    if isinstance(response, list):
        connection.reply("[" + ",".join(map(_encode, response)) + "]")
    else:
        connection.reply(_encode(response))


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

"""The baseline's JSON-RPC methods: the same calls, checks and database work as vtrio's."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pydantic
from pymongo.errors import DuplicateKeyError

from benchmarks.baseline.db import message_data
from benchmarks.baseline.dispatcher import Connection
from vtrio.framework import dumps
from vtrio.virtool import (
    RIGHTS,
    CreateJobParams,
    CreateSampleParams,
    IdParams,
    UpdateSampleParams,
    access_of,
    can_read,
    can_write,
    writable_filter,
)

if TYPE_CHECKING:
    from benchmarks.baseline.server import State

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 16


class RpcError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# The same parameters as vtrio's methods, validated by the same models: the same work.
Params = pydantic.BaseModel
CreateSample = CreateSampleParams
ById = IdParams
UpdateSample = UpdateSampleParams
CreateJob = CreateJobParams


def _check_reads(uploads: Path, name: str) -> None:
    """The checks vtrio.uploads makes: inside uploads/, a regular file, starting with '@'."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise RpcError(f"invalid params: reads: {name!r} is not inside uploads/", -32602)
    root = uploads.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise RpcError(f"invalid params: reads: no file {name!r} in uploads/", -32602)
    with path.open("rb") as file:
        if not file.read(4096).startswith(b"@"):
            raise RpcError(f"invalid params: reads: {name!r} is not FASTQ", -32602)


async def samples_create(state: State, conn: Connection, p: CreateSample) -> Any:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _check_reads, state.uploads, p.reads)
    document = {
        "_id": secrets.token_hex(8),
        **p.model_dump(),
        "user": conn.identity.user_id,
        "created_at": datetime.now(UTC),
        "quality": None,
    }
    try:
        inserted = await state.db.samples.insert_one(document)
    except DuplicateKeyError:
        raise RpcError(f"a sample named {p.name!r} exists", 409) from None
    return message_data(inserted)


async def _readable(state: State, conn: Connection, sample_id: str) -> dict[str, Any]:
    sample = await state.db.samples.find_one({"_id": sample_id})
    if sample is None or not can_read(conn.identity, sample):
        raise RpcError(f"no sample {sample_id!r}", 404)
    return sample  # type: ignore[no-any-return]


async def _writable(state: State, conn: Connection, sample_id: str) -> dict[str, Any]:
    sample = await _readable(state, conn, sample_id)
    if not can_write(conn.identity, sample):
        raise RpcError(f"you may not change sample {sample_id!r}", 403)
    return sample


async def samples_get(state: State, conn: Connection, p: ById) -> Any:
    return message_data(await _readable(state, conn, p.id))


async def samples_update(state: State, conn: Connection, p: UpdateSample) -> Any:
    """As vtrio's: one findAndModify whose filter checks the caller's rights; only a refusal
    costs a second look, to say why (vtrio.virtool's SampleMethods.update)."""
    changes = p.model_dump(exclude={"id"}, exclude_none=True)
    if not changes:
        return message_data(await _writable(state, conn, p.id))
    owners = bool(changes.keys() & {"name", "group", *RIGHTS})
    query: dict[str, Any] = {"$and": [{"_id": p.id}, writable_filter(conn.identity)]}
    if owners and not conn.identity.admin:
        query["$and"].append({"user": conn.identity.user_id})
    try:
        updated = await state.db.samples.find_one_and_update(query, {"$set": changes})
    except DuplicateKeyError:
        raise RpcError(f"a sample named {p.name!r} exists", 409) from None
    if updated is None:
        sample = await _writable(state, conn, p.id)  # 404 or 403
        if owners and not (conn.identity.admin or sample.get("user") == conn.identity.user_id):
            raise RpcError("only the sample's owner or an administrator may do that", 403)
        raise RpcError(f"no sample {p.id!r}", 404)
    if changes.keys() & {"group", *RIGHTS}:
        access = access_of(updated)
        await state.db.jobs.update_many({"sample_id": p.id}, {"$set": {"access": access}}, True)
    return message_data(updated)


async def jobs_create(state: State, conn: Connection, p: CreateJob) -> Any:
    sample = await _writable(state, conn, p.sample_id)
    job = await state.db.jobs.insert_one(
        {
            "_id": secrets.token_hex(8),
            "task": p.task,
            "sample_id": p.sample_id,
            "user": conn.identity.user_id,
            "access": access_of(sample),
            "state": "waiting",
            "progress": 0,
            "created_at": datetime.now(UTC),
        }
    )
    state.jobs.notify()
    return message_data(job)


async def _readable_job(state: State, conn: Connection, job_id: str) -> dict[str, Any]:
    job = await state.db.jobs.find_one({"_id": job_id})
    if job is None or not can_read(conn.identity, job["access"]):
        raise RpcError(f"no job {job_id!r}", 404)
    return job  # type: ignore[no-any-return]


async def jobs_get(state: State, conn: Connection, p: ById) -> Any:
    return message_data(await _readable_job(state, conn, p.id))


async def jobs_cancel(state: State, conn: Connection, p: ById) -> Any:
    job = await _readable_job(state, conn, p.id)
    await _writable(state, conn, job["sample_id"])
    cancelled = await state.jobs.cancel(p.id)
    if cancelled is None:
        job = await _readable_job(state, conn, p.id)
        raise RpcError(f"job {p.id!r} is {job['state']} and cannot be cancelled", 409)
    return message_data(cancelled)


async def system_info(state: State, conn: Connection, p: NoParams) -> Any:
    """As vtrio's ``system.info``, with the same database work (one aggregate of the jobs by
    state); the baseline has no change feed, so no position."""
    counts = dict.fromkeys(JOB_STATES, 0)
    for group in await state.db.jobs.aggregate(
        [{"$group": {"_id": "$state", "count": {"$sum": 1}}}]
    ):
        if group["_id"] in counts:
            counts[group["_id"]] = group["count"]
    return {
        "version": "baseline",
        "uptime": round(time.monotonic() - state.started_at, 3),
        "connections": len(state.dispatcher.connections),
        "jobs": counts,
    }


class NoParams(Params):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


JOB_STATES = ("waiting", "running", "complete", "cancelled", "error")

Handler = Callable[[Any, Connection, Any], Awaitable[Any]]
METHODS: dict[str, tuple[type[Params], Handler]] = {
    "samples.create": (CreateSample, samples_create),
    "samples.get": (ById, samples_get),
    "samples.update": (UpdateSample, samples_update),
    "jobs.create": (CreateJob, jobs_create),
    "jobs.get": (ById, jobs_get),
    "jobs.cancel": (ById, jobs_cancel),
    "system.info": (NoParams, system_info),
}


def on_message(state: State, conn: Connection, text: str) -> None:
    """Start a task answering one request frame (or answer a malformed one at once)."""
    try:
        payload = json.loads(text)
    except ValueError as exc:
        _reply_soon(conn, _error(None, RpcError(f"not JSON: {exc}", -32700)))
        return
    if len(conn.tasks) >= MAX_IN_FLIGHT:
        if isinstance(payload, dict) and "id" in payload:
            _reply_soon(conn, _error(payload["id"], RpcError("busy", 429)))
        return
    task = asyncio.create_task(_answer(state, conn, payload))
    conn.tasks.add(task)
    task.add_done_callback(conn.tasks.discard)


def _reply_soon(conn: Connection, response: dict[str, Any]) -> None:
    task = asyncio.create_task(conn.send(dumps(response)))
    conn.tasks.add(task)
    task.add_done_callback(conn.tasks.discard)


async def _answer(state: State, conn: Connection, payload: Any) -> None:
    if isinstance(payload, list):
        answers = await asyncio.gather(*(call(state, conn, request) for request in payload))
        responses = [answer for answer in answers if answer is not None]
        if responses:
            await conn.send(dumps(responses))
        return
    response = await call(state, conn, payload)
    if response is not None:
        await conn.send(dumps(response))


async def call(state: State, conn: Connection, request: Any) -> dict[str, Any] | None:
    if not (
        isinstance(request, dict)
        and request.get("jsonrpc") == "2.0"
        and isinstance(request.get("method"), str)
    ):
        return _error(None, RpcError("not a JSON-RPC 2.0 request", -32600))
    request_id = request.get("id")
    try:
        method = METHODS.get(request["method"])
        if method is None:
            raise RpcError(f"no method {request['method']!r}", -32601)
        model, handler = method
        try:
            params = model.model_validate(request.get("params", {}))
        except pydantic.ValidationError as exc:
            raise RpcError(f"invalid params: {exc.error_count()} errors", -32602) from None
        result = await handler(state, conn, params)
    except RpcError as error:
        response = _error(request_id, error)
    except Exception:
        log.exception("method %s failed", request.get("method"))
        response = _error(request_id, RpcError("internal error", -32603))
    else:
        response = {"jsonrpc": "2.0", "id": request_id, "result": result}
    return response if "id" in request else None


def _error(request_id: Any, error: RpcError) -> dict[str, Any]:
    error_object = {"code": error.code, "message": str(error)}
    return {"jsonrpc": "2.0", "id": request_id, "error": error_object}

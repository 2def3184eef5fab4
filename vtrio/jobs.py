"""Jobs: long computations that live in MongoDB and run in the process pool.

A job goes ``waiting -> running -> complete | cancelled | error``; every change of state and of
progress (0..1, a few updates a second at most) is written through the database layer, so
watchers see it live. The :class:`JobRunner` service claims waiting jobs atomically (two runners
never run one job) and runs at most ``concurrency`` of them at once.

What happens to a running job:

- ``jobs.cancel``: its work is cancelled (the worker process is killed) and it is marked
  ``cancelled`` before the call returns.
- a graceful shutdown: its work is cancelled and it goes back to ``waiting``, to run again after
  the next start.
- a crash of the server: it stays ``running`` in MongoDB until this runner starts again and puts
  it back to ``waiting``. No job is lost.

The one task so far is ``sample_stats``: the read statistics of a sample's FASTQ file (see
:mod:`vtrio.fastq`), stored on the sample as ``quality`` (dispatched as a sample update).
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import trio
from pydantic import Field, StringConstraints

from vtrio import access
from vtrio.db.documents import message_data
from vtrio.fastq import read_statistics
from vtrio.rpc import Conflict, Methods, NotFound, Params
from vtrio.samples import access_of, writable_sample

if TYPE_CHECKING:
    from vtrio.api import Call
    from vtrio.db import Database
    from vtrio.executors import Executors
    from vtrio.uploads import Uploads

log = logging.getLogger(__name__)

STATES = ("waiting", "running", "complete", "cancelled", "error")
FINAL_WRITE_TIMEOUT = 5.0
"""How long a job's last write may take when the runner is being cancelled."""

Job = dict[str, Any]


def runner_name(data_dir: Path) -> str:
    """Stable across restarts of the same server, different for servers elsewhere: a restart
    puts back only the jobs this server was running when it crashed."""
    return f"{socket.gethostname()}:{data_dir}"


@dataclass
class _Running:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class JobRunner:
    """Claims waiting jobs and runs them, ``concurrency`` at a time."""

    def __init__(
        self,
        db: Database,
        executors: Executors,
        uploads: Uploads,
        *,
        name: str,
        concurrency: int = 2,
        poll_interval: float = 2.0,
    ) -> None:
        self.db = db
        self.executors = executors
        self.uploads = uploads
        self.name = name
        self._slots = trio.CapacityLimiter(concurrency)
        self._poll_interval = poll_interval
        self._wakeup = trio.lowlevel.ParkingLot()
        self._running: dict[str, _Running] = {}

    @asynccontextmanager
    async def running(self) -> AsyncIterator[JobRunner]:
        """Run jobs for the block. On exit, running jobs are cancelled and put back to
        ``waiting`` (each final write shielded, bounded by FINAL_WRITE_TIMEOUT)."""
        await self._requeue({"state": "running", "runner": self.name})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._claim_forever, nursery)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    def notify(self) -> None:
        """A job was created: look for work now rather than at the next poll."""
        self._wakeup.unpark_all()

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a waiting job, or stop a job this runner is running; return it afterwards.

        Returns None if the job is neither waiting nor running here.
        """
        cancelled = await self.db.jobs.find_one_and_update(
            {"_id": job_id, "state": "waiting"},
            {"$set": {"state": "cancelled", "finished_at": datetime.now(UTC)}},
        )
        if cancelled is not None:
            return cancelled
        running = self._running.get(job_id)
        if running is None:
            return None
        running.scope.cancel()
        await running.done.wait()
        return await self.db.jobs.find_one({"_id": job_id})

    async def _requeue(self, query: dict[str, Any]) -> None:
        await self.db.jobs.update_many(query, {"$set": {"state": "waiting", "progress": 0}})

    async def _claim_forever(self, nursery: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()
            try:
                job = await self._claim()
            except BaseException:
                self._slots.release()
                raise
            if job is None:
                self._slots.release()
                with trio.move_on_after(self._poll_interval):
                    await self._wakeup.park()
                continue
            nursery.start_soon(self._run, job)

    async def _claim(self) -> Job | None:
        return await self.db.jobs.find_one_and_update(
            {"state": "waiting"},
            {
                "$set": {
                    "state": "running",
                    "runner": self.name,
                    "started_at": datetime.now(UTC),
                    "progress": 0,
                }
            },
            sort=[("created_at", 1)],
        )

    async def _run(self, job: Job) -> None:
        running = self._running[job["_id"]] = _Running()
        try:
            try:
                with running.scope:
                    await self._perform(job)
            except Exception as exc:
                log.warning("job %s failed: %s", job["_id"], exc, exc_info=not _expected(exc))
                await self._finish(job, "error", error=str(exc))
            except BaseException:  # the runner itself is cancelled: the server is stopping
                with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_TIMEOUT):
                    await self._finish(job, "waiting", progress=0)
                raise
            else:
                if running.scope.cancelled_caught:
                    await self._finish(job, "cancelled")
                else:
                    await self._finish(job, "complete", progress=1.0)
        finally:
            del self._running[job["_id"]]
            running.done.set()
            self._slots.release()

    async def _perform(self, job: Job) -> None:
        task = TASKS[job["task"]]
        await task(self, job, self._progress_reporter(job["_id"]))

    def _progress_reporter(self, job_id: str) -> Callable[[float], Awaitable[None]]:
        async def report(fraction: float) -> None:
            await self.db.jobs.update_one(
                {"_id": job_id, "state": "running"}, {"$set": {"progress": round(fraction, 4)}}
            )

        return report

    async def _finish(self, job: Job, state: str, **fields: Any) -> None:
        finished = {"finished_at": datetime.now(UTC)} if state != "waiting" else {}
        await self.db.jobs.update_one(
            {"_id": job["_id"], "runner": self.name},
            {"$set": {"state": state, **finished, **fields}},
        )
        log.info("job %s (%s): %s", job["_id"], job["task"], state)


def _expected(exc: Exception) -> bool:
    """Failures that are the input's fault, not vtrio's: no traceback in the log."""
    return isinstance(exc, ValueError | OSError)


async def sample_stats(
    runner: JobRunner, job: Job, on_progress: Callable[[float], Awaitable[None]]
) -> None:
    """Compute the read statistics of the job's sample and store them as its ``quality``."""
    sample = await runner.db.samples.find_one({"_id": job["sample_id"]})
    if sample is None:
        raise ValueError(f"sample {job['sample_id']!r} was deleted")
    path = await runner.uploads.resolve(sample["reads"])
    quality = await read_statistics(
        path,
        run_in_process=runner.executors.run_in_process,
        run_in_thread=runner.executors.run_in_thread,
        on_progress=on_progress,
    )
    await runner.db.samples.update_one({"_id": sample["_id"]}, {"$set": {"quality": quality}})


TASKS: dict[str, Callable[[JobRunner, Job, Callable[[float], Awaitable[None]]], Awaitable[None]]]
TASKS = {"sample_stats": sample_stats}

# --- the jobs.* methods -------------------------------------------------------------------------

methods: Methods[Call] = Methods()
Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]


async def create_indexes(db: Database) -> None:
    await db.jobs.create_index([("state", 1), ("created_at", 1)])
    await db.jobs.create_index("sample_id")


class CreateParams(Params):
    task: Literal["sample_stats"]
    sample_id: Id


class IdParams(Params):
    id: Id


class ListParams(Params):
    state: Literal["waiting", "running", "complete", "cancelled", "error"] | None = None
    sample_id: Id | None = None
    skip: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    limit: Annotated[int, Field(ge=1, le=100)] = 25


@methods.method("jobs.create", CreateParams)
async def create(call: Call, params: CreateParams) -> dict[str, Any]:
    sample = await writable_sample(call, params.sample_id)
    job = await call.app.db.jobs.insert_one(
        {
            "_id": secrets.token_hex(8),
            "task": params.task,
            "sample_id": params.sample_id,
            "user": call.identity.user_id,
            "access": access_of(sample),
            "state": "waiting",
            "progress": 0,
            "created_at": datetime.now(UTC),
        }
    )
    call.app.jobs.notify()
    return message_data(job)


@methods.method("jobs.get", IdParams)
async def get(call: Call, params: IdParams) -> dict[str, Any]:
    return message_data(await _readable_job(call, params.id))


@methods.method("jobs.list", ListParams)
async def list_jobs(call: Call, params: ListParams) -> dict[str, Any]:
    query: dict[str, Any] = access.readable_filter(call.identity, within="access")
    for name in ("state", "sample_id"):
        if (value := getattr(params, name)) is not None:
            query = {"$and": [query, {name: value}]}
    found = await call.app.db.jobs.find(
        query, sort=[("created_at", -1)], skip=params.skip, limit=params.limit
    )
    return {
        "items": [message_data(job) for job in found],
        "total": await call.app.db.jobs.count_documents(query),
        "skip": params.skip,
        "limit": params.limit,
    }


@methods.method("jobs.cancel", IdParams)
async def cancel(call: Call, params: IdParams) -> dict[str, Any]:
    job = await _readable_job(call, params.id)
    await writable_sample(call, job["sample_id"])
    cancelled = await call.app.jobs.cancel(params.id)
    if cancelled is None:
        job = await _readable_job(call, params.id)
        raise Conflict(f"job {params.id!r} is {job['state']} and cannot be cancelled")
    return message_data(cancelled)


async def _readable_job(call: Call, job_id: str) -> Job:
    job = await call.app.db.jobs.find_one({"_id": job_id})
    if job is None or not access.can_read(call.identity, job["access"]):
        raise NotFound(f"no job {job_id!r}")
    return job


async def count_by_state(db: Database) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for group in await db.jobs.aggregate([{"$group": {"_id": "$state", "count": {"$sum": 1}}}]):
        counts[group["_id"]] = group["count"]
    return counts

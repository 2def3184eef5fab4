"""Jobs: long computations that live in MongoDB and run in the process pool.

A job goes ``waiting -> running -> complete | cancelled | error``; every change of state and of
progress (0..1, a few updates a second at most) is written through the database layer, so
watchers see it live. The :class:`JobRunner` service claims waiting jobs atomically (two runners
never run one job) and runs at most ``concurrency`` of them at once. A sample has at most one
waiting or running job per task (a unique partial index says so, race-free).

What happens to a running job:

- ``jobs.cancel``: its work is cancelled (the worker process computing for it is killed) and it
  is marked ``cancelled`` before the call returns.
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
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import trio
from pydantic import Field, StringConstraints

from vtrio import access
from vtrio.db.documents import message_data
from vtrio.db.errors import DatabaseError, DuplicateKey
from vtrio.fastq import read_statistics
from vtrio.rpc import Conflict, Forbidden, Methods, NotFound, Params
from vtrio.samples import now, writable_sample

if TYPE_CHECKING:
    from vtrio.api import Call
    from vtrio.db import Database
    from vtrio.executors import Executors
    from vtrio.uploads import Uploads

log = logging.getLogger(__name__)

STATES = ("waiting", "running", "complete", "cancelled", "error")
ACTIVE = ("waiting", "running")
FINAL_WRITE_TIMEOUT = 5.0
"""How long a job's last write may take, shielded from the cancellation of its runner."""
CLAIM_WAIT = 5.0
"""Longest ``cancel`` waits for a claim of the job in flight to be registered."""

Job = dict[str, Any]
ProgressReport = Callable[[float], Awaitable[None]]


class JobFailed(Exception):
    """A job cannot be done, for a reason the message gives (no traceback is logged)."""


def runner_name(data_dir: Path) -> str:
    """Stable across restarts of the same server, different for servers elsewhere: a restart
    puts back only the jobs this server was running when it crashed."""
    return f"{socket.gethostname()}:{data_dir}"


@dataclass
class _Running:
    job: Job
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class JobRunner:
    """Claims waiting jobs and runs them, ``concurrency`` at a time.

    New jobs are found by :meth:`notify` (the ``jobs.create`` method calls it) or, for jobs
    created elsewhere, by polling every ``poll_interval`` seconds.
    """

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
        # A semaphore, not a CapacityLimiter: a slot is taken by the claiming task and given
        # back by the task that ran the job.
        self._slots = trio.Semaphore(concurrency)
        self._poll_interval = poll_interval
        self._wakeup = trio.lowlevel.ParkingLot()
        self._notified = False
        self._claiming = False
        self._claimed = trio.lowlevel.ParkingLot()
        self._running: dict[str, _Running] = {}
        self._stop = trio.CancelScope()

    @property
    def running_jobs(self) -> list[str]:
        """Ids of the jobs this runner is running now."""
        return list(self._running)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[JobRunner]:
        """Run jobs for the block.

        At the start, jobs this runner left ``running`` (a crash) go back to ``waiting``. On
        exit, including cancellation, running jobs are cancelled and put back to ``waiting``;
        each final write is shielded and bounded by FINAL_WRITE_TIMEOUT, and a last sweep
        puts back any job still marked as running here (e.g. one whose claim was in flight).
        """
        await self._requeue()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._claim_and_run)
                try:
                    yield self
                finally:
                    self.stop_soon()
        finally:
            try:
                with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_TIMEOUT):
                    await self._requeue()
            except DatabaseError as exc:  # the next start puts them back
                log.error("cannot put this runner's jobs back to waiting: %s", exc)

    async def _claim_and_run(self) -> None:
        # A scope of its own, not the nursery's: stopping the jobs early must not cancel the
        # services started after this one, which the nursery's scope also covers.
        with self._stop:
            async with trio.open_nursery() as jobs:
                jobs.start_soon(self._claim_forever, jobs)

    def stop_soon(self) -> None:
        """Stop claiming and cancel the running jobs now (their workers are killed, and they
        go back to ``waiting``), ahead of this service's turn in a shutdown."""
        self._stop.cancel()

    def notify(self) -> None:
        """A job was created: look for work now rather than at the next poll."""
        self._notified = True
        self._wakeup.unpark_all()

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a waiting job, or stop a job this runner is running; return it afterwards.

        A running job's work is cancelled at once, before any await (its worker process is
        killed), and this returns once the job is marked ``cancelled`` (or ``complete`` /
        ``error`` if it ended first). Returns None if the job is neither waiting nor running
        here. Cancellation of the caller: the job's cancellation, once requested, proceeds.
        """
        while True:
            running = self._running.get(job_id)
            if running is not None:
                running.scope.cancel()
                with trio.CancelScope(shield=True):
                    await running.done.wait()
                return await self.db.jobs.find_one({"_id": job_id})
            cancelled = await self.db.jobs.find_one_and_update(
                {"_id": job_id, "state": "waiting"},
                {"$set": {"state": "cancelled", "finished_at": now()}},
            )
            if cancelled is not None:
                return cancelled
            if job_id in self._running:
                continue
            # Not waiting: claimed in the meantime? Then by a claim of ours still in flight.
            job = await self.db.jobs.find_one({"_id": job_id}, {"state": True, "runner": True})
            if job is None or job.get("state") != "running" or job.get("runner") != self.name:
                return None
            if job_id in self._running:
                continue
            if not self._claiming:
                return None  # marked as ours, yet no task of ours runs or claims it
            with trio.move_on_after(CLAIM_WAIT) as waited:
                await self._claimed.park()
            if waited.cancelled_caught:
                return None

    async def cancel_sample(self, sample_id: str) -> None:
        """Cancel every waiting job of the sample, and those of its jobs this runner runs.

        Cancellation of the caller: the waiting jobs are cancelled once the write is sent (see
        :mod:`vtrio.db`), a running job once its cancellation is requested; the rest are not.
        """
        await self.db.jobs.update_many(
            {"sample_id": sample_id, "state": "waiting"},
            {"$set": {"state": "cancelled", "finished_at": now()}},
        )
        for job_id, running in list(self._running.items()):
            if running.job.get("sample_id") == sample_id:
                await self.cancel(job_id)

    async def _requeue(self) -> None:
        await self.db.jobs.update_many(
            {"state": "running", "runner": self.name}, {"$set": {"state": "waiting", "progress": 0}}
        )

    async def _claim_forever(self, nursery: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()
            job: Job | None = None
            self._notified = False
            self._claiming = True
            try:
                job = await self._claim()
            except DatabaseError as exc:
                # MongoDB is briefly away (a failover, a timeout): jobs wait, the server lives.
                log.warning("cannot claim jobs (%s): trying again soon", exc)
            finally:
                self._claiming = False
                if job is None:
                    self._slots.release()
                else:
                    # Registered before any checkpoint: a cancel that finds the job claimed
                    # also finds it here.
                    running = self._running[job["_id"]] = _Running(job)
                    nursery.start_soon(self._run, job, running)
                self._claimed.unpark_all()
            if job is None and not self._notified:
                with trio.move_on_after(self._poll_interval):
                    await self._wakeup.park()

    async def _claim(self) -> Job | None:
        return await self.db.jobs.find_one_and_update(
            {"state": "waiting"},
            {
                "$set": {
                    "state": "running",
                    "runner": self.name,
                    "started_at": now(),
                    "progress": 0,
                }
            },
            sort=[("created_at", 1)],
        )

    async def _run(self, job: Job, running: _Running) -> None:
        try:
            try:
                with running.scope:
                    task = TASKS.get(job.get("task", ""))
                    if task is None:
                        raise JobFailed(f"no task {job.get('task')!r}")
                    await task(self, job, self._progress_reporter(job["_id"]))
            except Exception as exc:
                log.warning("job %s failed: %s", job["_id"], exc, exc_info=not _expected(exc))
                await self._finish(job, "error", error=str(exc) or type(exc).__name__)
            except BaseException:
                # The runner itself is stopping: its exit puts this job back to "waiting",
                # with the others, in one write.
                log.info("job %s (%s): stopped, to run again", job["_id"], job.get("task"))
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

    def _progress_reporter(self, job_id: str) -> ProgressReport:
        async def report(fraction: float) -> None:
            # Progress is news, not state: a report MongoDB fails to store is skipped, and the
            # job goes on.
            try:
                await self.db.jobs.update_one(
                    {"_id": job_id, "state": "running"},
                    {"$set": {"progress": round(fraction, 4)}},
                )
            except DatabaseError as exc:
                log.warning("job %s: progress not recorded (%s)", job_id, exc)

        return report

    async def _finish(self, job: Job, state: str, **fields: Any) -> None:
        """The job's last write: shielded, so that a job is never left marked as running by a
        cancellation of the runner, and bounded by FINAL_WRITE_TIMEOUT. Never raises but
        Cancelled: a job whose last write fails stays marked as running here, and the sweep of
        :meth:`running`, or the next start, puts it back to waiting."""
        finished = {"finished_at": now()} if state != "waiting" else {}
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_TIMEOUT):
                await self.db.jobs.update_one(
                    {"_id": job["_id"], "state": "running", "runner": self.name},
                    {"$set": {"state": state, **finished, **fields}},
                )
        except DatabaseError as exc:
            log.error("job %s: cannot record that it is %s (%s)", job["_id"], state, exc)
            return
        log.info("job %s (%s): %s", job["_id"], job.get("task"), state)


def _expected(exc: Exception) -> bool:
    """Failures that are the input's fault, not vtrio's: no traceback in the log."""
    return isinstance(exc, JobFailed | ValueError | OSError)


async def sample_stats(runner: JobRunner, job: Job, on_progress: ProgressReport) -> None:
    """Compute the read statistics of the job's sample and store them as its ``quality``.

    Cancellation: the worker computing a chunk is killed; nothing is stored.
    """
    sample = await runner.db.samples.find_one({"_id": job["sample_id"]})
    if sample is None:
        raise JobFailed(f"sample {job['sample_id']!r} was deleted")
    # Resolved again, not trusted from creation: the file may have been replaced since.
    path = await runner.uploads.resolve(sample["reads"])
    quality = await read_statistics(
        path,
        run_in_process=runner.executors.run_in_process,
        run_in_thread=runner.executors.run_in_thread,
        on_progress=on_progress,
    )
    stored = await runner.db.samples.update_one(
        {"_id": sample["_id"]}, {"$set": {"quality": quality}}
    )
    if stored is None:
        raise JobFailed(f"sample {job['sample_id']!r} was deleted while its reads were read")


TASKS: dict[str, Callable[[JobRunner, Job, ProgressReport], Awaitable[None]]]
TASKS = {"sample_stats": sample_stats}

# --- the jobs.* methods -------------------------------------------------------------------------

methods: Methods[Call] = Methods()
Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]


async def create_indexes(db: Database) -> None:
    await db.jobs.create_index([("state", 1), ("created_at", 1)])
    await db.jobs.create_index("sample_id")
    await db.jobs.create_index(
        [("sample_id", 1), ("task", 1)],
        name="one_active_job_per_sample_and_task",
        unique=True,
        partialFilterExpression={"state": {"$in": list(ACTIVE)}},
    )


class CreateParams(Params):
    task: Literal["sample_stats"]
    sample_id: Id


class IdParams(Params):
    id: Id


class ListParams(Params):
    state: Literal["waiting", "running", "complete", "cancelled", "error"] | None = None
    sample_id: Id | None = None
    skip: Annotated[int, Field(ge=0, le=10_000)] = 0
    limit: Annotated[int, Field(ge=1, le=100)] = 25


@methods.method("jobs.create", CreateParams)
async def create(call: Call, params: CreateParams) -> dict[str, Any]:
    """Queue a job for a sample the caller may change; 409 if one is already waiting or
    running for it."""
    sample = await writable_sample(call, params.sample_id)
    try:
        job = await call.app.db.jobs.insert_one(
            {
                "_id": secrets.token_hex(8),
                "task": params.task,
                "sample_id": params.sample_id,
                "user": call.identity.user_id,
                "access": access.access_of(sample),
                "state": "waiting",
                "progress": 0,
                "created_at": now(),
            }
        )
    except DuplicateKey:
        raise Conflict(
            f"sample {params.sample_id!r} already has a {params.task} job waiting or running: "
            "wait for it, or cancel it"
        ) from None
    call.app.jobs.notify()
    return message_data(job)


@methods.method("jobs.get", IdParams)
async def get(call: Call, params: IdParams) -> dict[str, Any]:
    return message_data(await _readable_job(call, params.id))


@methods.method("jobs.list", ListParams)
async def list_jobs(call: Call, params: ListParams) -> dict[str, Any]:
    """The caller's readable jobs, newest first, optionally of one state or sample."""
    query: dict[str, Any] = access.readable_filter(call.identity, within="access")
    for name in ("state", "sample_id"):
        if (value := getattr(params, name)) is not None:
            query = {"$and": [query, {name: value}]}
    found = await call.app.db.jobs.find(
        query, sort=[("created_at", -1), ("_id", 1)], skip=params.skip, limit=params.limit
    )
    return {
        "items": [message_data(job) for job in found],
        "total": await call.app.db.jobs.count_documents(query),
    }


@methods.method("jobs.cancel", IdParams)
async def cancel(call: Call, params: IdParams) -> dict[str, Any]:
    """Cancel a waiting or running job; return it afterwards (``cancelled``, or ``complete``
    or ``error`` if it ended first). 409 if it had already ended."""
    job = await _readable_job(call, params.id)
    if not access.can_write(call.identity, job["access"]):
        raise Forbidden(f"you may read job {params.id!r} but not cancel it")
    cancelled = await call.app.jobs.cancel(params.id)
    if cancelled is None:
        job = await _readable_job(call, params.id)
        raise Conflict(f"job {params.id!r} is {job['state']}: only a waiting or running job "
                       "can be cancelled")  # fmt: skip
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

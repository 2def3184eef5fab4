"""Jobs: long computations that live in MongoDB and run in the process pool.

A job goes ``waiting -> running -> complete | cancelled | error``; every change of state and of
progress (0..1, a few updates a second at most) is written to MongoDB, so watchers see it live.
The :class:`JobRunner` service claims waiting jobs atomically (two runners never run one job)
and runs at most ``concurrency`` of them at once. A sample has at most one waiting or running
job per task (a unique partial index says so, race-free). Runners of every instance on one
MongoDB share the jobs, and hear of them through the change feed: a job created anywhere is
claimed at once by a runner with a free slot.

What happens to a running job:

- ``jobs.cancel``, on any instance: the request is recorded on the job (``cancel_requested``);
  the runner running it hears of it through the feed, cancels its work (the worker process
  computing for it is killed) and marks it ``cancelled``, and the call returns once it has.
- a graceful shutdown: its work is cancelled and it goes back to ``waiting``, to run again on
  whichever runner claims it (or ``cancelled``, if that was asked meanwhile).
- a crash of the server: it stays ``running`` in MongoDB until this runner starts again and puts
  it back to ``waiting``. No job is lost.

The one task so far is ``sample_stats``: the read statistics of a sample's FASTQ file (see
:mod:`vtrio.virtool._fastq`), stored on the sample as ``quality`` (a sample update).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from vtrio.framework import Change, ChangeFeed, Collection, DatabaseError, Executors, Stopping
from vtrio.virtool._fastq import read_statistics
from vtrio.virtool._samples import now
from vtrio.virtool._uploads import Uploads

log = logging.getLogger(__name__)

STATES = ("waiting", "running", "complete", "cancelled", "error")
OVER = frozenset({"complete", "cancelled", "error"})

FINAL_WRITE_TIMEOUT = 5.0
"""How long a job's last write may take, shielded from the cancellation of its runner."""
CANCEL_WAIT = 10.0
"""How long ``cancel`` waits for the runner of a job (perhaps elsewhere) to say it stopped."""

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


@dataclass
class _Watch:
    """A cancel waiting to hear that a job stopped, or went back to waiting."""

    settled: trio.Event = field(default_factory=trio.Event)
    job: Job | None = None


class JobRunner:
    """Claims waiting jobs and runs them, ``concurrency`` at a time.

    It hears of new jobs and of cancel requests through ``changes`` (the change feed); with no
    feed (or should it miss one), it looks for waiting jobs every ``poll_interval`` seconds.
    """

    def __init__(
        self,
        jobs: Collection,
        samples: Collection,
        executors: Executors,
        uploads: Uploads,
        changes: ChangeFeed | None,
        *,
        name: str,
        concurrency: int = 2,
        poll_interval: float = 10.0,
    ) -> None:
        self.jobs = jobs
        self.samples = samples
        self.executors = executors
        self.uploads = uploads
        self.name = name
        self._changes = changes
        # A semaphore, not a CapacityLimiter: a slot is taken by the claiming task and given
        # back by the task that ran the job.
        self._slots = trio.Semaphore(concurrency)
        self._poll_interval = poll_interval
        self._wakeup = trio.lowlevel.ParkingLot()
        self._notified = False
        self._running: dict[str, _Running] = {}
        self._claiming = False  # a claim is in flight
        self._cancel_heard: set[str] = set()  # asked of a job whose claim may be in flight
        self._watches: dict[str, list[_Watch]] = {}
        self._stop = trio.CancelScope()
        self._stopping = Stopping(FINAL_WRITE_TIMEOUT)  # the tree's, once running

    @property
    def running_jobs(self) -> list[str]:
        """Ids of the jobs this runner is running now."""
        return list(self._running)

    @asynccontextmanager
    async def running(self, stopping: Stopping) -> AsyncIterator[JobRunner]:
        """Run jobs for the block.

        At the start, jobs this runner left ``running`` (a crash) go back to ``waiting``.

        Resource handling: the moment ``stopping`` is set, and at the latest on exit (also on
        cancellation), running jobs are cancelled (their workers killed) and put back to
        ``waiting``: their final writes and a last sweep, which puts back any job still
        marked as running here (one whose claim was in flight, say), are shielded, each
        bounded by FINAL_WRITE_TIMEOUT and all by ``stopping.deadline``.
        """
        await self._requeue()
        self._stopping = stopping
        unsubscribe = self._changes.subscribe(self._heard) if self._changes else lambda: None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._claim_and_run)
                nursery.start_soon(self._stop_when, stopping)
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            unsubscribe()
            try:
                with stopping.shielded(), trio.move_on_after(FINAL_WRITE_TIMEOUT):
                    await self._requeue()
            except DatabaseError as exc:  # the next start puts them back
                log.error("cannot put this runner's jobs back to waiting: %s", exc)

    async def _claim_and_run(self) -> None:
        # A scope of its own, not the nursery's: stopping the jobs early must not cancel the
        # services started after this one, which the nursery's scope also covers.
        with self._stop:
            async with trio.open_nursery() as jobs:
                jobs.start_soon(self._claim_forever, jobs)

    async def _stop_when(self, stopping: Stopping) -> None:
        # Ahead of this service's turn in the tree's unwinding: the CPU goes to closing.
        await stopping.wait()
        self._stop.cancel()

    def notify(self) -> None:
        """A job may be waiting: look for work now rather than at the next poll."""
        self._notified = True
        self._wakeup.unpark_all()

    def _heard(self, changes: Sequence[Change]) -> None:
        """The feed's news of jobs: new ones, cancel requests, ends."""
        for change in changes:
            job = change.after
            if change.collection != self.jobs.name or job is None:
                continue
            state = job.get("state")
            if state == "waiting":
                self.notify()
            if job.get("cancel_requested") and state == "running":
                self._cancel_here(change.id)
            if state in OVER or state == "waiting":
                self._cancel_heard.discard(change.id)
                for watch in self._watches.pop(change.id, []):
                    watch.job = dict(job)
                    watch.settled.set()

    def _cancel_here(self, job_id: str) -> None:
        """Stop the job if it runs here. (Clients do not see which runner has a job, so
        neither does the feed: a job that is not here may be this runner's own claim, still
        in flight, which is cancelled on arrival; or another runner's, which ends and is then
        forgotten here.)"""
        running = self._running.get(job_id)
        if running is not None:
            running.scope.cancel()
        elif self._claiming:
            self._cancel_heard.add(job_id)

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a waiting job, or have its runner (this one or another) stop a running one;
        return the job afterwards: ``cancelled``, or ``complete`` / ``error`` if it ended
        first. None if it had ended already.

        If the job's runner does not say within CANCEL_WAIT that it stopped (it is gone, say),
        the job is returned as it is, with ``cancel_requested`` set: whichever runner next
        holds it will cancel it. Cancellation of the caller: a request once recorded stands.
        """
        with trio.move_on_after(CANCEL_WAIT):
            while True:
                running = self._running.get(job_id)
                if running is not None:
                    running.scope.cancel()
                    with trio.CancelScope(shield=True):
                        await running.done.wait()
                    return await self.jobs.find_one({"_id": job_id})
                cancelled = await self.jobs.find_one_and_update(
                    {"_id": job_id, "state": "waiting"},
                    {"$set": {"state": "cancelled", "finished_at": now()}},
                )
                if cancelled is not None:
                    return cancelled
                job = await self._request_cancel(job_id)
                if job is None or job.get("state") != "waiting":
                    return job
                # Back to waiting (its runner stopped): cancel it as a waiting job.
        return await self.jobs.find_one({"_id": job_id})

    async def _request_cancel(self, job_id: str) -> Job | None:
        """Record the cancel on a running job and wait to hear it settle: the job then, or None
        if it was not running."""
        watch = _Watch()
        self._watches.setdefault(job_id, []).append(watch)  # before the request: no news lost
        try:
            requested = await self.jobs.find_one_and_update(
                {"_id": job_id, "state": "running"}, {"$set": {"cancel_requested": True}}
            )
            if requested is None:
                return None
            await watch.settled.wait()
            return watch.job
        finally:
            watches = self._watches.get(job_id, [])
            if watch in watches:
                watches.remove(watch)
            if not watches:
                self._watches.pop(job_id, None)

    async def cancel_sample(self, sample_id: str) -> None:
        """Cancel every waiting or running job of the sample, wherever it runs.

        Cancellation of the caller: the waiting jobs are cancelled once the write is sent (see
        :mod:`vtrio.framework`), a running job once its cancel is recorded; the rest are not.
        """
        await self.jobs.update_many(
            {"sample_id": sample_id, "state": "waiting"},
            {"$set": {"state": "cancelled", "finished_at": now()}},
        )
        for job in await self.jobs.find({"sample_id": sample_id, "state": "running"}, ["_id"]):
            await self.cancel(job["_id"])

    async def _requeue(self) -> None:
        """This runner's running jobs go back to waiting, or to cancelled if that was asked:
        decided per job in the one write, so that no cancel request in between is lost."""
        await self.jobs.update_many(
            {"state": "running", "runner": self.name},
            [{"$set": {
                "state": {"$cond": [{"$eq": ["$cancel_requested", True]}, "cancelled", "waiting"]},
                "progress": 0,
            }}],
        )  # fmt: skip

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
                    # Registered before any checkpoint: a cancel heard later finds it here.
                    running = self._running[job["_id"]] = _Running(job)
                    if job["_id"] in self._cancel_heard:
                        self._cancel_heard.discard(job["_id"])
                        running.scope.cancel()
                    nursery.start_soon(self._run, job, running)
            if job is None and not self._notified:
                with trio.move_on_after(self._poll_interval):
                    await self._wakeup.park()

    async def _claim(self) -> Job | None:
        return await self.jobs.find_one_and_update(
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
                await self.jobs.update_one(
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
            with self._stopping.shielded(), trio.move_on_after(FINAL_WRITE_TIMEOUT):
                await self.jobs.update_one(
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
    sample = await runner.samples.find_one({"_id": job["sample_id"]})
    if sample is None:
        raise JobFailed(f"sample {job['sample_id']!r} was deleted")
    # Opened again, not trusted from creation: the file may have been replaced since.
    async with await runner.uploads.open(sample["reads"]) as file:
        quality = await read_statistics(
            file,
            run_in_process=runner.executors.run_in_process,
            run_in_thread=runner.executors.run_in_thread,
            on_progress=on_progress,
        )
    stored = await runner.samples.update_one({"_id": sample["_id"]}, {"$set": {"quality": quality}})
    if stored is None:
        raise JobFailed(f"sample {job['sample_id']!r} was deleted while its reads were read")


TASKS: dict[str, Callable[[JobRunner, Job, ProgressReport], Awaitable[None]]]
TASKS = {"sample_stats": sample_stats}

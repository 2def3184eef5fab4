"""Worker threads for pymongo: a few long-lived threads fed by a queue, no thread hop per call.

``trio.to_thread.run_sync`` costs ~80 µs of CPU per call here (a hop to a thread and back, GIL
hand-offs, wake-ups), more than pymongo's own work. :class:`Workers` keeps ``count`` threads
taking :class:`_Job`s from a ``queue.SimpleQueue``; a finished job's waiters are handed back to
trio in batches, with one ``run_sync_soon`` per wake-up of the event loop however many jobs
finished meanwhile.

A job may serve several callers: :meth:`Workers.join` adds a caller to a job of the same kind
that is still waiting in the queue, so that concurrent calls of one shape (a ``find_one`` by id,
an ``insert_one``) go to MongoDB as one command when the threads are busy, and alone, at once,
when they are not (the DataLoader idea). Each caller still gets exactly its own result or error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from contextlib import suppress
from typing import Any, Generic, TypeVar

import outcome
import trio

__all__ = ["Workers"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item")

MAX_BATCH = 1000
"""The most callers one coalesced job serves."""

_QUEUED, _RUNNING, _DONE = "queued", "running", "done"

OnJob = Callable[[float, float, int], None]
"""``on_job(queued, ran, calls)``, in the worker thread after each job: seconds it waited for
a thread, seconds it ran, and how many calls it served. It must be quick and thread-safe."""


class _Caller:
    """One task waiting for its part of a job's result."""

    __slots__ = ("abandoned", "item", "result", "task")

    def __init__(self, task: trio.lowlevel.Task, item: Any) -> None:
        self.task = task
        self.item = item
        self.result: outcome.Outcome[Any] | None = None
        self.abandoned = False  # the task left; the result goes nowhere


class _Job(Generic[Item]):
    """Work for one thread: ``run(items)`` returns one outcome per caller, in order."""

    __slots__ = ("callers", "key", "queued_at", "run", "state")

    def __init__(
        self, run: Callable[[list[Item]], Sequence[outcome.Outcome[Any]]], key: Hashable
    ) -> None:
        self.run = run
        self.key = key
        self.callers: list[_Caller] = []
        self.state = _QUEUED
        self.queued_at = time.perf_counter()


class Workers:
    """``count`` threads running blocking calls for trio tasks; use inside :meth:`running`.

    Resource handling: no thread outlives :meth:`running`'s block by more than the call it is
    running (each is bounded by the caller's own deadline, e.g. pymongo's ``timeoutMS``);
    threads are daemon threads, so none can hold the process's exit.
    """

    def __init__(self, count: int, *, on_job: OnJob | None = None) -> None:
        if count < 1:
            raise ValueError(f"there must be at least one worker thread, not {count}")
        self._count = count
        self._on_job = on_job
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards job states and callers lists, across threads
        self._open: dict[Hashable, _Job[Any]] = {}  # joinable jobs still queued, by key
        self._finished: list[_Job[Any]] = []
        self._held: set[_Caller] = set()  # cancelled, waiting for a write to finish
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        for number in range(self._count):
            threading.Thread(target=self._work, name=f"vtrio-db-{number}", daemon=True).start()

    def stop(self) -> None:
        """Let each thread end once the queue before it is done."""
        for _ in range(self._count):
            self._queue.put(None)

    async def run(self, fn: Callable[[], T], *, abandon_on_cancel: bool) -> T:
        """``fn()`` in a worker thread; its result, or its exception.

        Cancellation: before a thread takes the call, it never runs, and ``Cancelled`` is
        raised at once. Once it runs: with ``abandon_on_cancel`` the caller returns at once
        with ``Cancelled`` and the result is dropped; without, the caller waits for ``fn`` to
        finish and gets its result as if not cancelled (the cancellation takes effect at its
        next checkpoint).
        """

        def run_one(items: list[None]) -> list[outcome.Outcome[T]]:
            return [outcome.capture(fn)]

        return await self.join(None, None, run_one, abandon_on_cancel=abandon_on_cancel)

    async def join(
        self,
        key: Hashable,
        item: Item,
        run: Callable[[list[Item]], Sequence[outcome.Outcome[Any]]],
        *,
        abandon_on_cancel: bool,
    ) -> Any:
        """Add ``item`` to the queued job of kind ``key``, or queue a new one; wait for its
        part of the result. ``run(items)`` runs in a thread and returns one outcome per item.

        ``key`` None never joins: the job is the caller's alone. Cancellation as for
        :meth:`run` (a caller cancelled while queued is taken out of its job).
        """
        caller = _Caller(trio.lowlevel.current_task(), item)
        with self._lock:
            job = self._open.get(key) if key is not None else None
            if job is None or len(job.callers) >= MAX_BATCH:
                job = _Job(run, key)
                if key is not None:
                    self._open[key] = job
                self._queue.put(job)
            job.callers.append(caller)

        def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            return self._abort(job, caller, abandon_on_cancel)

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _abort(self, job: _Job[Any], caller: _Caller, abandon: bool) -> trio.lowlevel.Abort:
        with self._lock:
            if job.state is _QUEUED:
                job.callers.remove(caller)  # a job left with no caller is skipped
                return trio.lowlevel.Abort.SUCCEEDED
            if job.state is _DONE and caller not in self._held and not abandon:
                self._held.add(caller)
                return trio.lowlevel.Abort.FAILED
            if not abandon:
                self._held.add(caller)
                return trio.lowlevel.Abort.FAILED  # its result will wake it
            caller.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

    # ---- the threads ------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if self._open.get(job.key) is job:
                    del self._open[job.key]  # no caller joins a job that has started
                job.state = _RUNNING
                items = [caller.item for caller in job.callers]
            if items:
                started = time.perf_counter()
                results = self._results(job, items)
                if self._on_job is not None:
                    ran = time.perf_counter() - started
                    self._on_job(started - job.queued_at, ran, len(items))
                self._finish(job, results)

    def _results(self, job: _Job[Any], items: list[Any]) -> Sequence[outcome.Outcome[Any]]:
        try:
            results = job.run(items)
        except BaseException as exc:  # a bug of the job's: every caller hears of it
            log.exception("a database job failed as a whole")
            return [outcome.Error(exc)] * len(items)
        assert len(results) == len(items), "a job answers each of its callers"
        return results

    def _finish(self, job: _Job[Any], results: Sequence[outcome.Outcome[Any]]) -> None:
        with self._lock:
            job.state = _DONE
            for caller, result in zip(job.callers, results, strict=True):
                caller.result = result
            self._finished.append(job)
            first = len(self._finished) == 1
        if first:
            assert self._token is not None
            with suppress(trio.RunFinishedError):  # trio is gone: so is everyone who waited
                self._token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        """Runs in trio: reschedule every caller of every job finished since the last time."""
        with self._lock:
            finished, self._finished = self._finished, []
            callers = [caller for job in finished for caller in job.callers]
        for caller in callers:
            self._held.discard(caller)
            if not caller.abandoned:
                assert caller.result is not None
                trio.lowlevel.reschedule(caller.task, caller.result)

    def release_held(self, error: Exception) -> None:
        """Stop waiting for writes: every cancelled caller still waiting for its write to
        finish gets ``error`` now (the write may yet be applied), so that no thread holds a
        shutdown past its deadline."""
        held, self._held = self._held, set()
        for caller in held:
            caller.abandoned = True
            trio.lowlevel.reschedule(caller.task, outcome.Error(error))

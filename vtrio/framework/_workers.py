"""Worker threads for pymongo: a few long-lived threads fed by a queue, no thread hop per call.

``trio.to_thread.run_sync`` costs ~80 µs of CPU per call here (a hop to a thread and back, GIL
hand-offs, wake-ups), more than pymongo's own work. :class:`Workers` keeps ``count`` threads
and hands each :class:`_Job` to the thread that went idle last (queued, oldest first, when
every thread is busy); a finished job's waiters are handed back to trio in batches, with one
``run_sync_soon`` per wake-up of the event loop however many jobs finished meanwhile.

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
from collections import deque
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

_Inbox = queue.SimpleQueue["_Job[Any] | None"]
"""A worker thread's own queue: the job it is handed, or None to end."""

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
        self._lock = threading.Lock()  # guards the threads' shared state: jobs, backlog, idle
        self._backlog: deque[_Job[Any]] = deque()  # jobs waiting for a thread, oldest first
        self._idle: list[_Inbox] = []  # the idle threads' inboxes, the latest idle last
        self._stopped = False
        self._open: dict[Hashable, _Job[Any]] = {}  # joinable jobs still queued, by key
        self._finished: list[_Job[Any]] = []
        self._held: set[_Caller] = set()  # cancelled, waiting for a write to finish
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        for number in range(self._count):
            inbox: _Inbox = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._work, args=(inbox,), name=f"vtrio-db-{number}", daemon=True
            )
            thread.start()

    def stop(self) -> None:
        """Let each thread end once no job waits for a thread (an idle thread at once)."""
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(None)

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
                self._hand_out(job)
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

    def _hand_out(self, job: _Job[Any]) -> None:
        """Give ``job`` to the thread that went idle last, or queue it (holding the lock).

        The thread that went idle last is the likeliest to be awake still, on the CPU it ran
        on: one call at a time, one thread takes them all, often before it has gone to sleep.
        A call whose two wake-ups cross CPUs costs 100-200 µs more here (benchmarks/README.md).
        """
        if self._idle:
            self._idle.pop().put(job)
        else:
            self._backlog.append(job)

    def _work(self, inbox: _Inbox) -> None:
        """One thread: runs the job it is handed, then the queued ones, until told to end."""
        with self._lock:
            self._go_idle(inbox)
        job = inbox.get()
        while job is not None:
            results = self._run(job)
            # The thread takes its next job, or goes idle, before the callers are woken, so
            # that the next call one of them makes finds it ready.
            with self._lock:
                following = self._backlog.popleft() if self._backlog else None
                if following is None:
                    self._go_idle(inbox)
            self._finish(job, results)
            job = following if following is not None else inbox.get()

    def _go_idle(self, inbox: _Inbox) -> None:
        """Wait to be handed a job, or to end once stopped (holding the lock)."""
        if self._stopped:
            inbox.put(None)
        else:
            self._idle.append(inbox)

    def _run(self, job: _Job[Any]) -> Sequence[outcome.Outcome[Any]]:
        """Run ``job`` for the callers it still has (none left: it is skipped)."""
        with self._lock:
            if self._open.get(job.key) is job:
                del self._open[job.key]  # no caller joins a job that has started
            job.state = _RUNNING
            items = [caller.item for caller in job.callers]
        if not items:
            return ()
        started = time.perf_counter()
        results = self._results(job, items)
        if self._on_job is not None:
            ran = time.perf_counter() - started
            self._on_job(started - job.queued_at, ran, len(items))
        return results

    def _results(self, job: _Job[Any], items: list[Any]) -> Sequence[outcome.Outcome[Any]]:
        try:
            results = job.run(items)
        except BaseException as exc:  # a bug of the job's: every caller hears of it
            log.exception("a database job failed as a whole")
            return [outcome.Error(exc)] * len(items)
        assert len(results) == len(items), "a job answers each of its callers"
        return results

    def _finish(self, job: _Job[Any], results: Sequence[outcome.Outcome[Any]]) -> None:
        """Hand a job's results to its callers: one ``run_sync_soon`` for every job finished
        until trio takes them."""
        with self._lock:
            job.state = _DONE
            if not results:
                return
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

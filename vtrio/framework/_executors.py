"""Run blocking I/O in threads and CPU-heavy work in worker processes, bounded and cancellable.

Usage::

    async with open_executors(threads=8, processes=2) as executors:
        await executors.run_in_thread(shutil.copy, src, dst)
        digest = await executors.run_in_process(hash_file, path)

What happens when the calling task is cancelled:

=======================  ===================  =============================================
call                     job not started yet  job already running
=======================  ===================  =============================================
run_in_thread (default)  never starts         the caller waits until the job returns, or
                                              until `Executors.abandon_threads` is called
run_in_thread (abandon)  never starts         the caller returns at once; the thread runs
                                              on to the end and keeps its slot until then
run_in_process           never starts         the worker is killed (and replaced on the
                                              next call); the caller returns in ~ms
=======================  ===================  =============================================

"Not started yet" means waiting for one of the ``threads`` / ``processes`` slots.

Shutdown: Python cannot stop a thread, so a thread stuck in a blocking call (opening a FIFO
nobody writes to, a read from a hung network file system) would make its cancelled caller, and
so the whole shutdown, wait forever. `Executors.abandon_threads` bounds that wait: the server
calls it when its grace period ends or on a second Ctrl-C, and the callers go on without their
threads.

Ctrl-C: a terminal sends SIGINT to the whole foreground process group, workers included, while
the server shuts down on its own terms. Workers therefore ignore SIGINT: trio-parallel's worker
loop sets ``SIG_IGN`` before it takes its first job. So a Ctrl-C never kills a running job
behind the server's back: the job ends when the server cancels its caller, or runs to the end
if the server shields it. Remaining gap: a worker that is still starting up (~0.1 s after its
spawn, before trio-parallel's loop ignores SIGINT) dies from a Ctrl-C, printing a
KeyboardInterrupt traceback, and its call fails with `WorkerCrashed`.

The server killed outright (``kill -9``): it cannot stop its workers, so each worker watches
for itself. An idle worker sees its job pipe close and exits (trio-parallel's loop); a busy one
would run its job to the end, so every worker also runs a watchdog thread that ends the process
within ``PARENT_POLL`` seconds of its parent's death (:data:`_EXIT_WITH_PARENT`).
"""

import functools
import logging
import pickle
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any, Generic, ParamSpec, TypeVar

import outcome
import trio
import trio_parallel

from vtrio.framework._services import Stopping

__all__ = [
    "ExecutorError",
    "ExecutorStatistics",
    "Executors",
    "NotPicklable",
    "WorkerCrashed",
    "open_executors",
]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class ExecutorError(Exception):
    """Base class of the errors raised by the executors themselves (never by the jobs they run)."""


class WorkerCrashed(ExecutorError):
    """The worker process running the call died: segfault, ``os._exit``, killed by a signal."""


class NotPicklable(ExecutorError, TypeError):
    """The function or an argument given to `Executors.run_in_process` cannot be pickled.

    Raised before anything is sent to a worker, so nothing ran.
    """


@dataclass(frozen=True, slots=True)
class ExecutorStatistics:
    """A snapshot of how busy the executors are."""

    threads_busy: int  # includes abandoned threads that are still running
    threads_waiting: int  # calls waiting for a thread slot
    processes_busy: int
    processes_waiting: int  # calls waiting for a process slot


class _ThreadCall(Generic[T]):
    """One wait-mode `Executors.run_in_thread` call: its job's outcome, and when it has ended.

    It is also the call's limiter, in front of the shared one. `trio.to_thread.run_sync`
    starts the thread as soon as ``acquire_on_behalf_of`` returns, with no checkpoint in
    between, and calls ``release_on_behalf_of`` in the trio thread once the thread has really
    finished, abandoned or not. So ``started`` says whether the job runs at all, and ``ended``
    is set once it is over and its slot is free again.
    """

    def __init__(self, job: Callable[[], T], name: str, limiter: trio.CapacityLimiter) -> None:
        self._job = job
        self.name = name
        self._limiter = limiter
        self.started = False
        self.ended = trio.Event()
        self.outcome: outcome.Outcome[T]

    def run(self) -> None:
        """Run the job (in the worker thread) and keep its outcome, which trio would discard."""
        self.outcome = outcome.capture(self._job)

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self._limiter.acquire_on_behalf_of(borrower)
        self.started = True

    def release_on_behalf_of(self, borrower: object) -> None:
        self._limiter.release_on_behalf_of(borrower)
        self.ended.set()


class Executors:
    """Thread and process executors; get one from `open_executors`."""

    def __init__(self, threads: int, processes: int, workers: trio_parallel.WorkerContext) -> None:
        self._thread_limiter = trio.CapacityLimiter(threads)
        self._process_limiter = trio.CapacityLimiter(processes)
        self._workers = workers
        self._closed = False
        self._threads_abandoned = False
        # The shielded scopes in which cancelled callers wait for their threads, by job name.
        self._thread_waits: dict[trio.CancelScope, str] = {}

    async def run_in_thread(
        self, fn: Callable[..., T], /, *args: Any, abandon_on_cancel: bool = False, **kwargs: Any
    ) -> T:
        """Run ``fn(*args, **kwargs)`` in a worker thread, at most ``threads`` at a time.

        If the calling task is cancelled while waiting for a thread slot, fn never starts. Once
        fn is running, Python cannot stop its thread, and ``abandon_on_cancel`` chooses what
        the cancellation does:

        - ``False`` (the default, safe): the caller keeps waiting until fn returns. The work
          did complete, so the call returns fn's result (or raises its exception) and the
          cancellation takes effect at the caller's next checkpoint. Work is not left running
          behind the caller's back: once the cancelled scope is exited, the thread is done.
          The one exception is `abandon_threads`: from then on, a cancelled caller raises
          `trio.Cancelled` at once, as with ``True``.
        - ``True``: the caller raises `trio.Cancelled` at once and fn runs on to completion;
          its result or exception is discarded. A write abandoned midway may still commit
          after the caller has moved on: only abandon work whose late completion is harmless.

        fn may poll `trio.from_thread.check_cancelled`, which raises once the caller is
        cancelled, to end early. Other calls back into trio (`trio.from_thread.run`) run in a
        system task, outside the caller's cancel scopes, in either mode.

        Resource handling:
            A thread keeps its slot until fn returns, whether its caller still waits or not,
            so abandoned threads count against ``threads`` and in `statistics` until then.
            Worker threads are daemon threads: one still running at exit dies with the
            process. Closing the executors does not wait for abandoned threads.

        Error handling:
            Whatever fn raises is raised here, including to a cancelled caller that waited
            for fn to end. An abandoned thread's exception is discarded. Raises
            `trio.ClosedResourceError` if the executors are closed.

        (Arguments are typed ``Any``: PEP 612 allows no keyword-only parameter such as
        ``abandon_on_cancel`` between ``*args: P.args`` and ``**kwargs: P.kwargs``.)
        """
        self._check_open()
        job = functools.partial(fn, *args, **kwargs)
        if abandon_on_cancel:
            return await trio.to_thread.run_sync(
                job, abandon_on_cancel=True, limiter=self._thread_limiter
            )
        return await self._run_in_thread_and_wait(_ThreadCall(job, _name(fn), self._thread_limiter))

    def abandon_threads(self) -> None:
        """Stop waiting for the threads of cancelled calls, so that shutdown goes on.

        Every `run_in_thread` caller that was cancelled and waits for its thread to end
        raises `trio.Cancelled` at once, and callers cancelled later do not wait either:
        cancellation then works as with ``abandon_on_cancel=True``. Calls that are not
        cancelled still return their results. Call it from the trio thread; calling it again
        does nothing more.

        The server calls it when its shutdown grace period ends, or on a second Ctrl-C: a
        thread stuck in a blocking call would otherwise hold the shutdown forever.

        Resource handling:
            The abandoned threads run on (Python cannot stop a thread) and keep their slots
            until they end, or die with the process (they are daemon threads). Their effects
            may happen after their callers have moved on: that is the price of a bounded
            shutdown.

        Error handling:
            The abandoned threads' results and exceptions are discarded. The names of the
            jobs still waited for are logged, as a warning: they are what held the shutdown.
        """
        self._threads_abandoned = True
        if self._thread_waits:
            logger.warning(
                "no longer waiting for the threads of %d cancelled calls: %s",
                len(self._thread_waits),
                ", ".join(sorted(self._thread_waits.values())),
            )
        for scope in self._thread_waits:
            scope.cancel()

    async def run_in_process(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` in a worker process, at most ``processes`` at a time.

        fn, its arguments and its result must be picklable; fn must be importable by the worker
        (a module-level function, not a lambda or a local function). The call is pickled here,
        once, before anything is sent: if that fails, `NotPicklable` is raised and nothing ran.
        The pickling runs on the event loop, so pass paths rather than large data.

        If the calling task is cancelled while waiting for a process slot, fn never starts.
        Once fn is running, the cancellation stops it: its worker is killed (SIGKILL) and
        reaped before `trio.Cancelled` propagates, within milliseconds; the next call spawns
        a replacement worker.

        Error handling:
            Raises `WorkerCrashed` if the worker dies while running the call (the pool
            replaces it and keeps serving; other calls in flight are not affected), and
            whatever fn raises otherwise. Raises `trio.ClosedResourceError` if the executors
            are closed.
        """
        self._check_open()
        payload = _pickle_call(fn, args, kwargs)
        try:
            result: T = await self._workers.run_sync(
                pickle.loads, payload, kill_on_cancel=True, limiter=self._process_limiter
            )
        except trio_parallel.BrokenWorkerError as exc:
            # trio-parallel has already reaped the dead worker; the next call spawns a new one.
            raise WorkerCrashed(_crash_message(_name(fn), exc)) from exc
        return result

    def statistics(self) -> ExecutorStatistics:
        """How many thread and process slots are in use, and how many calls wait for one."""
        threads = self._thread_limiter.statistics()
        processes = self._process_limiter.statistics()
        return ExecutorStatistics(
            threads_busy=threads.borrowed_tokens,
            threads_waiting=threads.tasks_waiting,
            processes_busy=processes.borrowed_tokens,
            processes_waiting=processes.tasks_waiting,
        )

    async def _run_in_thread_and_wait(self, call: _ThreadCall[T]) -> T:
        # The thread is abandonable, so that a cancelled caller can stop waiting for it; until
        # abandon_threads() the caller waits for it itself, shielded, which is what
        # abandon_on_cancel=False would do without a way out.
        try:
            await trio.to_thread.run_sync(
                call.run,
                abandon_on_cancel=True,
                # A documented "CapacityLimiter-like" object; trio annotates the parameter
                # more narrowly (and its own tests pass custom limiters the same way).
                limiter=call,  # type: ignore[arg-type]
            )
        except trio.Cancelled:
            if not call.started or not await self._wait_for_thread(call):
                raise
            # The thread ended: like abandon_on_cancel=False, deliver its outcome and let the
            # caller's next checkpoint raise Cancelled again (its scope is still cancelled).
        return call.outcome.unwrap()

    async def _wait_for_thread(self, call: _ThreadCall[Any]) -> bool:
        """Wait, shielded, for the call's thread: True once it has ended, False if abandoned."""
        if not self._threads_abandoned:
            with trio.CancelScope(shield=True) as scope:  # abandon_threads() cancels it
                self._thread_waits[scope] = call.name
                try:
                    await call.ended.wait()
                finally:
                    del self._thread_waits[scope]
        return call.ended.is_set()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the executors are closed")

    def _close(self) -> None:
        self._closed = True


@asynccontextmanager
async def open_executors(
    threads: int = 8,
    processes: int = 2,
    *,
    stopping: Stopping | None = None,
    idle_timeout: float = 600.0,
    shutdown_grace: float = 2.0,
) -> AsyncIterator[Executors]:
    """Open thread and process executors, and close them when the block exits.

    Args:
        threads: at most this many `Executors.run_in_thread` calls run at once.
        processes: at most this many `Executors.run_in_process` calls run at once (and at most
            this many worker processes exist).
        idle_timeout: seconds an idle worker process lives before it exits by itself.
        shutdown_grace: seconds idle worker processes get to exit cleanly on close before
            being killed.
        stopping: the service tree's stop signal: when it hurries (at its deadline, or at
            once), `Executors.abandon_threads` is called, so that no thread holds the tree's
            stop past it.

    Run jobs only from tasks that live inside the block, so that they are finished or
    cancelled before it exits.

    Resource handling:
        Closing never blocks the event loop (the blocking part runs in a thread), is not
        interrupted by cancellation, and leaves no worker process behind: no job can still be
        running (cancelling a call kills its worker), and idle workers are asked to exit and
        killed after ``shutdown_grace``. Multiprocessing's shared resource-tracker process,
        started by the first spawn, stays for the life of the program: it is not a worker.
        No thread is left running a job whose caller waited for it; threads abandoned by
        their callers or by `Executors.abandon_threads` are not waited for.

    Error handling:
        Raises `ValueError` for fewer than one thread or process. Workers that do not exit
        cleanly on close are killed and logged, as a warning, rather than failing the close.
    """
    if threads < 1 or processes < 1:
        raise ValueError(f"threads and processes must be >= 1, got {threads} and {processes}")
    async with _open_workers(idle_timeout, shutdown_grace) as workers:
        executors = Executors(threads, processes, workers)
        forget = stopping.on_hurry(executors.abandon_threads) if stopping else (lambda: None)
        try:
            yield executors
        finally:
            forget()
            executors._close()


@asynccontextmanager
async def _open_workers(
    idle_timeout: float, grace: float
) -> AsyncIterator[trio_parallel.WorkerContext]:
    context = trio_parallel.open_worker_context(
        idle_timeout=idle_timeout, grace_period=grace, init=_EXIT_WITH_PARENT
    )
    workers = await context.__aenter__()
    try:
        yield workers
    finally:
        # Shielded: the close must finish even though the surrounding scope is cancelled. It is
        # bounded: no job can still be running (kill_on_cancel) and idle workers get `grace`.
        with trio.CancelScope(shield=True):
            try:
                await context.__aexit__(None, None, None)
            except trio_parallel.BrokenWorkerError as exc:
                # Idle workers that exited uncleanly or missed the grace period were killed and
                # reaped: nothing is left running, so report it rather than fail the shutdown.
                logger.warning("worker processes did not shut down cleanly: %s", exc)


PARENT_POLL = 0.25
"""Seconds between a worker's checks that the server that started it is still alive."""

_WATCHDOG = f"""
import os, threading, time

def watch(parent=os.getppid()):
    while os.getppid() == parent:  # an orphan is re-parented: its parent's pid changes
        time.sleep({PARENT_POLL})
    os._exit(1)

threading.Thread(target=watch, name="exit with the server", daemon=True).start()
"""
_EXIT_WITH_PARENT = functools.partial(exec, _WATCHDOG, {})
"""Each worker's ``init``: start the watchdog. The code travels as text, run by ``exec`` (a
builtin, pickled by name), so that a worker imports neither this module nor trio to run it."""


# --- pickling ----------------------------------------------------------------------------------


class _Call:
    """A call that pickles as "call fn(*args, **kwargs)": unpickling it runs it.

    Workers receive ``pickle.loads`` as the function and the pickled call as its one argument,
    so the stdlib is the trampoline: arguments are pickled once, by us, and the only extra work
    is copying the bytes into the worker's message. A trampoline in this module would make
    every fresh worker import this module and so trio (~0.2 s per spawn).
    """

    __slots__ = ("args", "fn", "kwargs")

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self.kwargs:
            return functools.partial(self.fn, *self.args, **self.kwargs), ()
        return self.fn, self.args


def _pickle_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    try:
        return pickle.dumps(_Call(fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # pickle raises PicklingError, TypeError or AttributeError
        raise NotPicklable(f"cannot send {_name(fn)} to a worker process: {exc}") from exc


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


# --- crash messages ----------------------------------------------------------------------------


def _crash_message(name: str, exc: trio_parallel.BrokenWorkerError) -> str:
    process = exc.args[-1] if exc.args else None
    if not isinstance(process, BaseProcess):
        return f"the worker process running {name} died ({exc})"
    return f"worker process {process.pid} running {name} {_describe_exit(process.exitcode)}"


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "died"
    if exitcode >= 0:
        return f"exited with status {exitcode}"
    try:
        return f"was killed by {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"was killed by signal {-exitcode}"

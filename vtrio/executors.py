"""Run blocking I/O in threads and CPU-heavy work in worker processes, bounded and cancellable.

Usage::

    async with open_executors(threads=8, processes=2) as executors:
        await executors.run_in_thread(shutil.copy, src, dst)
        digest = await executors.run_in_process(hash_file, path)

What happens when the calling task is cancelled:

=========================  ===================  ===========================================
call                       job not started yet  job already running
=========================  ===================  ===========================================
run_in_thread (default)    never starts         the caller waits until the job returns
run_in_thread (abandon)    never starts         the caller returns at once; the thread runs
                                                on to the end and keeps its slot until then
run_in_process,            never starts         the worker is killed (and replaced on the
"trio-parallel" (default)                       next call); the caller returns in ~ms
run_in_process,            never starts         the job runs on to the end in its worker,
"process-pool"                                  which keeps its slot until then
=========================  ===================  ===========================================

"Not started yet" means waiting for one of the ``threads`` / ``processes`` slots.

Ctrl-C: a terminal sends SIGINT to the whole foreground process group, workers included, while
the server shuts down on its own terms. Workers therefore ignore SIGINT: trio-parallel's worker
loop sets ``SIG_IGN`` before it takes its first job, and the process-pool backend does the same
with an initializer (and also spawns its workers with SIGINT blocked). So a Ctrl-C never kills a
running job behind the server's back: the job ends when the server cancels its caller, or runs to
the end if the server shields it. Remaining gap (trio-parallel only): a worker that is still
starting up (~0.1 s after its spawn, before trio-parallel's loop ignores SIGINT) dies from a
Ctrl-C, printing a KeyboardInterrupt traceback, and its call fails with `WorkerCrashed`.
"""

import functools
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import CancelledError as FutureCancelledError
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any, Final, Literal, ParamSpec, Protocol, TypeVar, cast, get_args

import trio
import trio_parallel

__all__ = [
    "DEFAULT_PROCESS_BACKEND",
    "PROCESS_BACKENDS",
    "PROCESS_POOL",
    "TRIO_PARALLEL",
    "ExecutorError",
    "ExecutorStatistics",
    "Executors",
    "NotPicklable",
    "ProcessBackend",
    "WorkerCrashed",
    "open_executors",
]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

ProcessBackend = Literal["trio-parallel", "process-pool"]
TRIO_PARALLEL: Final = "trio-parallel"
PROCESS_POOL: Final = "process-pool"
PROCESS_BACKENDS: Final[tuple[ProcessBackend, ...]] = get_args(ProcessBackend)
DEFAULT_PROCESS_BACKEND: Final[ProcessBackend] = TRIO_PARALLEL


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
    processes_busy: int  # includes process-pool jobs whose caller was cancelled
    processes_waiting: int  # calls waiting for a process slot


class _ProcessRunner(Protocol):
    """What both process backends provide: run a pickled call, within a bound."""

    limiter: trio.CapacityLimiter

    async def run(self, payload: bytes, name: str) -> Any: ...


class Executors:
    """Thread and process executors; get one from `open_executors`."""

    def __init__(
        self,
        thread_limiter: trio.CapacityLimiter,
        processes: _ProcessRunner,
        process_backend: ProcessBackend,
    ) -> None:
        self._thread_limiter = thread_limiter
        self._processes = processes
        self._closed = False
        self.process_backend: Final = process_backend

    async def run_in_thread(
        self, fn: Callable[..., T], /, *args: Any, abandon_on_cancel: bool = False, **kwargs: Any
    ) -> T:
        """Run ``fn(*args, **kwargs)`` in a worker thread, at most ``threads`` at a time.

        If the calling task is cancelled while waiting for a thread slot, fn never starts. Once
        fn is running, ``abandon_on_cancel`` chooses what the cancellation does:

        - ``False`` (the default, safe): the caller keeps waiting until fn returns. The work
          did complete, so the call returns fn's result (or raises its exception) and the
          cancellation takes effect at the caller's next checkpoint. Work is never left running
          behind the caller's back: once the cancelled scope is exited, the thread is done.
        - ``True``: the caller raises `trio.Cancelled` at once and fn runs on to completion
          (Python cannot stop a thread); its result or exception is discarded. The abandoned
          thread keeps its slot until fn returns, so it still counts against ``threads``. A
          write abandoned midway may still commit after the caller has moved on: only abandon
          work whose late completion is harmless. Closing the executors does not wait for
          abandoned threads; they are daemon threads and die with the process at the latest.

        (Arguments are typed ``Any``: PEP 612 allows no keyword-only parameter such as
        ``abandon_on_cancel`` between ``*args: P.args`` and ``**kwargs: P.kwargs``.)
        """
        self._check_open()
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs),
            abandon_on_cancel=abandon_on_cancel,
            limiter=self._thread_limiter,
        )

    async def run_in_process(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` in a worker process, at most ``processes`` at a time.

        fn, its arguments and its result must be picklable; fn must be importable by the worker
        (a module-level function, not a lambda or a local function). The call is pickled here,
        once, before anything is sent: if that fails, `NotPicklable` is raised and nothing ran.
        The pickling runs on the event loop, so pass paths rather than large data.

        Raises `WorkerCrashed` if the worker dies while running the call (the pool replaces it
        and keeps serving), and whatever fn raises otherwise.

        Cancellation of the calling task, by backend:

        - a call still waiting for a process slot never starts, with either backend;
        - "trio-parallel": a running job is stopped: its worker is killed (SIGKILL) and reaped
          before `trio.Cancelled` propagates, within milliseconds; the next call spawns a
          replacement worker.
        - "process-pool" (``ProcessPoolExecutor``, kept for comparison): a running job cannot be
          stopped. The caller returns at once, but the job runs on to the end in its worker and
          keeps its slot until then. Only ``future.cancel()`` is available, which only works for
          a job not yet handed to a worker. A crash also breaks the whole pool, so every call in
          flight on it fails with `WorkerCrashed`, not just the crashed one (the pool is replaced
          and later calls succeed).
        """
        self._check_open()
        payload = _pickle_call(fn, args, kwargs)
        result: T = await self._processes.run(payload, _name(fn))
        return result

    def statistics(self) -> ExecutorStatistics:
        """How many thread and process slots are in use, and how many calls wait for one."""
        threads = self._thread_limiter.statistics()
        processes = self._processes.limiter.statistics()
        return ExecutorStatistics(
            threads_busy=threads.borrowed_tokens,
            threads_waiting=threads.tasks_waiting,
            processes_busy=processes.borrowed_tokens,
            processes_waiting=processes.tasks_waiting,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the executors are closed")

    def _close(self) -> None:
        self._closed = True


@asynccontextmanager
async def open_executors(
    threads: int = 8,
    processes: int = 2,
    process_backend: ProcessBackend = DEFAULT_PROCESS_BACKEND,
    *,
    idle_timeout: float = 600.0,
    shutdown_grace: float = 2.0,
) -> AsyncIterator[Executors]:
    """Open thread and process executors, and close them when the block exits.

    Args:
        threads: at most this many `Executors.run_in_thread` calls run at once.
        processes: at most this many `Executors.run_in_process` calls run at once (and at most
            this many worker processes exist).
        process_backend: ``"trio-parallel"`` (default) or ``"process-pool"``, see
            `PROCESS_BACKENDS` and `Executors.run_in_process`.
        idle_timeout: seconds an idle trio-parallel worker lives before it exits by itself.
        shutdown_grace: seconds idle workers get to exit cleanly on close before being killed.

    Run jobs only from tasks that live inside the block, so that they are finished or
    cancelled before it exits. Closing then never blocks the event loop (the blocking part runs
    in a thread) and leaves no worker process behind: idle workers are asked to exit and killed
    after ``shutdown_grace``; process-pool workers still running a job whose caller was
    cancelled are killed at once. No thread is left running a job in the default (wait) mode;
    abandoned threads are not waited for (see `Executors.run_in_thread`). Multiprocessing's
    shared resource-tracker process, started by the first spawn, stays for the life of the
    program: it is not a worker.
    """
    _check_config(threads, processes, process_backend)
    opener = _PROCESS_RUNNER_OPENERS[process_backend]
    async with opener(processes, idle_timeout, shutdown_grace) as runner:
        executors = Executors(trio.CapacityLimiter(threads), runner, process_backend)
        try:
            yield executors
        finally:
            executors._close()


def _check_config(threads: int, processes: int, process_backend: str) -> None:
    if threads < 1 or processes < 1:
        raise ValueError(f"threads and processes must be >= 1, got {threads} and {processes}")
    if process_backend not in PROCESS_BACKENDS:
        raise ValueError(
            f"unknown process backend {process_backend!r}, expected one of {PROCESS_BACKENDS}"
        )


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


# --- trio-parallel backend ---------------------------------------------------------------------


class _TrioParallelRunner:
    """Jobs run in trio-parallel workers; cancellation kills the worker running the job."""

    def __init__(self, context: trio_parallel.WorkerContext, processes: int) -> None:
        self._context = context
        self.limiter = trio.CapacityLimiter(processes)

    async def run(self, payload: bytes, name: str) -> Any:
        try:
            return await self._context.run_sync(
                pickle.loads, payload, kill_on_cancel=True, limiter=self.limiter
            )
        except trio_parallel.BrokenWorkerError as exc:
            # trio-parallel has already reaped the dead worker; the next call spawns a new one.
            raise WorkerCrashed(_trio_parallel_crash_message(name, exc)) from exc


@asynccontextmanager
async def _open_trio_parallel(
    processes: int, idle_timeout: float, grace: float
) -> AsyncIterator[_TrioParallelRunner]:
    context = trio_parallel.open_worker_context(idle_timeout=idle_timeout, grace_period=grace)
    worker_context = await context.__aenter__()
    try:
        yield _TrioParallelRunner(worker_context, processes)
    finally:
        # Shielded: the close must finish even though the surrounding scope is cancelled. It is
        # bounded: no job can still be running (kill_on_cancel) and idle workers get `grace`.
        with trio.CancelScope(shield=True):
            await _close_worker_context(context)


async def _close_worker_context(context: AbstractAsyncContextManager[Any]) -> None:
    try:
        await context.__aexit__(None, None, None)
    except trio_parallel.BrokenWorkerError as exc:
        # Idle workers that exited uncleanly or missed the grace period were killed and reaped:
        # nothing is left running, so report it rather than fail the whole shutdown.
        logger.warning("trio-parallel workers did not shut down cleanly: %s", exc)


def _trio_parallel_crash_message(name: str, exc: trio_parallel.BrokenWorkerError) -> str:
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


# --- ProcessPoolExecutor backend ---------------------------------------------------------------


class _PoolJob:
    """One process-pool call, shared by the caller's task and the thread that submits it."""

    def __init__(self, payload: bytes, name: str) -> None:
        self.payload = payload
        self.name = name
        self._lock = threading.Lock()
        self._future: Future[Any] | None = None
        self._abandoned = False

    @property
    def abandoned(self) -> bool:
        with self._lock:
            return self._abandoned

    def abandon(self) -> None:
        """The caller stopped waiting: a job not yet handed to a worker must never start."""
        with self._lock:
            self._abandoned = True
            future = self._future
        if future is not None:
            future.cancel()  # does nothing once a worker has the job: it runs on

    def attach(self, future: Future[Any]) -> None:
        """Record the submitted future; cancel it if the caller left while it was submitted."""
        with self._lock:
            self._future = future
            abandoned = self._abandoned
        if abandoned:
            future.cancel()


class _ProcessPoolRunner:
    """Jobs run in a ``concurrent.futures.ProcessPoolExecutor``, awaited through a thread.

    Each call holds a slot of ``limiter`` for as long as its job can run, so at most
    ``processes`` jobs are ever in the pool: a submitted job always finds an idle worker at
    once, and calls that wait for a slot wait in trio, where cancelling them is clean. The
    thread of a cancelled call is abandoned and keeps the slot until the job ends (like an
    abandoned `run_in_thread`), which keeps the bound honest while the job runs on.
    """

    def __init__(self, processes: int, grace: float) -> None:
        self.limiter = trio.CapacityLimiter(processes)
        self._processes = processes
        self._grace = grace
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None  # created on first use, None when broken
        self._closing = False
        self._waiting = 0  # threads submitting or waiting for a job; close() waits for them
        self._all_returned = threading.Condition(self._lock)

    async def run(self, payload: bytes, name: str) -> Any:
        job = _PoolJob(payload, name)
        try:
            return await trio.to_thread.run_sync(
                self._submit_and_wait, job, abandon_on_cancel=True, limiter=self.limiter
            )
        except BaseException:
            job.abandon()
            raise

    def close(self) -> None:
        """Stop the pool's workers and wait for our threads; blocking, so run it in a thread."""
        with self._lock:
            self._closing = True
            pool, self._pool = self._pool, None
            busy = self._waiting > 0
        if pool is not None:
            # At close nobody waits for results any more: a busy worker runs an abandoned job,
            # so kill at once rather than give idle workers a grace period they won't get (the
            # pool sends its shutdown sentinels only after the running jobs end).
            _shutdown_pool(pool, self._grace, kill_now=busy)
        with self._lock:
            # Killing the workers fails their futures, which releases the waiting threads.
            if not self._all_returned.wait_for(lambda: self._waiting == 0, timeout=self._grace):
                logger.warning("process-pool threads still waiting after close: %d", self._waiting)

    # The methods below run in worker threads.

    def _submit_and_wait(self, job: _PoolJob) -> Any:
        with self._lock:
            self._waiting += 1
        try:
            pool, future = self._submit(job)
            try:
                return future.result()
            except BrokenProcessPool as exc:
                self._discard_broken(pool)
                raise WorkerCrashed(
                    f"a worker process of the process pool died while {job.name} was in flight "
                    "(with this backend a crash fails every call in flight on the pool)"
                ) from exc
        finally:
            with self._lock:
                self._waiting -= 1
                self._all_returned.notify_all()

    def _submit(self, job: _PoolJob) -> tuple[ProcessPoolExecutor, Future[Any]]:
        # A pool found broken here broke before this job was sent: retrying on a fresh pool
        # is safe. Bounded, in case workers die as fast as pools are made.
        for _ in range(3):
            if job.abandoned:
                raise FutureCancelledError  # the caller is gone; nobody reads this
            pool = self._current_pool()
            try:
                future = pool.submit(pickle.loads, job.payload)
            except BrokenProcessPool:
                self._discard_broken(pool)
                continue
            job.attach(future)
            return pool, future
        raise WorkerCrashed(f"the process pool kept breaking; {job.name} was not run")

    def _current_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closing:
                raise trio.ClosedResourceError("the executors are closed")
            if self._pool is None:
                self._pool = _new_pool(self._processes)
            return self._pool

    def _discard_broken(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is not pool:
                return  # another thread already discarded it, or close() took it
            self._pool = None  # the next call creates a fresh pool
        _shutdown_pool(pool, self._grace)


def _new_pool(processes: int) -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(
        max_workers=processes,
        # Spawn, like trio-parallel: forking a process that runs trio and threads is unsafe.
        mp_context=multiprocessing.get_context("spawn"),
        # Ctrl-C reaches the whole process group; the server, not the terminal, ends jobs.
        # stdlib callables, so a worker needs no import of ours to run it.
        initializer=signal.signal,
        initargs=(signal.SIGINT, signal.SIG_IGN),
    )
    # Start every worker now rather than on demand. The pool's manager thread watches the
    # workers it knew of when it last woke up, and submit() wakes it *before* spawning: a
    # worker spawned on demand that dies at once goes unnoticed until some other call ends
    # (measured on 3.11: a crash reported after 4.6 s, when a concurrent 5 s job finished).
    # Each call spawns one worker while none is idle, up to max_workers.
    with _sigint_blocked():
        for _ in range(processes):
            pool._adjust_process_count()
    return pool


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread, so workers spawned here start with it blocked.

    A child inherits its spawning thread's signal mask through fork and exec, so a Ctrl-C in the
    ~0.1 s before the pool's initializer runs cannot kill the worker or print a traceback.
    (Creating the pool has started multiprocessing's resource tracker by then; starting the
    tracker inside this block would unblock SIGINT in this thread.)
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _shutdown_pool(pool: ProcessPoolExecutor, grace: float, *, kill_now: bool = False) -> None:
    """Stop a pool's workers and reap them, in about 3 x grace at most (never on the loop).

    Workers get `grace` seconds to exit on the shutdown sentinel, or none if ``kill_now``; the
    rest are killed.
    """
    # shutdown() drops its references to the workers, and the pool has no public handle on
    # them: take them first.
    workers = list((pool._processes or {}).values())
    manager = cast(threading.Thread | None, pool._executor_manager_thread)
    pool.shutdown(wait=False, cancel_futures=True)
    _reap(workers, 0.0 if kill_now else grace, grace)
    if manager is not None:
        manager.join(grace)


def _reap(workers: Sequence[BaseProcess], grace: float, kill_timeout: float) -> None:
    """Give the workers `grace` seconds to exit, SIGKILL the rest, then reap them all."""
    running = _still_running(workers, grace)  # idle workers exit on the shutdown sentinel
    for worker in running:
        worker.kill()  # workers ignore SIGINT; SIGKILL cannot be ignored
    if survivors := _still_running(running, kill_timeout):
        logger.warning("process-pool workers survived SIGKILL: %s", [w.pid for w in survivors])
    for worker in workers:
        worker.join(0)  # reap (unless the pool's manager thread got there first)


def _still_running(workers: Sequence[BaseProcess], timeout: float) -> list[BaseProcess]:
    # Watch the sentinels rather than join(): the pool's manager thread may be reaping the same
    # processes, and a join() that loses that race reports a dead process as still running.
    deadline = time.monotonic() + timeout
    running = list(workers)
    while running:
        remaining = deadline - time.monotonic()
        exited = multiprocessing.connection.wait(
            [w.sentinel for w in running], timeout=max(0.0, remaining)
        )
        running = [w for w in running if w.sentinel not in exited]
        if remaining <= 0:
            break
    return running


@asynccontextmanager
async def _open_process_pool(
    processes: int, idle_timeout: float, grace: float
) -> AsyncIterator[_ProcessPoolRunner]:
    del idle_timeout  # ProcessPoolExecutor workers live as long as their pool
    runner = _ProcessPoolRunner(processes, grace)
    try:
        yield runner
    finally:
        # Shielded so the close completes under cancellation; bounded by the timeouts inside.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(runner.close)


_PROCESS_RUNNER_OPENERS: Final[
    dict[str, Callable[[int, float, float], AbstractAsyncContextManager[_ProcessRunner]]]
] = {
    TRIO_PARALLEL: _open_trio_parallel,
    PROCESS_POOL: _open_process_pool,
}

"""A ``ProcessPoolExecutor`` driven from trio: the cancellation benchmark's peer of trio-parallel.

vtrio runs worker processes through trio-parallel, which kills the worker of a cancelled call.
This is the design it replaces, kept for comparison (the "run_in_process (process-pool)"
case of ``benchmarks.cancel_probe``): ``concurrent.futures`` cannot stop a job that a worker
has started (``Future.cancel()`` only withdraws a job still queued), so the best a trio caller
can do is wait for the future in a thread and abandon that thread when cancelled. The caller
regains control at once; the job runs on to its end in its worker.

Only what the probe needs: one call at a time, no crash recovery, no SIGINT handling (probes
lead sessions of their own and are stopped with SIGKILL, see ``benchmarks.procs``).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import ParamSpec, TypeVar

import trio

P = ParamSpec("P")
T = TypeVar("T")


class ProcessPool:
    """Runs calls in a ``ProcessPoolExecutor``; get one from `open_process_pool`."""

    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self._pool = pool

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` in a worker; if cancelled, return at once.

        A job no worker has taken yet is withdrawn; a started one runs on to its end.
        """
        # submit() spawns a worker when none is idle: a fork and exec, not for the event loop.
        future = await trio.to_thread.run_sync(partial(self._pool.submit, fn, *args, **kwargs))
        try:
            return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        finally:
            future.cancel()  # does nothing once a worker has the job, or once it is done


@asynccontextmanager
async def open_process_pool(processes: int) -> AsyncIterator[ProcessPool]:
    """A pool of at most ``processes`` workers, shut down when the block exits.

    The shutdown withdraws queued jobs, waits for running ones to end (nothing can stop them)
    and for the workers to exit, in a thread; cancellation does not interrupt it.
    """
    # Spawn, like trio-parallel: forking a process that runs trio and threads is unsafe.
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield ProcessPool(pool)
    finally:
        with trio.CancelScope(shield=True):  # the workers must be reaped, cancelled or not
            await trio.to_thread.run_sync(partial(pool.shutdown, wait=True, cancel_futures=True))

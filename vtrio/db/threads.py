"""Running blocking pymongo calls from trio: in a worker thread, under a limiter and a deadline.

The limiter is sized to pymongo's connection pool (``maxPoolSize``), so no thread waits inside
pymongo for a connection. Every call runs inside ``pymongo.timeout(timeout)``: one deadline for
all the round trips the call makes, enforced by pymongo (client-side socket timeouts and
``maxTimeMS`` on the server).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pymongo
import trio

T = TypeVar("T")


async def run_read(fn: Callable[[], T], limiter: trio.CapacityLimiter, op_timeout: float) -> T:
    """Run ``fn`` in a thread; on cancellation, return at once and abandon the thread.

    The abandoned thread keeps running, and keeps its limiter token, until pymongo's timeout
    ends it at the latest; its result or error is discarded. Use only for calls without side
    effects, or with idempotent ones (index creation).
    """
    return await trio.to_thread.run_sync(
        _bounded, fn, op_timeout, abandon_on_cancel=True, limiter=limiter
    )


async def run_write(fn: Callable[[], T], limiter: trio.CapacityLimiter, op_timeout: float) -> T:
    """Run ``fn`` in a thread to its end, whatever happens to the caller meanwhile.

    Cancelled while waiting for a limiter token (nothing sent yet): raises ``Cancelled`` and
    ``fn`` never runs. Cancelled once the thread has started: the thread runs to completion
    (bounded by the timeout) and this returns its result or raises its error, as if not
    cancelled; the caller's next checkpoint raises ``Cancelled``.
    """
    return await trio.to_thread.run_sync(
        _bounded, fn, op_timeout, abandon_on_cancel=False, limiter=limiter
    )


def _bounded(fn: Callable[[], T], op_timeout: float) -> T:
    with pymongo.timeout(op_timeout):
        return fn()

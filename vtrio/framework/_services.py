"""The service tree's two shared pieces: :func:`service`, which runs one service of the tree,
and :class:`Stopping`, the one signal they all watch to stop.

Every service is an async context manager that owns its resources. :func:`service` wraps one so
that a failure, at start-up or while running, comes out as a :class:`ServiceError` naming the
service, instead of a traceback of nested exception groups from the nurseries it ran in.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import TypeVar

import trio

__all__ = ["ServiceError", "Stopping", "background_tasks", "describe", "service"]

log = logging.getLogger("vtrio.services")

T = TypeVar("T")


class Stopping:
    """The one stop signal of a service tree, and the deadline by which the tree must be down.

    Services watch it (:meth:`wait`) to take their first steps the moment a stop is asked for:
    stop accepting, tell every client, stop the running jobs. Their cleanup, which must run
    even though the tree is being cancelled, runs in :meth:`shielded` scopes: shielded from
    that cancellation, but never past :attr:`deadline`, and cut short by :meth:`hurry`.

    The deadline is ``grace_period`` after the stop request; when the tree comes down without
    one (a service failed), ``grace_period`` after the first service to see it calls
    :meth:`coming_down`. Until then a shielded scope is bounded by its own means only. Either
    way the whole teardown is bounded by one grace period: at the deadline (run
    :meth:`hurry_at_deadline` beside the tree) the stop hurries, and what waits on a thread
    that will not end (a write MongoDB never answers, a blocking call) is let go
    (:meth:`on_hurry`).
    """

    def __init__(self, grace_period: float) -> None:
        self.grace_period = grace_period
        self._requested = trio.Event()
        self._deadline: float | None = None
        self._fixed = trio.Event()  # the deadline is known
        self._hurried = False
        self._hurry = trio.Event()
        self._shields: set[trio.CancelScope] = set()
        self._on_hurry: list[Callable[[], None]] = []

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    @property
    def deadline(self) -> float:
        """When the tree must be down: infinity while it is not coming down."""
        return math.inf if self._deadline is None else self._deadline

    def coming_down(self) -> None:
        """The tree is being torn down (stopped, or failing): the grace period starts now,
        unless it started already."""
        if self._deadline is None:
            self._deadline = trio.current_time() + self.grace_period
            self._fixed.set()

    def request(self) -> None:
        """Ask for a graceful stop, within the grace period from now."""
        if not self._requested.is_set():
            self.coming_down()
            self._requested.set()

    def hurry(self) -> None:
        """Stop now: the deadline is now, every shielded cleanup is cancelled, and every
        :meth:`on_hurry` callback is called."""
        if self._hurried:
            return
        self.request()
        self._hurried = True
        self._deadline = trio.current_time()
        self._hurry.set()
        for scope in list(self._shields):
            scope.cancel()
        for callback in list(self._on_hurry):
            try:
                callback()
            except Exception:
                log.exception("a cleanup's hurry failed")

    def on_hurry(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` when the stop hurries (at the deadline, or at once); return the
        function that takes it back."""
        self._on_hurry.append(callback)
        return lambda: self._on_hurry.remove(callback) if callback in self._on_hurry else None

    async def hurry_at_deadline(self) -> None:
        """Hurry the stop once its deadline has passed; for a task that outlives the tree."""
        await self.past_deadline()
        self.hurry()

    async def wait(self) -> None:
        """Return once a stop has been requested."""
        await self._requested.wait()

    async def past_deadline(self) -> None:
        """Return once the deadline is known and has passed (or the stop hurried)."""
        await self._fixed.wait()
        with trio.move_on_at(self.deadline):
            await self._hurry.wait()

    @contextmanager
    def shielded(self) -> Iterator[trio.CancelScope]:
        """A scope for cleanup: not cancelled with the tree, bounded by the deadline."""
        with trio.CancelScope(shield=True, deadline=self.deadline) as scope:
            if self._hurried:
                scope.cancel()
            self._shields.add(scope)
            try:
                yield scope
            finally:
                self._shields.discard(scope)


class ServiceError(Exception):
    """A service of the tree failed to start, failed while running, or failed to stop."""

    def __init__(self, service: str, phase: str, cause: BaseException) -> None:
        super().__init__(f"{service} {phase}: {describe(cause)}")
        self.service = service
        self.phase = phase
        self.__cause__ = cause


def describe(exc: BaseException) -> str:
    """The causes inside ``exc`` as one line, exception groups and cancellations left out."""
    causes = [f"{_brief(leaf)}" for leaf in leaves(exc) if not isinstance(leaf, trio.Cancelled)]
    return "; ".join(dict.fromkeys(causes)) or "cancelled"


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def _brief(exc: BaseException) -> str:
    message = str(exc)
    # Our own errors say what to do in their message; a foreign one needs its type to be read.
    if type(exc).__module__.startswith("vtrio") and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@asynccontextmanager
async def service(name: str, resource: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """Enter ``resource`` as the service ``name``; log its start and stop with their durations.

    Raises :class:`ServiceError` if the service fails to start, or if it fails while running or
    stopping (its own tasks died). A failure of a service nested inside passes through unchanged,
    so the error names the service that failed first. Cancellation passes through as it is.
    """
    started = time.perf_counter()
    log.debug("%s: starting", name)
    try:
        value = await resource.__aenter__()
    except BaseException as exc:
        _reraise(name, "failed to start", exc)
        raise
    log.info("%s: started in %.3f s", name, time.perf_counter() - started)
    try:
        yield value
    except BaseException as exc:
        stopping = time.perf_counter()
        try:
            if await resource.__aexit__(type(exc), exc, exc.__traceback__):
                return
        except BaseException as stop_exc:
            if stop_exc is not exc and _only_cancelled_besides(exc, stop_exc):
                raise exc from None  # the body's own exception, out of the service's nursery
            _reraise(name, "failed", stop_exc)
            raise
        finally:
            _log_stop(name, stopping)
        raise
    stopping = time.perf_counter()
    try:
        await resource.__aexit__(None, None, None)
    except BaseException as stop_exc:
        _reraise(name, "failed", stop_exc)
        raise
    finally:
        _log_stop(name, stopping)


@asynccontextmanager
async def background_tasks() -> AsyncIterator[trio.Nursery]:
    """A nursery for a context manager's own background tasks, cancelled when the block ends.

    Error handling: an exception raised by the block comes out as itself, not wrapped in the
    ExceptionGroup the nursery would make of it; a task's own failure comes out in a group.
    """
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                raised = exc
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if raised is not None and _only_cancelled_besides(raised, group):
            raise raised from None
        raise


def _only_cancelled_besides(exc: BaseException, group: BaseException) -> bool:
    """Whether ``group`` holds nothing but ``exc`` (or its leaves) and cancellations: the
    body's own exception, wrapped on its way out of the service's nurseries."""
    own = {id(leaf) for leaf in leaves(exc)}
    return all(id(leaf) in own or isinstance(leaf, trio.Cancelled) for leaf in leaves(group))


def _reraise(name: str, phase: str, exc: BaseException) -> None:
    """Raise ``exc`` as a ServiceError of ``name``, unless it is cancellation or already named.

    When this service failed itself and services inside it failed too, this service's failure
    came first: theirs happened while the tree was being torn down because of it.
    """
    found = leaves(exc)
    own = [leaf for leaf in found if not isinstance(leaf, trio.Cancelled | ServiceError)]
    nested = [leaf for leaf in found if isinstance(leaf, ServiceError)]
    if own and not any(isinstance(leaf, KeyboardInterrupt) for leaf in own):
        for later in nested:
            log.warning("while stopping after %s failed: %s", name, later)
        raise ServiceError(name, phase, BaseExceptionGroup("", own) if len(own) > 1 else own[0])
    if nested:
        nested[0].__suppress_context__ = True  # the groups it travelled through add nothing
        raise nested[0]


def _log_stop(name: str, since: float) -> None:
    log.info("%s: stopped in %.3f s", name, time.perf_counter() - since)

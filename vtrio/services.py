"""Running one service of the tree: timing and logging its start and stop, naming its failures.

Every service is an async context manager that owns its resources. :func:`service` wraps one so
that a failure, at start-up or while running, comes out as a :class:`ServiceError` naming the
service, instead of a traceback of nested exception groups from the nurseries it ran in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypeVar

import trio

log = logging.getLogger("vtrio.services")

T = TypeVar("T")


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


def _only_cancelled_besides(exc: BaseException, group: BaseException) -> bool:
    return all(leaf is exc or isinstance(leaf, trio.Cancelled) for leaf in leaves(group))


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

"""When and how long to wait before asking a remote API again: one policy for every client.

A :class:`RetryPolicy` runs one request, as a callable that makes a single attempt, and tries
again after network errors, ``429 Too Many Requests`` and ``5xx`` answers. The waits grow
exponentially with jitter, a ``Retry-After`` header (seconds or an HTTP date) replaces the
computed wait, and the whole run is bounded twice: by a number of attempts and by a total time
that covers the attempts and the waits between them.

Any other answer (``200``, ``304``, ``404`` ...) is returned to the caller to interpret, and any
other exception raised by the attempt (including the caller's own errors, raised from inside the
attempt to stop at once) propagates untouched. When the policy gives up it raises
:class:`RetriesExhausted`, which each client turns into an error of its own module.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import trio

__all__ = [
    "RETRYABLE_ERRORS",
    "RetriesExhausted",
    "RetryPolicy",
    "describe_outcome",
    "is_retryable_status",
    "parse_retry_after",
]

logger = logging.getLogger(__name__)

#: Transport failures worth another attempt: the connection failed, broke, stalled or was
#: answered with something that is not HTTP. ``httpx.UnsupportedProtocol`` and
#: ``httpx.LocalProtocolError`` are left out: asking again cannot fix our own mistake.
RETRYABLE_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


def is_retryable_status(status_code: int) -> bool:
    """Whether an answer with this status is worth another attempt: 429 and every 5xx."""
    return status_code == 429 or 500 <= status_code <= 599


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header, or ``None`` if it says nothing usable.

    Both forms of RFC 9110 are understood: a number of seconds (``"120"``) and an HTTP date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``), the latter measured from ``now`` (default: the
    current UTC time). A date in the past means "now" (``0.0``); garbage means ``None``.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates come back naive; HTTP dates are always UTC
        when = when.replace(tzinfo=UTC)
    current = now if now is not None else datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


def describe_outcome(outcome: httpx.Response | BaseException | None) -> str:
    """A short phrase for an attempt's result, for error messages: ``HTTP 503 Service ...``."""
    if isinstance(outcome, httpx.Response):
        return f"HTTP {outcome.status_code} {outcome.reason_phrase}".rstrip()
    if isinstance(outcome, BaseException):
        detail = str(outcome)
        return f"{type(outcome).__name__}: {detail}" if detail else type(outcome).__name__
    return "no answer"


def _attempts(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


class RetriesExhausted(Exception):
    """The policy stopped trying: out of attempts or out of time.

    ``last_response`` is the last answer received (``None`` if the last attempt failed without
    one, and then the exception is chained as ``__cause__``); ``retry_after`` is the wait the
    server last asked for, in seconds, if it asked.
    """

    def __init__(
        self,
        reason: str,
        *,
        attempts: int,
        elapsed: float,
        last_response: httpx.Response | None,
        retry_after: float | None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_response = last_response
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, honouring ``Retry-After``, bounded in attempts and time.

    The wait before retry *n* (1 for the first retry) is drawn from ``[d/2, d]`` with
    ``d = min(max_delay, base_delay * 2 ** (n - 1))``; a ``Retry-After`` header replaces it.
    ``max_total`` bounds the whole run, attempts and waits included: an attempt still running
    at that moment is cancelled, and a wait that would end after it is not started.
    """

    max_attempts: int = 4
    max_total: float = 60.0
    base_delay: float = 0.5
    max_delay: float = 8.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("max_total", "base_delay", "max_delay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")

    def backoff(self, retry: int) -> float:
        """The computed wait, in seconds, before retry number ``retry`` (1 for the first)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (retry - 1))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    async def run(
        self, attempt: Callable[[], Awaitable[httpx.Response]], *, what: str = "request"
    ) -> httpx.Response:
        """Call ``attempt`` until it returns an answer not worth retrying, and return that.

        ``attempt`` makes one request and returns its response (body read). Network errors
        (:data:`RETRYABLE_ERRORS`) and retryable statuses lead to another attempt; anything else
        it raises propagates at once. ``what`` names the request in log lines.

        Raises :class:`RetriesExhausted` when attempts or time run out.

        On cancellation: the cancellation propagates unchanged (it is never turned into
        :class:`RetriesExhausted`); an attempt in progress is cancelled with it and a wait is cut
        short, so nothing of the run outlives the call.
        """
        start = trio.current_time()
        deadline = start + self.max_total
        last_response: httpx.Response | None = None
        retry_after: float | None = None
        previous = "it was the first"

        for number in range(1, self.max_attempts + 1):
            response: httpx.Response | None = None
            error: httpx.TransportError | None = None
            with trio.move_on_at(deadline) as budget:
                try:
                    response = await attempt()
                except RETRYABLE_ERRORS as exc:
                    error = exc
            elapsed = trio.current_time() - start
            if budget.cancelled_caught:
                raise RetriesExhausted(
                    f"gave up: the retry budget of {self.max_total:g} s ran out during attempt "
                    f"{number} ({previous})",
                    attempts=number,
                    elapsed=elapsed,
                    last_response=last_response,
                    retry_after=retry_after,
                )
            if response is not None:
                if not is_retryable_status(response.status_code):
                    return response
                last_response = response
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            else:
                retry_after = None
            outcome = describe_outcome(response if response is not None else error)
            previous = f"the attempt before it: {outcome}"

            if number == self.max_attempts:
                raise RetriesExhausted(
                    f"gave up after {_attempts(number)} in {elapsed:.1f} s (last: {outcome})",
                    attempts=number,
                    elapsed=elapsed,
                    last_response=last_response,
                    retry_after=retry_after,
                ) from error

            delay = retry_after if retry_after is not None else self.backoff(number)
            if trio.current_time() + delay > deadline:
                if retry_after is not None:
                    why = f"the server asked to wait {delay:.1f} s, more than is left"
                else:
                    why = f"the next wait ({delay:.1f} s) would go past the end"
                raise RetriesExhausted(
                    f"gave up after {_attempts(number)} in {elapsed:.1f} s "
                    f"(last: {outcome}): {why} of the {self.max_total:g} s retry budget",
                    attempts=number,
                    elapsed=elapsed,
                    last_response=last_response,
                    retry_after=retry_after,
                ) from error

            logger.info(
                "%s: attempt %d of %d failed (%s); retrying in %.2f s",
                what,
                number,
                self.max_attempts,
                outcome,
                delay,
            )
            await trio.sleep(delay)

        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

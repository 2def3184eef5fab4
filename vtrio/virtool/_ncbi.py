"""NCBI E-utilities: fetch a nucleotide record by accession, politely.

:class:`NCBIClient` fetches GenBank flat files with ``efetch`` (``db=nuccore``,
``rettype=gb``, ``retmode=text``) through the app's shared :class:`~vtrio.framework.HttpClient`,
reads them with :func:`~vtrio.virtool._genbank.parse_genbank` and keeps to NCBI's rate limit,
3 requests per second without an API key and 10 with one, across every task using the client.
It retries with `stamina <https://stamina.hynek.me>`_, as :class:`RetrySettings` describes.

NCBI reports an accession it does not know in two ways, both handled as
:class:`AccessionNotFound`: an HTTP 400 whose body says so (``Error: F a i l e d  t o
u n d e r s t a n d  i d : ...``, letters spaced out as NCBI sends them) or a ``200`` with an
empty body.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import stamina
import trio

from vtrio.framework import HttpClient
from vtrio.virtool._genbank import GenBankError, GenBankRecord, parse_genbank

__all__ = [
    "DEFAULT_BASE_URL",
    "AccessionNotFound",
    "NCBIBadResponse",
    "NCBIClient",
    "NCBIError",
    "NCBIUnavailable",
    "RequestRateLimiter",
    "RetrySettings",
    "validate_accession",
]

DEFAULT_BASE_URL = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils"

#: Requests per second NCBI allows without and with an API key.
RATE_WITHOUT_KEY = 3
RATE_WITH_KEY = 10

# GenBank/ENA/DDBJ nucleotide accessions (1 letter + 5 digits, 2 letters + 6 or 8 digits,
# 4-6 letter WGS/TSA prefixes + 8-10 digits) and RefSeq ones (NC_001367, NZ_CP012345,
# NZ_ABCD01000001), each optionally with a version.
_ACCESSION = re.compile(r"(?:[A-Z]{1,6}\d{5,10}|[A-Z]{2}_[A-Z]{0,6}\d{5,10})(?:\.\d+)?")


class NCBIError(Exception):
    """Base class of every NCBI failure; the message says what to do about it."""


class AccessionNotFound(NCBIError):
    """NCBI has no nucleotide record with this accession."""

    def __init__(self, accession: str, detail: str | None = None) -> None:
        message = (
            f"NCBI has no nucleotide record with accession {accession!r}: "
            "check the accession for typos, and that it is a nucleotide (not protein) record"
        )
        if detail:
            message += f" ({detail})"
        super().__init__(message)
        self.accession = accession


class NCBIUnavailable(NCBIError):
    """NCBI kept failing (network errors, 429 or 5xx) until the client stopped retrying."""


class NCBIBadResponse(NCBIError):
    """NCBI answered with something this client does not understand."""


def validate_accession(accession: str) -> str:
    """The accession, stripped and upper-cased, or ``ValueError`` if it cannot be one."""
    if not isinstance(accession, str):
        raise ValueError(f"an accession must be a string, got {accession!r}")
    normalized = accession.strip().upper()
    if not _ACCESSION.fullmatch(normalized):
        raise ValueError(
            f"{accession!r} is not a nucleotide accession: expected something like "
            "'AB123456', 'AB123456.1' or 'NC_001367.1'"
        )
    return normalized


class RequestRateLimiter:
    """At most ``max_requests`` requests reach the server in any ``period`` seconds.

    Use ``async with limiter.slot(): <one request>``. A slot is handed out again only
    ``period`` seconds after the request that used it *finished*. A response proves the
    server had received the request, so however the network delays requests, the server never
    sees more than ``max_requests`` arrivals in one period (a limiter that only spaced out
    starts could be seen to burst by a server after uneven delays). Requests in flight count
    against the limit, so the throughput is ``max_requests / (period + response time)``.

    Waiters are served first come, first served. One limiter serves every task using it.
    """

    def __init__(self, max_requests: int, period: float = 1.0) -> None:
        if max_requests < 1 or period <= 0:
            raise ValueError("a rate limit needs max_requests >= 1 and period > 0")
        self.max_requests = max_requests
        self.period = period
        self._in_flight = 0
        # Times at which finished slots may be used again, earliest first: every release
        # appends now + period, so the deque stays sorted.
        self._reusable_at: deque[float] = deque()
        self._queue = trio.Lock()  # trio's Lock is fair: waiters go in arrival order
        self._released = trio.Event()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a slot, hold it for the block, then let it rest for one period.

        On cancellation while waiting: nothing is taken. On cancellation inside the block: the
        slot is released as for any other exit (and rests for one period, as the request may
        have reached the server).
        """
        async with self._queue:
            await self._wait_for_a_free_slot()
            self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._reusable_at.append(trio.current_time() + self.period)
            self._released.set()
            self._released = trio.Event()

    async def _wait_for_a_free_slot(self) -> None:
        """Return once a slot is unused or rested (taking a rested one off the queue)."""
        while self.max_requests - self._in_flight - len(self._reusable_at) <= 0:
            if not self._reusable_at:  # every slot is in flight: wait for one to finish
                await self._released.wait()
            elif self._reusable_at[0] <= trio.current_time():
                self._reusable_at.popleft()
                return
            else:
                await trio.sleep_until(self._reusable_at[0])


# --- retrying ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrySettings:
    """How :class:`NCBIClient` retries after network errors, ``429`` and ``5xx`` answers.

    At most ``attempts`` tries, all within ``timeout`` seconds, waits included: an attempt or a
    wait still running when the time is up is cut short. The wait before retry *n* (1 for the
    first) is stamina's exponential backoff with jitter, ``min(wait_max, wait_initial *
    2 ** (n - 1) + random.uniform(0, wait_jitter))`` seconds, unless the answer carried a
    ``Retry-After`` header: then NCBI's wait is used, or, if it would end after ``timeout``,
    the client gives up at once.
    """

    attempts: int = 4
    timeout: float = 60.0
    wait_initial: float = 0.5
    wait_max: float = 8.0
    wait_jitter: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.attempts, int) and self.attempts >= 1):
            raise ValueError(f"attempts must be a positive integer, got {self.attempts!r}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        for name in ("wait_initial", "wait_max", "wait_jitter"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")


class _RetryableAnswer(Exception):
    """A ``429`` or ``5xx`` answer, raised because stamina retries on exceptions only."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(_status_line(response))
        self.response = response
        self.retry_after = _retry_after(response.headers.get("retry-after"))


#: What is worth another attempt: busy or failing servers, and connections that failed, broke,
#: stalled or were answered with something that is not HTTP. ``httpx.UnsupportedProtocol`` and
#: ``httpx.LocalProtocolError`` are left out: asking again cannot fix our own mistake.
_RETRYABLE: tuple[type[Exception], ...] = (
    _RetryableAnswer,
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


class _Retries:
    """One request's retries, as stamina's attempts: ``async for attempt in _Retries(...)``.

    It also keeps what the message for giving up needs, and adds what stamina does not do.
    stamina checks its ``timeout`` only between attempts and sleeps a ``Retry-After`` however
    long it is; so the caller runs the loop under a trio deadline at :attr:`deadline`, which
    cuts short an attempt or a wait, and :meth:`_should_retry` refuses a wait ending after it.
    """

    def __init__(self, settings: RetrySettings) -> None:
        self.settings = settings
        self.started = trio.current_time()
        self.deadline = self.started + settings.timeout
        self.attempts = 0  # attempts started so far
        self.last_failure: Exception | None = None
        self.refused_wait: float | None = None
        self._stamina = aiter(
            stamina.retry_context(
                on=self._should_retry,
                attempts=settings.attempts,
                timeout=None,  # bounded by the caller's trio deadline instead
                wait_initial=settings.wait_initial,
                wait_max=settings.wait_max,
                wait_jitter=settings.wait_jitter,
            )
        )

    def __aiter__(self) -> _Retries:
        return self

    async def __anext__(self) -> stamina.Attempt:
        attempt = await anext(self._stamina)
        self.attempts = attempt.num
        return attempt

    def _should_retry(self, failure: BaseException) -> bool | float:
        """stamina's ``on`` hook: ``False``, ``True`` for stamina's backoff, or NCBI's wait."""
        if not isinstance(failure, _RETRYABLE):
            return False  # stamina re-raises it as it came: trio.Cancelled, our own errors
        self.last_failure = failure
        wait = failure.retry_after if isinstance(failure, _RetryableAnswer) else None
        if wait is None:
            return True  # stamina's backoff
        if trio.current_time() + wait > self.deadline:
            self.refused_wait = wait  # waiting would only delay the failure
            return False
        return wait

    def reason(self, *, out_of_time: bool = False) -> str:
        """Why the retries stopped, with the attempts, the time and the last failure."""
        elapsed = trio.current_time() - self.started
        attempts = f"{self.attempts} attempt" + ("" if self.attempts == 1 else "s")
        text = f"gave up after {attempts} in {elapsed:.1f} s (last: {_describe(self.last_failure)})"
        limit = f"{self.settings.timeout:g} s time limit"
        if out_of_time:
            return f"{text}: the {limit} ran out"
        if self.refused_wait is not None and self.attempts < self.settings.attempts:
            left = max(0.0, self.deadline - trio.current_time())
            return (
                f"{text}: NCBI asked to wait {self.refused_wait:.1f} s, longer than the "
                f"{left:.1f} s left of the {limit}"
            )
        return text


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header, or ``None`` if it says nothing usable.

    Both forms of RFC 9110 are understood: a number of seconds (``"120"``) and an HTTP date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``); a date in the past means "now" (``0.0``).
    """
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates come back naive; HTTP dates are always UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _status_line(response: httpx.Response) -> str:
    """``HTTP 503 Service Unavailable``."""
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def _describe(failure: Exception | None) -> str:
    """A short phrase for a failed attempt, for messages: ``HTTP 503 Service Unavailable``."""
    if failure is None:
        return "no answer"
    if isinstance(failure, _RetryableAnswer):
        return str(failure)
    detail = str(failure)
    return f"{type(failure).__name__}: {detail}" if detail else type(failure).__name__


# --- the client --------------------------------------------------------------------------


class NCBIClient:
    """Fetches GenBank records from NCBI E-utilities through the app's shared client.

    One client keeps to NCBI's rate limit (3 requests per second, 10 with ``api_key``) across
    all the tasks that use it, and retries network errors, ``429`` and ``5xx`` answers as
    ``retry`` says (default: ``RetrySettings()``). Every attempt, first or retry, waits its
    turn with the rate limit like any request.
    """

    def __init__(
        self,
        http: HttpClient,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        retry: RetrySettings | None = None,
    ) -> None:
        self._http = http
        self._efetch_url = base_url.rstrip("/") + "/efetch.fcgi"
        self._api_key = api_key or None
        self._retry = retry if retry is not None else RetrySettings()
        self._rate_limiter = RequestRateLimiter(
            RATE_WITH_KEY if self._api_key else RATE_WITHOUT_KEY, period=1.0
        )

    async def fetch_genbank(self, accession: str) -> GenBankRecord:
        """The GenBank record for ``accession`` (with or without a version).

        Error handling:
            Raises ``ValueError`` before any request if ``accession`` cannot be an accession,
            :class:`AccessionNotFound` if NCBI has no such record, :class:`NCBIUnavailable`
            when NCBI kept failing until the retries ran out, :class:`NCBIBadResponse` for an
            answer that cannot be read, :class:`NCBIError` if NCBI rejected the API key.

        Resource handling:
            On cancellation the request in flight is abandoned (the shared client stays
            usable), a wait between attempts is cut short and the rate-limit slot is released;
            nothing is left running, and the cancellation propagates as it came.
        """
        accession = validate_accession(accession)
        response = await self._efetch_with_retries(accession)
        return _read_record(accession, response)

    async def _efetch_with_retries(self, accession: str) -> httpx.Response:
        """The first efetch answer not worth retrying, or :class:`NCBIUnavailable`."""
        params = self._efetch_params(accession)
        retries = _Retries(self._retry)
        with trio.move_on_at(retries.deadline):
            try:
                async for attempt in retries:
                    with attempt:
                        return await self._efetch_once(params)
            except _RETRYABLE as exc:  # stamina stopped retrying and re-raised the last one
                raise self._unavailable(accession, retries) from exc
        raise self._unavailable(accession, retries, out_of_time=True) from retries.last_failure

    def _efetch_params(self, accession: str) -> dict[str, str]:
        params = {"db": "nuccore", "id": accession, "rettype": "gb", "retmode": "text"}
        params["tool"] = "vtrio"  # NCBI asks callers to name themselves
        if self._api_key:
            params["api_key"] = self._api_key
        return params

    async def _efetch_once(self, params: dict[str, str]) -> httpx.Response:
        """One efetch request in its turn under the rate limit; ``429``/``5xx`` raise."""
        async with self._rate_limiter.slot():
            response = await self._http.get(self._efetch_url, params=params)
        if response.status_code == 429 or 500 <= response.status_code <= 599:
            raise _RetryableAnswer(response)
        return response

    def _unavailable(
        self, accession: str, retries: _Retries, *, out_of_time: bool = False
    ) -> NCBIUnavailable:
        """The error for giving up on ``accession``, with advice fitting the last failure."""
        last = retries.last_failure
        if isinstance(last, _RetryableAnswer) and last.response.status_code == 429:
            advice = (
                "NCBI is rate-limiting this address (other programs here may be using it "
                "too); try again later"
            )
            if not self._api_key:
                advice += ", or configure an NCBI API key for a higher limit"
        else:
            advice = "NCBI may be down or busy; try again later"
        return NCBIUnavailable(
            f"NCBI E-utilities failed to deliver {accession!r}: "
            f"{retries.reason(out_of_time=out_of_time)}. {advice}"
        )


# --- reading efetch's answers ------------------------------------------------------------


def _read_record(accession: str, response: httpx.Response) -> GenBankRecord:
    """The record in an efetch answer not worth retrying, or the error it amounts to."""
    body = response.text
    if response.status_code == 400:
        raise _refusal(accession, body)
    if response.status_code != 200:
        raise NCBIBadResponse(
            f"NCBI answered {_status_line(response)} for {accession!r}"
            f"{': ' + _ncbi_message(body) if body.strip() else ''}; "
            "if this persists, report it"
        )
    if not body.strip():
        raise AccessionNotFound(accession, "NCBI sent an empty record")
    if not body.lstrip().startswith("LOCUS"):
        raise _not_a_record(accession, body)
    try:
        return parse_genbank(body)
    except GenBankError as exc:
        raise NCBIBadResponse(
            f"NCBI's record for {accession!r} cannot be read ({exc}); if this persists, report it"
        ) from exc


def _refusal(accession: str, body: str) -> NCBIError:
    """What an HTTP 400 from efetch means: a rejected API key or, usually, an unknown id."""
    detail = _ncbi_message(body)
    if "api key" in body.lower() or "api_key" in body.lower():
        return NCBIError(
            f"NCBI rejected the API key ({detail}): check the configured NCBI API key, "
            "or remove it to use the keyless rate limit"
        )
    return AccessionNotFound(accession, f"NCBI said: {detail}" if detail else None)


def _not_a_record(accession: str, body: str) -> NCBIError:
    """What a ``200`` that is not a GenBank record means: an error message or a stray page."""
    message = _ncbi_message(body)
    if re.search(r"understand id|id list is empty|cannot process id", message, re.I):
        return AccessionNotFound(accession, f"NCBI said: {message}")
    return NCBIBadResponse(
        f"NCBI's answer for {accession!r} is not a GenBank record "
        f"(it starts {body.lstrip()[:60]!r}); if this persists, report it"
    )


def _ncbi_message(body: str) -> str:
    """NCBI's error text on one line, letters un-spaced (``F a i l e d`` -> ``Failed``)."""
    text = " ".join(body.splitlines()).strip()
    if re.search(r"(?:\S ){5,}\S", text):
        # NCBI spaces out letters and separates words by two spaces: close up every run of
        # single characters separated by single spaces.
        text = re.sub(
            r"(?<!\S)\S(?: \S)+(?!\S)", lambda match: match.group().replace(" ", ""), text
        )
    return " ".join(text.split())[:200]

"""NCBI E-utilities: fetch a nucleotide record by accession, politely.

:class:`NCBIClient` fetches GenBank flat files with ``efetch`` (``db=nuccore``,
``rettype=gb``, ``retmode=text``) through the app's shared :class:`~vtrio.http.HttpClient`,
parses them with :func:`parse_genbank` and keeps to NCBI's rate limit, 3 requests per second
without an API key and 10 with one, across every task using the client.

NCBI reports an accession it does not know in two ways, both handled as
:class:`AccessionNotFound`: an HTTP 400 whose body says so (``Error: F a i l e d  t o
u n d e r s t a n d  i d : ...``, letters spaced out as NCBI sends them) or a ``200`` with an
empty body.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import trio

from vtrio.http import HttpClient
from vtrio.retry import RetriesExhausted, RetryPolicy, describe_outcome

__all__ = [
    "DEFAULT_BASE_URL",
    "AccessionNotFound",
    "GenBankRecord",
    "NCBIBadResponse",
    "NCBIClient",
    "NCBIError",
    "NCBIUnavailable",
    "RequestRateLimiter",
    "parse_genbank",
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
    """NCBI kept failing (network errors, 429 or 5xx) until the retry policy gave up."""


class NCBIBadResponse(NCBIError):
    """NCBI answered with something this client does not understand."""


@dataclass(frozen=True)
class GenBankRecord:
    """The parts of a GenBank nucleotide record vtrio uses.

    ``definition`` is the DEFINITION text on one line without its final period; ``host`` is
    the source feature's ``/host`` qualifier, ``None`` when the record has none; ``sequence``
    is upper case with no spaces or digits.
    """

    accession: str
    version: int
    definition: str
    organism: str
    host: str | None
    sequence: str

    @property
    def accession_version(self) -> str:
        """The versioned accession, as NCBI writes it: ``NC_001367.1``."""
        return f"{self.accession}.{self.version}"


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
            while True:
                unused = self.max_requests - self._in_flight - len(self._reusable_at)
                if unused > 0:
                    break
                if self._reusable_at:
                    ready_at = self._reusable_at[0]
                    if ready_at <= trio.current_time():
                        self._reusable_at.popleft()
                        break
                    await trio.sleep_until(ready_at)
                else:  # every slot is in flight: wait for one to finish
                    await self._released.wait()
            self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._reusable_at.append(trio.current_time() + self.period)
            self._released.set()
            self._released = trio.Event()


class NCBIClient:
    """Fetches GenBank records from NCBI E-utilities through the app's shared client.

    One client keeps to NCBI's rate limit (3 requests per second, 10 with ``api_key``) across
    all the tasks that use it, retries (network errors, 429, 5xx) with ``retry`` (default:
    ``RetryPolicy()``), and each retry takes its turn with the rate limit like any request.
    """

    def __init__(
        self,
        http: HttpClient,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._http = http
        self._efetch_url = base_url.rstrip("/") + "/efetch.fcgi"
        self._api_key = api_key or None
        self._retry = retry if retry is not None else RetryPolicy()
        self._rate_limiter = RequestRateLimiter(
            RATE_WITH_KEY if self._api_key else RATE_WITHOUT_KEY, period=1.0
        )

    async def fetch_genbank(self, accession: str) -> GenBankRecord:
        """The GenBank record for ``accession`` (with or without a version).

        Raises ``ValueError`` before any request if ``accession`` cannot be an accession,
        :class:`AccessionNotFound` if NCBI has no such record, :class:`NCBIUnavailable` when
        NCBI kept failing until the retry policy gave up, :class:`NCBIBadResponse` for an
        answer that cannot be read.

        On cancellation: the request in flight is abandoned (the shared client stays usable)
        and its rate-limit slot is released; nothing is left running.
        """
        accession = validate_accession(accession)
        params = {
            "db": "nuccore",
            "id": accession,
            "rettype": "gb",
            "retmode": "text",
            "tool": "vtrio",
        }
        if self._api_key:
            params["api_key"] = self._api_key

        async def attempt() -> httpx.Response:
            async with self._rate_limiter.slot():
                return await self._http.get(self._efetch_url, params=params)

        try:
            response = await self._retry.run(attempt, what=f"NCBI efetch {accession}")
        except RetriesExhausted as exc:
            last = exc.last_response
            if last is not None and last.status_code == 429:
                advice = (
                    "NCBI is rate-limiting this address (other programs here may be using it "
                    "too); try again later"
                )
                if not self._api_key:
                    advice += ", or configure an NCBI API key for a higher limit"
            else:
                advice = "NCBI may be down or busy; try again later"
            raise NCBIUnavailable(
                f"NCBI E-utilities failed to deliver {accession!r}: {exc.reason}. {advice}"
            ) from exc

        body = response.text
        if response.status_code == 400:
            detail = _ncbi_message(body)
            if "api key" in body.lower() or "api_key" in body.lower():
                raise NCBIError(
                    f"NCBI rejected the API key ({detail}): check the configured NCBI API key, "
                    "or remove it to use the keyless rate limit"
                )
            raise AccessionNotFound(accession, f"NCBI said: {detail}" if detail else None)
        if response.status_code != 200:
            raise NCBIBadResponse(
                f"NCBI answered {describe_outcome(response)} for {accession!r}"
                f"{': ' + _ncbi_message(body) if body.strip() else ''}; "
                "if this persists, report it"
            )
        if not body.strip():
            raise AccessionNotFound(accession, "NCBI sent an empty record")
        if not body.lstrip().startswith("LOCUS"):
            message = _ncbi_message(body)
            if re.search(r"understand id|id list is empty|cannot process id", message, re.I):
                raise AccessionNotFound(accession, f"NCBI said: {message}")
            raise NCBIBadResponse(
                f"NCBI's answer for {accession!r} is not a GenBank record "
                f"(it starts {body.lstrip()[:60]!r}); if this persists, report it"
            )
        return parse_genbank(body)


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


# --- GenBank flat file -------------------------------------------------------------------

_HEADER_INDENT = 12  # column where header values start
_FEATURE_INDENT = 21  # column where feature locations and qualifiers start


def parse_genbank(text: str) -> GenBankRecord:
    """Read the first record of a GenBank flat file (NCBI's ``rettype=gb`` output).

    Raises :class:`NCBIBadResponse` if the text is not a complete GenBank record with a
    sequence.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("LOCUS")), None)
    if start is None:
        raise NCBIBadResponse("not a GenBank record: no LOCUS line")

    sections: dict[str, list[str]] = {}
    sequence_parts: list[str] = []
    feature_lines: list[str] = []
    keyword = "LOCUS"
    ended = False
    for line in lines[start:]:
        if line.startswith("//"):
            ended = True
            break
        if line[:1].strip():  # a new top-level keyword in column 1
            keyword = line[:_HEADER_INDENT].split()[0]
            if keyword != "ORIGIN":
                sections.setdefault(keyword, []).append(line)
        elif keyword == "ORIGIN":
            sequence_parts.append("".join(ch for ch in line if ch.isalpha()))
        elif keyword == "FEATURES":
            feature_lines.append(line)
        else:
            sections[keyword].append(line)
    if not ended:
        raise NCBIBadResponse("GenBank record is truncated: no '//' line at its end")

    def header(name: str) -> list[str]:
        if name not in sections:
            raise NCBIBadResponse(f"GenBank record has no {name} line")
        return sections[name]

    accession_words = _join_header(header("ACCESSION")).split()
    version_words = _join_header(header("VERSION")).split()
    if not accession_words or not version_words:
        raise NCBIBadResponse("GenBank record has an empty ACCESSION or VERSION line")
    accession = accession_words[0]
    versioned = re.fullmatch(re.escape(accession) + r"\.(\d+)", version_words[0])
    if versioned is None:
        raise NCBIBadResponse(
            f"GenBank VERSION {version_words[0]!r} does not match ACCESSION {accession!r}"
        )

    definition = _join_header(header("DEFINITION"))
    if definition.endswith("."):
        definition = definition[:-1]

    source = _source_qualifiers(feature_lines)
    organism = source.get("organism") or _organism_from_source(sections.get("SOURCE", []))
    if not organism:
        raise NCBIBadResponse(f"GenBank record {accession} names no organism")

    sequence = "".join(sequence_parts).upper()
    if not sequence:
        raise NCBIBadResponse(
            f"GenBank record {accession} has no sequence (no ORIGIN section, as in CONTIG "
            "records); fetch a record that carries its sequence"
        )

    return GenBankRecord(
        accession=accession,
        version=int(versioned.group(1)),
        definition=definition,
        organism=organism,
        host=source.get("host"),
        sequence=sequence,
    )


def _join_header(lines: list[str]) -> str:
    """A header section's value: its first line after the keyword plus continuation lines."""
    return " ".join(" ".join(line[_HEADER_INDENT:].split()) for line in lines).strip()


def _organism_from_source(lines: list[str]) -> str:
    """The ORGANISM sub-keyword's name (its lineage lines, with ';' or a final '.', excluded)."""
    name: list[str] = []
    for line in lines:
        label = line[:_HEADER_INDENT].strip()
        if label == "ORGANISM":
            name = [line[_HEADER_INDENT:].strip()]
        elif name and not label:
            value = line[_HEADER_INDENT:].strip()
            if ";" in value or value.endswith("."):
                break  # the lineage starts
            name.append(value)
        elif name:
            break
    return " ".join(name)


def _source_qualifiers(feature_lines: list[str]) -> dict[str, str]:
    """The qualifiers of the first ``source`` feature, values unquoted, wrapped lines joined."""
    qualifiers: dict[str, str] = {}
    in_source = False
    current: list[str] | None = None  # pieces of the qualifier being read
    current_name = ""

    def finish() -> None:
        if current is not None and current_name not in qualifiers:
            value = " ".join(current)
            if value.startswith('"'):
                value = value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:]
                value = value.replace('""', '"')
            qualifiers[current_name] = value

    for line in feature_lines:
        key = line[5:_FEATURE_INDENT].strip()
        if key:  # a new feature starts
            if in_source:
                break
            in_source = key == "source"
            continue
        if not in_source:
            continue
        text = line[_FEATURE_INDENT:].strip()
        inside_quotes = current is not None and " ".join(current).count('"') % 2 == 1
        if text.startswith("/") and not inside_quotes:
            finish()
            name, _, value = text[1:].partition("=")
            current_name, current = name, [value] if value else []
        elif current is not None:
            current.append(text)
    if in_source:
        finish()
    return qualifiers

"""The NCBI E-utilities client against a real local server speaking efetch's formats."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import stamina
import trio
from stamina.instrumentation import RetryDetails

from tests.http_servers import (
    NCBI_UNKNOWN_ID_BODY,
    SATELLITE_RECORD,
    TMV_RECORD,
    TMV_SEQUENCE,
    Reply,
    ScriptedServer,
    genbank_reply,
    http_date,
    max_in_window,
    ncbi_efetch,
    ncbi_unknown_id,
    serve,
)
from vtrio import __version__
from vtrio.framework._http import HttpClient, open_http_client
from vtrio.virtool._genbank import GenBankError, GenBankRecord, parse_genbank
from vtrio.virtool._ncbi import (
    AccessionNotFound,
    NCBIBadResponse,
    NCBIClient,
    NCBIError,
    NCBIUnavailable,
    RetrySettings,
    validate_accession,
)

EFETCH = "/entrez/eutils/efetch.fcgi"

#: Quick retries, so that the tests of retrying take milliseconds: real waits, only short.
FAST_RETRY = RetrySettings(
    attempts=4, timeout=10, wait_initial=0.01, wait_max=0.05, wait_jitter=0.01
)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with serve() as running:
        running.route(EFETCH, ncbi_efetch({"AB369276": TMV_RECORD, "NC_003620": SATELLITE_RECORD}))
        yield running


@pytest.fixture
def scheduled() -> Iterator[list[RetryDetails]]:
    """The retries stamina schedules during the test, with their waits, as they are scheduled."""
    retries: list[RetryDetails] = []
    stamina.instrumentation.set_on_retry_hooks([retries.append])
    try:
        yield retries
    finally:
        stamina.instrumentation.set_on_retry_hooks(None)  # back to stamina's defaults


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    async with open_http_client(connect_timeout=2, read_timeout=2, total_timeout=5) as client:
        yield client


def ncbi(
    server: ScriptedServer,
    http: HttpClient,
    *,
    api_key: str | None = None,
    retry: RetrySettings = FAST_RETRY,
) -> NCBIClient:
    return NCBIClient(http, base_url=f"{server.url}/entrez/eutils", api_key=api_key, retry=retry)


# --- fetching and parsing -------------------------------------------------------------------


async def test_fetch_a_record(server: ScriptedServer, http: HttpClient) -> None:
    record = await ncbi(server, http).fetch_genbank("AB369276")

    assert record == GenBankRecord(
        accession="AB369276",
        version=2,
        definition=(
            "Tobacco mosaic virus genomic RNA, coat protein gene, partial cds, isolate: "
            "TMV-Ok2, from Nicotiana tabacum cv. Xanthi in a glasshouse in Okayama"
        ),
        organism="Tobacco mosaic virus",
        host="Nicotiana tabacum cv. Xanthi",
        sequence=TMV_SEQUENCE,
    )
    assert record.accession_version == "AB369276.2"
    assert len(record.sequence) == 240

    [request] = server.requests()
    assert request.path == EFETCH
    assert request.query == {
        "db": "nuccore",
        "id": "AB369276",
        "rettype": "gb",
        "retmode": "text",
        "tool": "vtrio",
    }
    assert request.headers["user-agent"] == f"vtrio/{__version__}"


async def test_a_record_without_host(server: ScriptedServer, http: HttpClient) -> None:
    record = await ncbi(server, http).fetch_genbank("nc_003620.1")

    assert record.host is None
    assert record.accession_version == "NC_003620.1"
    assert record.definition == "Tobacco mosaic satellite virus, complete genome"
    assert record.organism == "Tobacco mosaic satellite virus"
    assert record.sequence.startswith("AGTAAACCTACCCACGACTGG")
    assert len(record.sequence) == 70
    assert server.requests()[0].query["id"] == "NC_003620.1"


def test_parse_wrapped_qualifiers_and_organism_without_source_feature() -> None:
    text = '''\
LOCUS       MN123456                 20 bp    RNA     linear   PLN 01-JAN-2020
DEFINITION  Barley yellow dwarf virus isolate X segment.
ACCESSION   MN123456 MN123457
VERSION     MN123456.3
SOURCE      Barley yellow dwarf virus PAV
  ORGANISM  Barley yellow dwarf virus
            PAV
            Viruses; Riboviria; Tombusviridae; Luteovirus.
FEATURES             Location/Qualifiers
     source          1..20
                     /mol_type="genomic RNA"
                     /host="Hordeum vulgare subsp. vulgare ""Golden
                     Promise"""
                     /focus
     gene            1..20
                     /host="not the source feature"
ORIGIN
        1 acgtacgtac gtacgtacgt
//
'''
    record = parse_genbank(text)
    assert record.accession == "MN123456"
    assert record.version == 3
    assert record.organism == "Barley yellow dwarf virus PAV"
    assert record.host == 'Hordeum vulgare subsp. vulgare "Golden Promise"'
    assert record.sequence == "ACGTACGTACGTACGTACGT"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("<html>Service unavailable</html>", "no LOCUS"),
        (TMV_RECORD.replace("//\n", ""), "truncated"),
        (
            TMV_RECORD.split("ORIGIN")[0] + "CONTIG      join(AB000001.1:1..240)\n//\n",
            "no sequence",
        ),
        (TMV_RECORD.replace("VERSION     AB369276.2", "VERSION     XY000001.1"), "does not match"),
    ],
)
def test_parse_refuses_broken_records(text: str, complaint: str) -> None:
    with pytest.raises(GenBankError, match=complaint):
        parse_genbank(text)


async def test_a_broken_record_from_ncbi(server: ScriptedServer, http: HttpClient) -> None:
    server.route(EFETCH, genbank_reply(TMV_RECORD.replace("//\n", "")))
    with pytest.raises(NCBIBadResponse, match=r"'AB369276' cannot be read \(.*truncated"):
        await ncbi(server, http).fetch_genbank("AB369276")


@pytest.mark.parametrize("accession", ["", "AB", "12345", "AB369276;DROP", "AB 369276", "x" * 40])
async def test_bad_accessions_are_refused_before_any_request(
    server: ScriptedServer, http: HttpClient, accession: str
) -> None:
    with pytest.raises(ValueError, match="not a nucleotide accession"):
        await ncbi(server, http).fetch_genbank(accession)
    assert server.requests() == []


def test_accession_formats() -> None:
    for good in ["AB369276", "U12345", "AB369276.2", "NC_001367.1", "NZ_CP012345", "ABCD01000001"]:
        assert validate_accession(good) == good
    assert validate_accession(" ab369276.1 ") == "AB369276.1"


# --- unknown accessions ---------------------------------------------------------------------


async def test_unknown_accession_as_http_400(server: ScriptedServer, http: HttpClient) -> None:
    with pytest.raises(AccessionNotFound, match="XY999999") as caught:
        await ncbi(server, http).fetch_genbank("XY999999")
    assert caught.value.accession == "XY999999"
    assert "Failed to understand id: XY999999" in str(caught.value)
    assert len(server.requests()) == 1  # not retried


async def test_unknown_accession_as_an_empty_body(server: ScriptedServer, http: HttpClient) -> None:
    server.route(EFETCH, genbank_reply("\n\n"))
    with pytest.raises(AccessionNotFound, match="'XY999999'"):
        await ncbi(server, http).fetch_genbank("XY999999")


async def test_unknown_accession_as_an_error_in_a_200(
    server: ScriptedServer, http: HttpClient
) -> None:
    server.route(EFETCH, genbank_reply(NCBI_UNKNOWN_ID_BODY.format(spaced="X Y 9 9 9 9 9 9")))
    with pytest.raises(AccessionNotFound, match="XY999999"):
        await ncbi(server, http).fetch_genbank("XY999999")


async def test_a_rejected_api_key(server: ScriptedServer, http: HttpClient) -> None:
    server.route(
        EFETCH,
        Reply(
            status=400,
            body='{"error":"API key invalid","api-key":"0123456789abcdef","type":"invalid"}',
            headers={"Content-Type": "application/json"},
        ),
    )
    with pytest.raises(NCBIError, match="rejected the API key") as caught:
        await ncbi(server, http, api_key="0123456789abcdef").fetch_genbank("AB369276")
    assert not isinstance(caught.value, AccessionNotFound)


async def test_a_page_that_is_not_a_record(server: ScriptedServer, http: HttpClient) -> None:
    server.route(EFETCH, Reply(body="<html><body>Maintenance</body></html>"))
    with pytest.raises(NCBIBadResponse, match="not a GenBank record"):
        await ncbi(server, http).fetch_genbank("AB369276")


# --- retries --------------------------------------------------------------------------------


async def test_503_then_success(server: ScriptedServer, http: HttpClient) -> None:
    server.route(
        EFETCH, Reply(status=503, body="Service Temporarily Unavailable"), genbank_reply(TMV_RECORD)
    )
    record = await ncbi(server, http).fetch_genbank("AB369276")
    assert record.accession == "AB369276"
    assert len(server.requests()) == 2


async def test_429_with_retry_after(server: ScriptedServer, http: HttpClient) -> None:
    server.route(
        EFETCH,
        Reply(
            status=429,
            body=(
                '{"error":"API rate limit exceeded","api-key":"203.0.113.7",'
                '"count":"4","limit":"3"}'
            ),
            headers={"Retry-After": "1", "Content-Type": "application/json"},
        ),
        genbank_reply(TMV_RECORD),
    )
    record = await ncbi(server, http).fetch_genbank("AB369276")
    assert record.accession == "AB369276"
    first, second = server.requests()
    assert second.time - first.time >= 1.0  # waited as asked, not FAST_RETRY's 10 ms


async def test_connection_reset_then_success(server: ScriptedServer, http: HttpClient) -> None:
    server.route(EFETCH, Reply(reset=True), genbank_reply(TMV_RECORD))
    record = await ncbi(server, http).fetch_genbank("AB369276")
    assert record.host == "Nicotiana tabacum cv. Xanthi"
    assert len(server.requests()) == 2


async def test_a_slow_answer_is_retried(server: ScriptedServer) -> None:
    server.route(EFETCH, Reply(hold=True, body=TMV_RECORD), genbank_reply(TMV_RECORD))
    async with open_http_client(read_timeout=0.3, total_timeout=5) as http:
        record = await ncbi(server, http).fetch_genbank("AB369276")
    server.release()
    assert record.accession == "AB369276"
    assert len(server.requests()) == 2


async def test_always_503_gives_up_after_the_attempts(
    server: ScriptedServer, http: HttpClient
) -> None:
    server.route(EFETCH, Reply(status=503, body="Service Temporarily Unavailable"))
    started = trio.current_time()
    with pytest.raises(NCBIUnavailable, match=r"after 4 attempts .*HTTP 503.*try again later"):
        await ncbi(server, http).fetch_genbank("AB369276")
    assert trio.current_time() - started < FAST_RETRY.timeout
    assert len(server.requests()) == FAST_RETRY.attempts


async def test_always_503_gives_up_within_the_total_time(
    server: ScriptedServer, http: HttpClient
) -> None:
    server.route(EFETCH, Reply(status=503))
    # The fourth attempt waits for a rate-limit slot well past the time limit: cut short.
    retry = RetrySettings(attempts=100, timeout=0.5, wait_initial=0.05, wait_max=0.1)
    started = trio.current_time()
    with pytest.raises(NCBIUnavailable, match=r"gave up .*0\.5 s time limit ran out"):
        await ncbi(server, http, retry=retry).fetch_genbank("AB369276")
    assert trio.current_time() - started <= 0.6
    assert 2 <= len(server.requests()) < 100


@pytest.mark.parametrize(
    ("status", "retried"),
    [(429, True), (500, True), (502, True), (503, True), (504, True), (403, False), (404, False)],
)
async def test_which_statuses_are_retried(
    server: ScriptedServer, http: HttpClient, status: int, retried: bool
) -> None:
    server.route(EFETCH, Reply(status=status, body="oops"), genbank_reply(TMV_RECORD))
    client = ncbi(server, http)
    if retried:
        assert (await client.fetch_genbank("AB369276")).accession == "AB369276"
    else:
        with pytest.raises(NCBIBadResponse, match=f"answered HTTP {status} .*oops"):
            await client.fetch_genbank("AB369276")
    assert len(server.requests()) == (2 if retried else 1)


async def test_retries_stop_at_the_first_answer_not_worth_retrying(
    server: ScriptedServer, http: HttpClient
) -> None:
    server.route(EFETCH, Reply(status=503), Reply(status=502), ncbi_unknown_id("XY999999"))
    with pytest.raises(AccessionNotFound, match="XY999999"):
        await ncbi(server, http).fetch_genbank("XY999999")
    assert len(server.requests()) == 3


async def test_the_waits_grow_exponentially_up_to_wait_max(
    server: ScriptedServer, http: HttpClient, scheduled: list[RetryDetails]
) -> None:
    server.route(EFETCH, Reply(status=503))
    retry = RetrySettings(attempts=4, timeout=10, wait_initial=0.05, wait_max=0.12, wait_jitter=0)
    with pytest.raises(NCBIUnavailable, match="after 4 attempts"):
        # With a key, the rate limit (10/s) leaves the waits alone.
        await ncbi(server, http, api_key="0123456789abcdef", retry=retry).fetch_genbank("AB369276")
    waits = [0.05, 0.1, 0.12]  # 0.05 * 2 ** (n - 1), capped
    assert [retry.wait_for for retry in scheduled] == pytest.approx(waits)
    times = [r.time for r in server.requests()]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= wait for gap, wait in zip(gaps, waits, strict=True))  # waited, for real


async def test_the_waits_are_jittered(
    server: ScriptedServer, http: HttpClient, scheduled: list[RetryDetails]
) -> None:
    server.route(EFETCH, Reply(status=503))
    retry = RetrySettings(attempts=2, timeout=10, wait_initial=0.01, wait_max=1, wait_jitter=0.05)
    for _ in range(3):
        with pytest.raises(NCBIUnavailable):
            await ncbi(server, http, api_key="0123456789abcdef", retry=retry).fetch_genbank(
                "AB369276"
            )
    firsts = [r.wait_for for r in scheduled if r.retry_num == 1]
    assert all(0.01 <= wait <= 0.06 for wait in firsts)
    assert len(set(firsts)) == 3


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_a_retry_after_beyond_the_time_limit_gives_up_at_once(
    server: ScriptedServer, http: HttpClient, form: str
) -> None:
    later = datetime.now(UTC) + timedelta(seconds=60)
    retry_after = "30" if form == "seconds" else http_date(later)
    server.route(EFETCH, Reply(status=429, headers={"Retry-After": retry_after}))
    retry = RetrySettings(attempts=5, timeout=2)
    started = trio.current_time()
    with pytest.raises(
        NCBIUnavailable,
        match=r"after 1 attempt in .*HTTP 429.*asked to wait \d+\.\d s, longer than the \d\.\d s "
        r"left of the 2 s time limit.*rate-limiting.*configure an NCBI API key",
    ):
        await ncbi(server, http, retry=retry).fetch_genbank("AB369276")
    assert trio.current_time() - started < 0.5
    assert len(server.requests()) == 1


@pytest.mark.parametrize(
    ("retry_after", "wait"),
    [
        pytest.param("0", 0.0, id="zero"),
        pytest.param("Tue, 14 Jan 2025 18:00:00 GMT", 0.0, id="past-date"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("-5", None, id="negative"),
    ],
)
async def test_a_retry_after_meaning_now_or_nothing(
    server: ScriptedServer,
    http: HttpClient,
    scheduled: list[RetryDetails],
    retry_after: str,
    wait: float | None,
) -> None:
    server.route(
        EFETCH, Reply(status=503, headers={"Retry-After": retry_after}), genbank_reply(TMV_RECORD)
    )
    record = await ncbi(server, http).fetch_genbank("AB369276")
    assert record.accession == "AB369276"
    [retry] = scheduled
    if wait is None:  # FAST_RETRY's own first wait
        assert FAST_RETRY.wait_initial <= retry.wait_for <= FAST_RETRY.wait_max
    else:
        assert retry.wait_for == wait


async def test_the_time_limit_cuts_short_an_attempt(server: ScriptedServer) -> None:
    server.route(EFETCH, Reply(hold=True, body=TMV_RECORD))
    async with open_http_client(read_timeout=5, total_timeout=5) as http:
        started = trio.current_time()
        with pytest.raises(
            NCBIUnavailable, match=r"after 1 attempt .*last: no answer.*0\.3 s time limit ran out"
        ):
            await ncbi(server, http, retry=RetrySettings(timeout=0.3)).fetch_genbank("AB369276")
        assert 0.3 <= trio.current_time() - started < 0.7
    server.release()
    assert len(server.requests()) == 1


async def test_the_time_limit_cuts_short_a_wait(server: ScriptedServer, http: HttpClient) -> None:
    server.route(EFETCH, Reply(status=503), genbank_reply(TMV_RECORD))
    retry = RetrySettings(timeout=0.3, wait_initial=5, wait_max=5, wait_jitter=0)
    started = trio.current_time()
    with pytest.raises(NCBIUnavailable, match=r"after 1 attempt .*HTTP 503.*time limit ran out"):
        await ncbi(server, http, retry=retry).fetch_genbank("AB369276")
    assert 0.3 <= trio.current_time() - started < 0.7
    assert len(server.requests()) == 1


async def test_cancellation_passes_through_an_attempt_and_a_wait(
    server: ScriptedServer, http: HttpClient, scheduled: list[RetryDetails]
) -> None:
    client = ncbi(server, http, retry=RetrySettings(wait_initial=5, wait_max=5, wait_jitter=0))
    server.route(EFETCH, Reply(hold=True, body=TMV_RECORD))
    with trio.move_on_after(0.2) as scope:
        await client.fetch_genbank("AB369276")  # cancelled while the server holds the answer
    assert scope.cancelled_caught
    assert scheduled == []  # a cancellation is not a failure to retry
    server.release()

    server.route(EFETCH, Reply(status=503), genbank_reply(TMV_RECORD))
    with trio.move_on_after(0.2) as scope:
        await client.fetch_genbank("AB369276")  # cancelled in the 5 s wait after the 503
    assert scope.cancelled_caught
    assert [retry.wait_for for retry in scheduled] == [5]
    assert len(server.requests()) == 2

    # Both rate-limit slots were released: once rested, all three serve requests at once.
    await trio.sleep(1)
    assert len(await fetch_concurrently(client, 3)) == 3
    times = [r.time for r in server.requests()[2:]]
    assert max(times) - min(times) < 0.5


async def test_our_own_mistakes_are_not_retried(http: HttpClient) -> None:
    client = NCBIClient(http, base_url="ftp://127.0.0.1/eutils", retry=RetrySettings())
    started = trio.current_time()
    with pytest.raises(httpx.UnsupportedProtocol):
        await client.fetch_genbank("AB369276")
    assert trio.current_time() - started < 0.3  # no wait: the first retry is 0.5 s or more away


def test_retry_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetrySettings(attempts=0)
    with pytest.raises(ValueError, match="timeout"):
        RetrySettings(timeout=0)
    with pytest.raises(ValueError, match="wait_max"):
        RetrySettings(wait_max=-1)


# --- NCBI's rate limit ----------------------------------------------------------------------


async def fetch_concurrently(client: NCBIClient, callers: int) -> list[GenBankRecord]:
    records: list[GenBankRecord] = []

    async def fetch() -> None:
        records.append(await client.fetch_genbank("AB369276"))

    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(fetch)
    return records


async def test_rate_limit_holds_for_20_concurrent_callers(
    server: ScriptedServer, http: HttpClient
) -> None:
    records = await fetch_concurrently(ncbi(server, http), 20)

    assert len(records) == 20
    times = [r.time for r in server.requests()]
    assert len(times) == 20
    assert max_in_window(times, 1.0) == 3  # as the server saw them, and the limit was used


async def test_rate_limit_with_an_api_key(server: ScriptedServer, http: HttpClient) -> None:
    records = await fetch_concurrently(ncbi(server, http, api_key="0123456789abcdef"), 20)

    assert len(records) == 20
    requests = server.requests()
    assert all(r.query["api_key"] == "0123456789abcdef" for r in requests)
    assert max_in_window([r.time for r in requests], 1.0) == 10


async def test_retries_keep_to_the_rate_limit(server: ScriptedServer, http: HttpClient) -> None:
    # Three callers use the three slots at once and get a 503; their retries (due after
    # 10-50 ms) still wait for slots to rest their full second.
    server.route(EFETCH, *([Reply(status=503)] * 3), genbank_reply(TMV_RECORD))
    records = await fetch_concurrently(ncbi(server, http), 3)
    assert len(records) == 3
    times = [r.time for r in server.requests()]
    assert len(times) == 6
    assert max_in_window(times, 1.0) == 3
    assert min(times[3:]) - max(times[:3]) > 0.9

"""The NCBI E-utilities client against a real local server speaking efetch's formats."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from tests.http_servers import (
    NCBI_UNKNOWN_ID_BODY,
    SATELLITE_RECORD,
    TMV_RECORD,
    TMV_SEQUENCE,
    Reply,
    ScriptedServer,
    genbank_reply,
    max_in_window,
    ncbi_efetch,
    serve,
)
from vtrio import __version__
from vtrio.http import HttpClient, open_http_client
from vtrio.ncbi import (
    AccessionNotFound,
    GenBankRecord,
    NCBIBadResponse,
    NCBIClient,
    NCBIError,
    NCBIUnavailable,
    parse_genbank,
    validate_accession,
)
from vtrio.retry import RetryPolicy

EFETCH = "/entrez/eutils/efetch.fcgi"

#: Quick retries, so that the tests of retrying take milliseconds.
FAST_RETRY = RetryPolicy(max_attempts=4, max_total=10, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with serve() as running:
        running.route(EFETCH, ncbi_efetch({"AB369276": TMV_RECORD, "NC_003620": SATELLITE_RECORD}))
        yield running


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    async with open_http_client(connect_timeout=2, read_timeout=2, total_timeout=5) as client:
        yield client


def ncbi(
    server: ScriptedServer,
    http: HttpClient,
    *,
    api_key: str | None = None,
    retry: RetryPolicy = FAST_RETRY,
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
    with pytest.raises(NCBIBadResponse, match=complaint):
        parse_genbank(text)


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
    assert trio.current_time() - started < FAST_RETRY.max_total
    assert len(server.requests()) == FAST_RETRY.max_attempts


async def test_always_503_gives_up_within_the_total_time(
    server: ScriptedServer, http: HttpClient
) -> None:
    server.route(EFETCH, Reply(status=503))
    policy = RetryPolicy(max_attempts=100, max_total=0.5, base_delay=0.05, max_delay=0.1)
    started = trio.current_time()
    with pytest.raises(NCBIUnavailable, match="gave up"):
        await ncbi(server, http, retry=policy).fetch_genbank("AB369276")
    assert trio.current_time() - started <= 0.6
    assert 2 <= len(server.requests()) < 100


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

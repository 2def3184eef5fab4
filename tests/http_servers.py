"""Real HTTP servers on 127.0.0.1 for the HTTP client tests, standing in for NCBI and GitHub.

:func:`serve` runs a :class:`ScriptedServer`: a ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive)
in a thread of its own, so its timing does not depend on the trio loop under test. Each path
answers from a script of :class:`Reply` objects (played in order, the last one repeating) or a
function of the request; a reply can hold its answer until released, trickle its body, or reset
the connection (SO_LINGER 0). Every request is logged with its arrival time
(``time.monotonic()``, taken before any answer is sent) and the client's port.

:func:`ncbi_efetch` and :func:`github_latest_release` script the two services in their real
formats; :data:`TMV_RECORD` and friends are hand-written GenBank flat files.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

#: The longest a held reply waits for :meth:`ScriptedServer.release` (then it answers anyway),
#: so that no server thread outlives a failed test by long.
HOLD_LIMIT = 10.0


@dataclass(frozen=True)
class Reply:
    """One scripted answer.

    ``hold``: wait for :meth:`ScriptedServer.release` before answering anything.
    ``trickle``: ``(chunk_size, interval)``, send the body a chunk at a time, pausing between.
    ``reset``: answer nothing and close the connection with a TCP RST (SO_LINGER 0).
    """

    status: int = 200
    body: bytes | str = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    hold: bool = False
    trickle: tuple[int, float] | None = None
    reset: bool = False

    def encoded_body(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body


def json_reply(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(
        status=status,
        body=json.dumps(data),
        headers={"Content-Type": "application/json; charset=utf-8", **(headers or {})},
    )


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    time: float  # time.monotonic() at arrival
    client_port: int


Script = Reply | Callable[[LoggedRequest], Reply]


class ScriptedServer:
    """A scripted HTTP server; see the module docstring. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._routes: dict[str, list[Script]] = {}
        self._log: list[LoggedRequest] = []
        self._release = threading.Event()
        self._closing = False
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.scripted = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # -- scripting ---------------------------------------------------------------------------

    def route(self, path: str, *script: Script) -> None:
        """Answer ``path`` with ``script``, in order; the last entry answers every later request."""
        if not script:
            raise ValueError("a route needs at least one reply")
        with self._lock:
            self._routes[path] = list(script)

    def release(self) -> None:
        """Let every held reply answer now (later held replies hold again)."""
        with self._lock:
            self._release.set()
            self._release = threading.Event()

    # -- the log -----------------------------------------------------------------------------

    def requests(self, path: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self._log if path is None or r.path == path]

    def wait_for_requests(
        self, count: int, *, path: str | None = None, timeout: float = 10.0
    ) -> list[LoggedRequest]:
        """Block until ``count`` requests (to ``path``) have arrived; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [r for r in self._log if path is None or r.path == path]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"the server saw {len(found)} requests, not {count}, within {timeout} s"
                    )
                self._lock.wait(remaining)

    async def received(
        self, count: int, *, path: str | None = None, within: float = 10.0
    ) -> list[LoggedRequest]:
        """:meth:`wait_for_requests` (for ``within`` seconds) without blocking the trio loop."""
        return await trio.to_thread.run_sync(
            lambda: self.wait_for_requests(count, path=path, timeout=within),
            abandon_on_cancel=True,
        )

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # -- called by the handler threads -------------------------------------------------------

    def _arrived(self, request: LoggedRequest) -> tuple[Reply, threading.Event]:
        with self._lock:
            self._log.append(request)
            self._lock.notify_all()
            script = self._routes.get(request.path)
            if script is None:
                entry: Script = json_reply({"message": "Not Found"}, status=404)
            else:
                entry = script.pop(0) if len(script) > 1 else script[0]
            release = self._release
        reply = entry(request) if callable(entry) else entry
        return reply, release


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops SYNs from 10 concurrent clients
    scripted: ScriptedServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up (cancelled requests, timeouts) are expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        arrived = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        url = urlsplit(self.path)
        request = LoggedRequest(
            method=self.command,
            path=url.path,
            query={k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            time=arrived,
            client_port=self.client_address[1],
        )
        reply, release = self.server.scripted._arrived(request)
        if reply.hold:
            release.wait(HOLD_LIMIT)
        if reply.reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        body = reply.encoded_body()
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if reply.trickle is None:
            self.wfile.write(body)
            return
        size, interval = reply.trickle
        self.wfile.flush()
        for start in range(0, len(body), size):
            self.wfile.write(body[start : start + size])
            self.wfile.flush()
            time.sleep(interval)

    def finish(self) -> None:
        with suppress(OSError, ValueError):
            super().finish()


@contextmanager
def serve() -> Iterator[ScriptedServer]:
    """A :class:`ScriptedServer` for the duration of the block."""
    server = ScriptedServer()
    try:
        yield server
    finally:
        server.close()


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most of ``times`` that fall in any half-open interval ``[t, t + window)``."""
    ordered = sorted(times)
    best = 0
    first = 0
    for last, t in enumerate(ordered):
        while t - ordered[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def http_date(when: datetime) -> str:
    return format_datetime(when.astimezone(UTC), usegmt=True)


# --- NCBI ---------------------------------------------------------------------------------

#: A short plant virus record as NCBI's efetch (rettype=gb, retmode=text) sends it.
TMV_RECORD = """\
LOCUS       AB369276                 240 bp    RNA     linear   VRL 14-MAR-2009
DEFINITION  Tobacco mosaic virus genomic RNA, coat protein gene, partial cds,
            isolate: TMV-Ok2, from Nicotiana tabacum cv. Xanthi in a glasshouse
            in Okayama.
ACCESSION   AB369276
VERSION     AB369276.2
KEYWORDS    .
SOURCE      Tobacco mosaic virus (TMV)
  ORGANISM  Tobacco mosaic virus
            Viruses; Riboviria; Orthornavirae; Kitrinoviricota; Alsuviricetes;
            Martellivirales; Virgaviridae; Tobamovirus.
REFERENCE   1
  AUTHORS   Tanaka,H., Suzuki,M. and Mori,K.
  TITLE     Coat protein variation among Tobacco mosaic virus isolates from
            glasshouse tobacco
  JOURNAL   Unpublished
REFERENCE   2  (bases 1 to 240)
  AUTHORS   Tanaka,H.
  TITLE     Direct Submission
  JOURNAL   Submitted (12-FEB-2008) Hiroshi Tanaka, Okayama University,
            Institute of Plant Science and Resources; 2-20-1 Chuo, Kurashiki,
            Okayama 710-0046, Japan
FEATURES             Location/Qualifiers
     source          1..240
                     /organism="Tobacco mosaic virus"
                     /mol_type="genomic RNA"
                     /isolate="TMV-Ok2"
                     /host="Nicotiana tabacum cv. Xanthi"
                     /db_xref="taxon:12242"
                     /country="Japan: Okayama"
                     /collection_date="2007"
                     /note="isolated from a symptomatic leaf showing severe
                     mosaic; passaged once through Nicotiana benthamiana"
     CDS             <1..>240
                     /codon_start=1
                     /product="coat protein"
                     /protein_id="BAG31225.1"
                     /translation="MSYSITTPSQFVFLSSAWADPIELINLCTNALGNQFQTQQARTV
                     VQRQFSEVWKPSPQVTVRFPDSDFKVYRYNAVLDPLVTALLGAFDTRNRIIEVENQAN
                     PTTAETLDAT"
ORIGIN
        1 atgtcttaca gtatcactac tccatctcag ttcgtgttct tgtcatcagc gtgggccgac
       61 ccaatagagt taattaattt atgtactaat gccttaggaa atcagtttca aacacaacaa
      121 gctcgaactg tcgttcaaag acaattcagt gaggtgtgga aaccttcacc acaagtaact
      181 gttaggttcc ctgacagtga ctttaaggtg tacaggtaca atgcggtatt agacccgcta
//

""".replace("\nORIGIN\n", "\nORIGIN      \n")  # NCBI pads the ORIGIN line with spaces

#: Its sequence, as the client should return it.
TMV_SEQUENCE = (
    "ATGTCTTACAGTATCACTACTCCATCTCAGTTCGTGTTCTTGTCATCAGCGTGGGCCGAC"
    "CCAATAGAGTTAATTAATTTATGTACTAATGCCTTAGGAAATCAGTTTCAAACACAACAA"
    "GCTCGAACTGTCGTTCAAAGACAATTCAGTGAGGTGTGGAAACCTTCACCACAAGTAACT"
    "GTTAGGTTCCCTGACAGTGACTTTAAGGTGTACAGGTACAATGCGGTATTAGACCCGCTA"
)

#: A RefSeq record whose source feature has no /host.
SATELLITE_RECORD = """\
LOCUS       NC_003620                 70 bp ss-RNA     linear   VRL 08-DEC-2008
DEFINITION  Tobacco mosaic satellite virus, complete genome.
ACCESSION   NC_003620
VERSION     NC_003620.1
DBLINK      BioProject: PRJNA14960
KEYWORDS    RefSeq.
SOURCE      Tobacco mosaic satellite virus
  ORGANISM  Tobacco mosaic satellite virus
            Viruses; Riboviria; Virgaviridae; unclassified Virgaviridae.
FEATURES             Location/Qualifiers
     source          1..70
                     /organism="Tobacco mosaic satellite virus"
                     /mol_type="genomic RNA"
                     /db_xref="taxon:12881"
ORIGIN
        1 agtaaaccta cccacgactg gtgtagtaag cgaaagtttg ccatggttat agcaactgcc
       61 gctttcgacc
//

"""

#: What NCBI's efetch answers, with HTTP 400, for an id it does not know.
NCBI_UNKNOWN_ID_BODY = "Error: F a i l e d  t o  u n d e r s t a n d  i d :  {spaced}\n"


def ncbi_unknown_id(accession: str) -> Reply:
    return Reply(
        status=400,
        body=NCBI_UNKNOWN_ID_BODY.format(spaced=" ".join(accession)),
        headers={"Content-Type": "text/plain; charset=UTF-8"},
    )


def genbank_reply(record: str) -> Reply:
    return Reply(body=record, headers={"Content-Type": "text/plain; charset=UTF-8"})


def ncbi_efetch(records: Mapping[str, str]) -> Callable[[LoggedRequest], Reply]:
    """An efetch endpoint serving ``records`` by accession (with or without version)."""

    def answer(request: LoggedRequest) -> Reply:
        wanted = request.query.get("id", "")
        record = records.get(wanted) or records.get(wanted.split(".")[0])
        if record is None:
            return ncbi_unknown_id(wanted)
        return genbank_reply(record)

    return answer


# --- GitHub -------------------------------------------------------------------------------


def github_release_json(
    owner: str = "virtool", name: str = "virtool", tag: str = "v7.1.2"
) -> dict[str, Any]:
    """A release in the shape of GitHub's REST API (fields trimmed to a realistic subset)."""
    api = f"https://api.github.com/repos/{owner}/{name}"
    user = {"login": "virtool-bot", "id": 21071218, "type": "Bot", "site_admin": False}
    return {
        "url": f"{api}/releases/193044511",
        "assets_url": f"{api}/releases/193044511/assets",
        "upload_url": f"https://uploads.github.com/repos/{owner}/{name}/releases/193044511/assets{{?name,label}}",
        "html_url": f"https://github.com/{owner}/{name}/releases/tag/{tag}",
        "id": 193044511,
        "author": user,
        "node_id": "RE_kwDOAkwW5c4Lgaof",
        "tag_name": tag,
        "target_commitish": "main",
        "name": f"{tag} - Fix sample uploads",
        "draft": False,
        "immutable": False,
        "prerelease": False,
        "created_at": "2025-01-14T19:02:11Z",
        "updated_at": "2025-01-14T19:08:40Z",
        "published_at": "2025-01-14T19:08:39Z",
        "assets": [
            {
                "url": f"{api}/releases/assets/221901234",
                "id": 221901234,
                "node_id": "RA_kwDOAkwW5c4NOfGy",
                "name": "virtool.tar.gz",
                "label": "",
                "uploader": user,
                "content_type": "application/gzip",
                "state": "uploaded",
                "size": 48213117,
                "digest": "sha256:5f1c2b0f1a6c7e3d3f5b1e6a8c0d9e2f4a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d",
                "download_count": 87,
                "created_at": "2025-01-14T19:08:02Z",
                "updated_at": "2025-01-14T19:08:11Z",
                "browser_download_url": f"https://github.com/{owner}/{name}/releases/download/{tag}/virtool.tar.gz",
            },
            {
                "url": f"{api}/releases/assets/221901240",
                "id": 221901240,
                "node_id": "RA_kwDOAkwW5c4NOfG4",
                "name": "checksums.txt",
                "label": None,
                "uploader": user,
                "content_type": "text/plain",
                "state": "uploaded",
                "size": 97,
                "digest": None,
                "download_count": 12,
                "created_at": "2025-01-14T19:08:30Z",
                "updated_at": "2025-01-14T19:08:30Z",
                "browser_download_url": f"https://github.com/{owner}/{name}/releases/download/{tag}/checksums.txt",
            },
        ],
        "tarball_url": f"{api}/tarball/{tag}",
        "zipball_url": f"{api}/zipball/{tag}",
        "body": "## Fixed\n* Sample uploads no longer stall at 99%.",
    }


def github_headers(remaining: int = 59, reset: int = 1_767_225_600) -> dict[str, str]:
    return {
        "x-ratelimit-limit": "60",
        "x-ratelimit-remaining": str(remaining),
        "x-ratelimit-reset": str(reset),
        "x-ratelimit-used": str(60 - remaining),
        "x-ratelimit-resource": "core",
        "x-github-api-version-selected": "2022-11-28",
    }


def github_latest_release(
    release: dict[str, Any], etag: str = 'W/"4d1fbd7c0a5e6b1f"'
) -> Callable[[LoggedRequest], Reply]:
    """``GET .../releases/latest`` as GitHub answers it: 200 with an ETag, or 304 if it matches."""

    def answer(request: LoggedRequest) -> Reply:
        if request.headers.get("if-none-match") == etag:
            return Reply(status=304, headers={"ETag": etag, **github_headers()})
        return json_reply(
            release,
            headers={"ETag": etag, "Cache-Control": "private, max-age=60, s-maxage=60"}
            | github_headers(),
        )

    return answer


def github_not_found() -> Reply:
    return json_reply(
        {
            "message": "Not Found",
            "documentation_url": "https://docs.github.com/rest/releases/releases#get-the-latest-release",
            "status": "404",
        },
        status=404,
        headers=github_headers(),
    )


def github_rate_limited(status: int, reset: int) -> Reply:
    return json_reply(
        {
            "message": "API rate limit exceeded for 203.0.113.7. (But here's the good news: "
            "Authenticated requests get a higher rate limit. Check out the documentation for "
            "more details.)",
            "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
        },
        status=status,
        headers=github_headers(remaining=0, reset=reset),
    )

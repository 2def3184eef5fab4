"""The dashboard in a real headless Chromium, and vtrio.js in Node, against a real server.

Each test starts ``python -m vtrio`` on the session's mongod (a database and data directory of
its own), makes users and keys with the admin commands, and runs one driver,
``node tests/browser/NAME.mjs ARGS``, which launches and closes its own Chromium through
playwright-core and asserts what a user would see. A test passes when its driver exits 0; else
the driver's output is shown. The drivers and their shared harness are in ``tests/browser/``.

What they need, beyond the Python test dependencies (install once per machine)::

    apt-get install -y chromium         # /usr/bin/chromium; CHROMIUM=PATH names another
    npm ci --prefix tests/browser       # playwright-core and ws, as locked
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.processes import run_vtrio, vtrio_process

ROOT = Path(__file__).resolve().parent.parent
BROWSER_TESTS = ROOT / "tests" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
DRIVER_TIMEOUT = 120.0
"""Seconds a driver may run; each bounds its own steps well within this."""

USERS = {"alice": "lab", "bob": "lab"}
"""The users each test's server has, and their group."""

SMALL_FASTQ = b"@r1\nACGT\n+\nIIII\n"


@pytest.fixture(autouse=True)
def node() -> None:
    """Fail (not skip: a skipped suite hides a missing install step) without Node's packages."""
    if shutil.which("node") is None:
        pytest.fail("cannot run the Node tests: no node on PATH (Node 20 or later)")
    if not (BROWSER_TESTS / "node_modules" / "playwright-core").is_dir():
        pytest.fail("cannot run the Node tests: run `npm ci --prefix tests/browser` first")


@pytest.fixture
def chromium() -> None:
    """Fail, as above, without Chromium."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium`, or set CHROMIUM")


browser_test = pytest.mark.usefixtures("chromium")
"""Marks a test whose driver runs Chromium."""


@dataclass
class Server:
    """A running ``python -m vtrio`` and what a driver needs to reach it."""

    ws_url: str
    data_dir: Path
    settings: dict[str, str]
    """``VTRIO_*`` settings with which admin commands reach the server's database."""
    keys: dict[str, str]
    """An API key of each user in USERS."""

    async def admin(self, *args: str) -> str:
        """Run ``python -m vtrio ARGS`` beside the server; its stdout."""
        done = await trio.to_thread.run_sync(lambda: run_vtrio(list(args), env=self.settings))
        assert done.returncode == 0, f"vtrio {' '.join(args)}: {done.stderr}"
        return done.stdout

    async def add_user(self, name: str, group: str) -> None:
        await self.admin("users", "create", name, "--group", group)
        self.keys[name] = (await self.admin("keys", "create", name)).strip()

    async def call(self, user: str, method: str, params: dict) -> dict:
        """``python -m vtrio call`` as ``user``; the parsed result."""
        env = {"VTRIO_URL": self.ws_url, "VTRIO_KEY": self.keys[user]}  # not in argv, for ps
        command = ["call", method, json.dumps(params)]
        done = await trio.to_thread.run_sync(lambda: run_vtrio(command, env=env))
        assert done.returncode == 0, f"vtrio call {method}: {done.stderr}"
        return json.loads(done.stdout)


@pytest.fixture
async def server(mongodb_url: str, db_name: str, tmp_path: Path) -> AsyncIterator[Server]:
    """A server with the users of USERS, a key each, and ``uploads/small.fq``.

    NCBI is a local socket that never answers (the client test times a call out on it), and
    one job runs at a time (the job test cancels one queued behind another).
    """
    data_dir = tmp_path / "data"
    (data_dir / "uploads").mkdir(parents=True)
    (data_dir / "uploads" / "small.fq").write_bytes(SMALL_FASTQ)
    settings = {
        "VTRIO_MONGODB_URL": mongodb_url,
        "VTRIO_DB_NAME": db_name,
        "VTRIO_DATA_DIR": str(data_dir),
    }
    with trio.socket.socket() as silent_ncbi:
        await silent_ncbi.bind(("127.0.0.1", 0))
        silent_ncbi.listen()
        ncbi_url = f"http://127.0.0.1:{silent_ncbi.getsockname()[1]}"
        args = ["--port", "0", "--jobs", "1", "--shutdown-timeout", "5",
                "--ncbi-base-url", ncbi_url]  # fmt: skip
        async with vtrio_process(args, env=settings) as process:
            with process.explained():
                ws_url = await process.wait_ready()
                running = Server(ws_url, data_dir, settings, keys={})
                async with trio.open_nursery() as nursery:  # at once: each is a Python start-up
                    for user, group in USERS.items():
                        nursery.start_soon(running.add_user, user, group)
                yield running
                process.signal(signal.SIGTERM)
                assert await process.wait(15) == 0


@pytest.fixture
def dashboard_url(server: Server) -> str:
    """The dashboard's URL, ``http://HOST:PORT/``: the server's own, beside its ``/ws``."""
    return server.ws_url.replace("ws://", "http://", 1).removesuffix("ws")


# --- running a driver -------------------------------------------------------------------------


async def run_driver(name: str, *args: str, server: Server | None = None) -> None:
    """Run ``node tests/browser/NAME.mjs ARGS``, with ``server``'s coordinates if given; fail,
    showing its output, unless it exits 0. Cancelled at DRIVER_TIMEOUT, the driver is sent
    SIGTERM, on which Playwright closes its browser."""
    command = ["node", str(BROWSER_TESTS / f"{name}.mjs"), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTRIO_")}
    env["CHROMIUM"] = CHROMIUM
    if server is not None:
        command += ["--ws", server.ws_url, "--python", sys.executable]
        command += [f"--key={user}={key}" for user, key in server.keys.items()]
        env.update(server.settings)
    with trio.fail_after(DRIVER_TIMEOUT):
        done = await trio.run_process(
            command, cwd=BROWSER_TESTS, env=env, capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"{name}.mjs exited with {done.returncode}:\n{output}"


def write_fastq(path: Path, reads: int, *, length: int = 150, seed: int = 0) -> None:
    """A FASTQ file of ``reads`` reads whose quality falls along the read, as Illumina's do.

    Deterministic; a few hundred distinct quality strings keep it fast to write.
    """
    rng = random.Random(seed)
    genome = bytes(rng.choice(b"ACGT") for _ in range(10_000))

    def quality() -> bytes:
        return bytes(
            33 + max(2, min(41, round(38 - 16 * (p / length) ** 2 + rng.gauss(0, 3))))
            for p in range(length)
        )

    qualities = [quality() for _ in range(256)]
    with path.open("wb") as out:
        for i in range(reads):
            start = rng.randrange(len(genome) - length)
            read = genome[start : start + length]
            out.write(b"@r%d\n%s\n+\n%s\n" % (i, read, qualities[i % 256]))


# --- the tests ----------------------------------------------------------------------------------


@browser_test
async def test_the_page_lists_samples_and_follows_changes(
    server: Server, dashboard_url: str
) -> None:
    params = {"name": "S-before", "reads": "small.fq", "host": "Vitis vinifera"}
    await server.call("alice", "samples.create", params)
    await run_driver("lists_samples", "--dashboard", dashboard_url, server=server)


@browser_test
async def test_a_job_started_from_the_page_shows_progress_and_a_plot(
    server: Server, dashboard_url: str
) -> None:
    reads = 160_000  # ~50 MB: a second or so of work, several progress reports
    await trio.to_thread.run_sync(write_fastq, server.data_dir / "uploads" / "big.fq", reads)
    await run_driver(
        "job_progress", "--dashboard", dashboard_url, "--reads", "big.fq", "--count", str(reads),
        server=server,
    )  # fmt: skip


@browser_test
async def test_the_page_comes_back_live_after_a_cut(
    server: Server, dashboard_url: str, tmp_path: Path
) -> None:
    observed = tmp_path / "reconnect.json"
    await run_driver(
        "reconnect", "--dashboard", dashboard_url, "--report", str(observed), server=server
    )
    report = json.loads(observed.read_text())
    # The page showed the change made while it was offline (the driver checked), and it did
    # so by resuming where it left off, not by reloading.
    assert report["positionsSeen"]
    first, reconnected = report["sockets"]
    assert "since=" not in first
    assert "since=" in reconnected, report
    assert "reloading" not in report["statuses"][2:], "a resumed page needs no reload"


@browser_test
async def test_a_revoked_key_signs_the_page_out(server: Server, dashboard_url: str) -> None:
    for user in ("alice", "bob"):
        params = {"name": f"{user}-sample", "reads": "small.fq"}
        await server.call(user, "samples.create", params)
    await run_driver("revoked_key", "--dashboard", dashboard_url, server=server)


SCREENSHOT = ROOT / "docs" / "dashboard.png"


@browser_test
async def test_a_screenshot_of_the_dashboard(server: Server, dashboard_url: str) -> None:
    """Writes docs/dashboard.png: samples of two users, finished jobs, one sample's plot."""
    uploads = server.data_dir / "uploads"
    await trio.to_thread.run_sync(write_fastq, uploads / "GLRaV3-leaf.fq", 20_000)
    await trio.to_thread.run_sync(lambda: write_fastq(uploads / "PNRSV-bud.fq", 12_000, seed=1))
    shared = {"group": "lab", "group_read": True}
    samples = [
        ("alice", {"name": "Grapevine 17 (leaf)", "reads": "GLRaV3-leaf.fq",
                   "host": "Vitis vinifera", "isolate": "GLRaV-3", **shared}),
        ("alice", {"name": "Grapevine 18 (leaf)", "reads": "small.fq", "host": "Vitis vinifera"}),
        ("bob", {"name": "Cherry 4 (bud)", "reads": "PNRSV-bud.fq", "host": "Prunus avium",
                 **shared}),
        ("bob", {"name": "Apple 9 (fruit)", "reads": "small.fq", "host": "Malus domestica",
                 **shared}),
    ]  # fmt: skip
    for user, params in samples:
        sample = await server.call(user, "samples.create", params)
        if params["reads"] != "small.fq":
            job = {"task": "sample_stats", "sample_id": sample["id"]}
            await server.call(user, "jobs.create", job)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    await run_driver(
        "screenshot", "--dashboard", dashboard_url, "--sample", "Grapevine 17 (leaf)",
        "--screenshot", str(SCREENSHOT), server=server,
    )  # fmt: skip
    assert SCREENSHOT.read_bytes().startswith(b"\x89PNG")


async def test_vtrio_js_in_node(server: Server, tmp_path: Path) -> None:
    observed = tmp_path / "client.json"
    await run_driver("client", "--report", str(observed), server=server)
    report = json.loads(observed.read_text())
    # The client got the change made while it was away (the driver checked), by resuming
    # from the last position it saw.
    assert report["positionBefore"] is not None
    first, reconnected = report["urls"]
    assert "since=" not in first
    assert "since=" in reconnected, report
    assert report["reloads"] == 1, "a resumed client needs no second reload"


async def test_vtrio_js_against_a_scripted_server() -> None:
    """Resume, 4003, held changes, the in-flight limit, backoff, the browser's hints."""
    await run_driver("client_protocol")

"""``vtrio call`` and ``vtrio watch`` as a user runs them: child processes against a real server
(itself a ``python -m vtrio`` child on the session's mongod)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.processes import run_vtrio, vtrio_process
from vtrio import virtool
from vtrio.framework import open_database
from vtrio.virtool import COLLECTIONS


@dataclass
class Server:
    url: str
    key: str
    data_dir: Path


def admin_args(mongodb_url: str, db_name: str, data_dir: Path) -> list[str]:
    return ["--mongodb-url", mongodb_url, "--db-name", db_name, "--data-dir", str(data_dir)]


@pytest.fixture
async def server(mongodb_url: str, db_name: str, tmp_path: Path) -> AsyncIterator[Server]:
    """A server, and a key of alice's (made in-process: test_cli_users makes one with the CLI)."""
    admin = admin_args(mongodb_url, db_name, tmp_path)
    async with open_database(mongodb_url, db_name, collections=COLLECTIONS, watch=False) as db:
        await virtool.create_user(db, "alice", groups=["lab"])
        _, key = await virtool.create_key(db, "alice")
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "r.fq").write_bytes(b"@r\nACGT\n+\nIIII\n")
    async with vtrio_process(["--port", "0", "--shutdown-timeout", "5", *admin]) as process:
        url = await process.wait_ready()
        yield Server(url, key, tmp_path)
        process.signal(signal.SIGTERM)
        assert await process.wait(10) == 0, process.output


async def vtrio(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m vtrio ARGS`` to its end, without blocking the event loop."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VTRIO_")}
    environment.update(env or {})
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "vtrio", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=environment,
        )


async def test_call_prints_the_result(server: Server, mongodb_url: str, db_name: str) -> None:
    done = await vtrio("call", "system.info", "--url", server.url, "--key", server.key)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["connections"] == 1
    assert info["jobs"]["waiting"] == 0

    # A user and key made with `vtrio users create` and `vtrio keys create`, from VTRIO_*.
    admin = admin_args(mongodb_url, db_name, server.data_dir)
    created = await trio.to_thread.run_sync(
        lambda: run_vtrio(["users", "create", "bob", "--group", "field", *admin])
    )
    assert created.returncode == 0, created.stderr
    keyed = await trio.to_thread.run_sync(lambda: run_vtrio(["keys", "create", "bob", *admin]))
    assert keyed.returncode == 0, keyed.stderr
    env = {"VTRIO_URL": server.url, "VTRIO_KEY": keyed.stdout.strip()}
    params = json.dumps({"name": "s1", "reads": "r.fq", "group": "field"})
    done = await vtrio("call", "samples.create", params, env=env)
    assert done.returncode == 0, done.stderr
    sample = json.loads(done.stdout)
    assert (sample["name"], sample["user"], sample["group"]) == ("s1", "bob", "field")
    done = await vtrio("call", "samples.get", json.dumps({"id": sample["id"]}), env=env)
    assert json.loads(done.stdout) == sample


async def test_call_fails_with_a_message(server: Server) -> None:
    env = {"VTRIO_URL": server.url, "VTRIO_KEY": server.key}
    failures = {
        ("samples.get", '{"id": "nope"}'): "error 404: no sample 'nope'",
        ("samples.get", "{not json"): "PARAMS is not JSON",
        ("system.info", "--key=vt_wrong"): "the server closed the connection: 4000",
        ("system.info", "--url=ws://127.0.0.1:1/ws"): "cannot connect to ws://127.0.0.1:1/ws",
    }
    results: dict[tuple[str, str], subprocess.CompletedProcess] = {}

    async def run(method: str, params: str) -> None:
        results[method, params] = await vtrio("call", method, params, env=env)

    async with trio.open_nursery() as nursery:  # at once: each is a Python start-up
        for method, params in failures:
            nursery.start_soon(run, method, params)
    for (method, params), message in failures.items():
        done = results[method, params]
        assert done.returncode == 1, (method, params, done.stderr)
        assert message in done.stderr.decode(), (message, done.stderr)
        assert done.stdout == b""


async def test_watch_prints_changes_until_ctrl_c(server: Server) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VTRIO_")}
    environment.update(VTRIO_URL=server.url, VTRIO_KEY=server.key)
    watcher = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vtrio", "watch", "--interface", "samples"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
    )
    try:
        assert watcher.stdout is not None and watcher.stderr is not None
        with trio.fail_after(30):
            said = await watcher.stderr.receive_some()
        assert b"watching samples at " + server.url.encode() in said

        env = {"VTRIO_URL": server.url, "VTRIO_KEY": server.key}
        params = json.dumps({"name": "watched", "reads": "r.fq"})
        sample = json.loads((await vtrio("call", "samples.create", params, env=env)).stdout)
        job_params = json.dumps({"task": "sample_stats", "sample_id": sample["id"]})
        assert (await vtrio("call", "jobs.create", job_params, env=env)).returncode == 0

        # The insert, then the statistics; the job's own messages are filtered out.
        lines: list[dict] = []
        buffer = b""
        with trio.fail_after(30):
            while len(lines) < 2:
                buffer += await watcher.stdout.receive_some()
                *complete, buffer = buffer.split(b"\n")
                lines.extend(json.loads(line) for line in complete)
        assert [(m["interface"], m["operation"]) for m in lines] == [
            ("samples", "insert"),
            ("samples", "update"),
        ]
        assert lines[0]["data"] == sample
        assert lines[1]["data"]["quality"]["count"] == 1

        watcher.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await watcher.wait() == 0
    finally:
        if watcher.returncode is None:
            watcher.kill()
            with trio.CancelScope(shield=True):
                await watcher.wait()

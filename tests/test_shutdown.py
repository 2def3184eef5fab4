"""Stopping a real ``python -m vtrio`` with work in flight: nothing may outlive it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pymongo
import pytest
import trio

from tests.live import connect
from tests.processes import run_vtrio, vtrio_process
from tests.test_live import closed_with
from vtrio.framework import CloseCode

RECORD = b"@read\n" + b"ACGT" * 25 + b"\n+\n" + b"I" * 100 + b"\n"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            pending.extend(children - found)
            found |= children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def call(websocket, request_id: int, method: str, **params) -> dict:
    await websocket.send_message(
        json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
    )
    with trio.fail_after(30):
        while True:
            frame = json.loads(await websocket.get_message())
            for message in frame if isinstance(frame, list) else [frame]:
                if message.get("id") == request_id:
                    assert "result" in message, message
                    return message["result"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_stopping_with_jobs_running_leaves_nothing_and_requeues_them(
    tmp_path: Path, mongodb_url: str, db_name: str, signum: signal.Signals
) -> None:
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "big.fq").write_bytes(RECORD * 400_000)  # ~90 MB: seconds of work
    common = ["--mongodb-url", mongodb_url, "--db-name", db_name, "--data-dir", str(tmp_path)]
    assert run_vtrio(["users", "create", "alice", *common]).returncode == 0
    key = run_vtrio(["keys", "create", "alice", *common]).stdout.strip()
    args = [*common, "--port", "0", "--jobs", "2", "--processes", "2", "--shutdown-timeout", "5"]

    async with vtrio_process(args) as server:
        url = await server.wait_ready()
        with server.explained():
            async with connect(url, key) as websocket:
                job_ids = []
                for n in range(2):
                    sample = await call(
                        websocket, 10 + n, "samples.create", name=f"s{n}", reads="big.fq"
                    )
                    job = await call(websocket, 20 + n, "jobs.create", task="sample_stats",
                                     sample_id=sample["id"])  # fmt: skip
                    job_ids.append(job["id"])
                with trio.fail_after(30):
                    while {j["state"] for j in await jobs(mongodb_url, db_name)} != {"running"}:
                        await trio.sleep(0.05)
                with trio.fail_after(30):  # "running" comes just before the worker's spawn
                    while len(below := descendants(server.process.pid)) < 2:  # both workers
                        await trio.sleep(0.01)
                server.signal(signum)
                assert await closed_with(websocket) == CloseCode.GOING_AWAY
        assert await server.wait(10) == 0, server.output
    with trio.fail_after(5):  # multiprocessing's resource tracker exits once its pipe closes
        while [pid for pid in below if alive(pid)]:
            await trio.sleep(0.01)
    assert {j["state"] for j in await jobs(mongodb_url, db_name)} == {"waiting"}


async def jobs(mongodb_url: str, db_name: str) -> list[dict]:
    def read() -> list[dict]:
        with pymongo.MongoClient(mongodb_url) as client:
            return list(client[db_name].jobs.find())

    return await trio.to_thread.run_sync(read)

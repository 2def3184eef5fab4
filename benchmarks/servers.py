"""The two servers under test, and the client and writer processes that load them.

Both servers run as child processes on 127.0.0.1, each on a database of its own in the run's one
mongod, each with a data directory whose ``uploads/`` holds the benchmark's FASTQ file. Both are
set up the same way: an admin user ``bench`` and an API key created with vtrio's own auth code
(the baseline reads the same ``users`` and ``keys`` collections), so both do the same work per
call.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from benchmarks.procs import Child
from benchmarks.rawws import RpcClient
from benchmarks.report import BASELINE, VTRIO

if TYPE_CHECKING:
    from benchmarks.harness import Context

READY = re.compile(r"(?:vtrio|baseline) ready at (ws://\S+)")
_names = itertools.count(1)


@dataclass
class Server:
    side: str
    child: Child
    url: str
    key: str
    data_dir: Path
    db_name: str
    sample_ids: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.child.pid

    @asynccontextmanager
    async def rpc(self) -> AsyncIterator[RpcClient]:
        """A JSON-RPC connection (its reader runs for the block)."""
        rpc = await RpcClient.connect(self.url, self.key)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rpc.run)
            try:
                yield rpc
            finally:
                await rpc.ws.close()
                nursery.cancel_scope.cancel()

    async def create_samples(self, count: int, reads: str) -> list[str]:
        async with self.rpc() as rpc:
            for _ in range(count):
                sample = await rpc.call(
                    "samples.create", {"name": f"bench-{next(_names)}", "reads": reads}
                )
                self.sample_ids.append(sample["id"])
        return self.sample_ids[-count:]


async def _create_key(ctx: Context, db_name: str) -> str:
    """Create the admin user ``bench`` and an API key, with vtrio's own auth code.

    In-process (no CLI start-up per server); the baseline reads the same collections.
    """
    from vtrio import auth
    from vtrio.db import open_database

    def nowhere(interface: str, operation: str, data: Any, subject: Any) -> None:
        """users and keys are silent collections: nothing is dispatched."""

    async with open_database(ctx.mongodb_url, db_name, dispatch=nowhere) as db:
        await auth.create_indexes(db)
        await auth.create_user(db, "bench", admin=True)
        _, key = await auth.create_key(db, "bench")
    return key


@asynccontextmanager
async def running_server(
    ctx: Context,
    side: str,
    *,
    processes: int = 2,
    jobs: int = 2,
    threads: int = 16,
    process_backend: str = "trio-parallel",
    shutdown_timeout: float = 10.0,
    heartbeat: float = 20.0,
) -> AsyncIterator[Server]:
    """Start one server (vtrio or baseline) with a fresh database; kill it after the block.

    The block may also stop the server itself (the shutdown benchmark does); killing the
    process group afterwards then only catches what it left behind.
    """
    number = next(_names)
    db_name = f"bench_{side}_{number}"
    data_dir = ctx.workdir / f"{side}-{number}"
    uploads = data_dir / "uploads"
    uploads.mkdir(parents=True)
    for fastq in ctx.fastq_files():
        os.link(fastq, uploads / fastq.name)  # a hard link: no copy of a large file
    common = [
        "--host", "127.0.0.1",
        "--port", "0",
        "--mongodb-url", ctx.mongodb_url,
        "--db-name", db_name,
        "--data-dir", str(data_dir),
        "--processes", str(processes),
        "--jobs", str(jobs),
        "--threads", str(threads),
    ]  # fmt: skip
    if side == VTRIO:
        argv = [
            sys.executable, "-m", "vtrio", *common,
            "--shutdown-timeout", str(shutdown_timeout),
            "--process-backend", process_backend,
            "--heartbeat-interval", str(heartbeat),
            "--log-level", "INFO",
        ]  # fmt: skip
    elif side == BASELINE:
        argv = [sys.executable, "-m", "benchmarks.baseline", *common]
    else:
        raise ValueError(side)
    child = ctx.children.start(side, argv)
    try:
        # The user and key are made while the server starts: both only need the database.
        key = await _create_key(ctx, db_name)
        line = await child.wait_for_stderr(READY.search, timeout=60)
        match = READY.search(line)
        assert match is not None
        ctx.databases.append(db_name)
        yield Server(side, child, match.group(1), key, data_dir, db_name)
    finally:
        child.kill_group()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await child.wait()


# --- client and writer processes --------------------------------------------------------------


class ClientGroup:
    """``n`` websocket connections spread over a few load processes."""

    def __init__(self, processes: list[Child]) -> None:
        self.processes = processes

    async def _all(self, command: dict[str, Any], timeout: float = 120) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = [{} for _ in self.processes]

        async def ask(index: int, child: Child) -> None:
            await child.send_line(json.dumps(command))
            answers[index] = json.loads(await child.read_line())

        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                for index, child in enumerate(self.processes):
                    nursery.start_soon(ask, index, child)
        return answers

    async def connect(self, url: str, key: str, counts: list[int], slow: bool = False) -> int:
        answers: list[dict[str, Any]] = [{} for _ in self.processes]

        async def ask(index: int, child: Child, n: int) -> None:
            command = {"cmd": "connect", "url": url, "key": key, "n": n, "slow": slow}
            await child.send_line(json.dumps(command))
            answers[index] = json.loads(await child.read_line())

        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                for index, (child, n) in enumerate(zip(self.processes, counts, strict=True)):
                    nursery.start_soon(ask, index, child, n)
        failed = sum(a["failed"] for a in answers)
        if failed:
            errors = [e for a in answers for e in a["errors"]]
            raise RuntimeError(f"{failed} client connections failed: {errors[:3]}")
        return sum(a["connected"] for a in answers)

    async def record(self, on: bool) -> None:
        await self._all({"cmd": "record", "on": on})

    async def stats(self, t0: int | None = None, t1: int | None = None) -> dict[str, Any]:
        answers = await self._all({"cmd": "stats", "t0": t0, "t1": t1})
        codes: dict[str, int] = {}
        for answer in answers:
            for code, count in answer["close_codes"].items():
                codes[code] = codes.get(code, 0) + count
        return {
            "window_messages": sum(a["window_messages"] or 0 for a in answers),
            "messages": sum(a["messages"] for a in answers),
            "frames": sum(a["frames"] for a in answers),
            "latencies": [x for a in answers for x in a["latencies"]],
            "cpu_ns": sum(a["cpu_ns"] for a in answers),
            "open": sum(a["open"] for a in answers),
            "close_codes": codes,
        }

    async def wait_closed(self, timeout: float) -> dict[str, Any]:
        answers = await self._all({"cmd": "wait_closed", "timeout": timeout}, timeout + 30)
        codes: dict[str, int] = {}
        for answer in answers:
            for code, count in answer["close_codes"].items():
                codes[code] = codes.get(code, 0) + count
        return {
            "open": sum(a["open"] for a in answers),
            "close_codes": codes,
            "last_close_ns": max(a["last_close_ns"] for a in answers),
        }


def spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@asynccontextmanager
async def client_group(
    ctx: Context, server: Server, n: int, *, processes: int | None = None, slow: bool = False,
    batch: bool = True,
) -> AsyncIterator[ClientGroup]:  # fmt: skip
    """``n`` connected clients of ``server`` for the block, in their own processes."""
    count = max(1, min(processes or ctx.options.client_procs, n))
    children = [
        ctx.children.python(f"clients-{server.side}", "benchmarks.loadclient", pipes=True)
        for _ in range(count)
    ]
    group = ClientGroup(children)
    url = server.url if batch else server.url + "?batch=0"
    try:
        await group.connect(url, server.key, spread(n, count), slow=slow)
        yield group
    finally:
        for child in children:
            child.kill_group()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for child in children:
                await child.wait()


class WriterProcess:
    def __init__(self, child: Child) -> None:
        self.child = child

    async def run(self, timeout: float, **command: Any) -> dict[str, Any]:
        await self.child.send_line(json.dumps({"cmd": "run", **command}))
        with trio.fail_after(timeout):
            result: dict[str, Any] = json.loads(await self.child.read_line())
            return result


@asynccontextmanager
async def writer_process(
    ctx: Context, server: Server, connections: int = 1
) -> AsyncIterator[WriterProcess]:
    child = ctx.children.python(f"writer-{server.side}", "benchmarks.writer", pipes=True)
    try:
        await child.send_line(
            json.dumps(
                {"cmd": "connect", "url": server.url, "key": server.key, "connections": connections}
            )
        )
        with trio.fail_after(60):
            json.loads(await child.read_line())
        yield WriterProcess(child)
    finally:
        child.kill_group()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await child.wait()


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")

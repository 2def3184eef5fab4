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
from collections.abc import AsyncIterator, Sequence
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
    from vtrio import virtool
    from vtrio.framework import open_database

    async with open_database(
        ctx.mongodb_url, db_name, collections=virtool.COLLECTIONS, watch=False
    ) as db:
        await virtool.create_user(db, "bench", admin=True)
        _, key = await virtool.create_key(db, "bench")
    return key


def _server_argv(
    ctx: Context,
    side: str,
    *,
    db_name: str,
    data_dir: Path,
    port: int,
    processes: int,
    jobs: int,
    threads: int,
    shutdown_timeout: float,
    heartbeat: float,
    uploads_dir: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    common = [
        "--host", "127.0.0.1",
        "--port", str(port),
        "--mongodb-url", ctx.mongodb_url,
        "--db-name", db_name,
        "--data-dir", str(data_dir),
        "--processes", str(processes),
        "--jobs", str(jobs),
        "--threads", str(threads),
    ]  # fmt: skip
    if side == VTRIO:
        return [
            sys.executable, "-m", "vtrio", *common,
            *(["--uploads-dir", str(uploads_dir)] if uploads_dir else []),
            "--shutdown-timeout", str(shutdown_timeout),
            "--heartbeat-interval", str(heartbeat),
            "--log-level", "INFO",
            *extra,
        ]  # fmt: skip
    if side == BASELINE:
        return [sys.executable, "-m", "benchmarks.baseline", *common, *extra]
    raise ValueError(side)


def _data_dir(ctx: Context, side: str, number: int) -> Path:
    """A fresh data directory whose ``uploads/`` holds the benchmark's FASTQ file(s)."""
    data_dir = ctx.workdir / f"{side}-{number}"
    uploads = data_dir / "uploads"
    uploads.mkdir(parents=True)
    for fastq in ctx.fastq_files():
        os.link(fastq, uploads / fastq.name)  # a hard link: no copy of a large file
    return data_dir


async def start_server(
    ctx: Context,
    side: str,
    *,
    db_name: str,
    data_dir: Path,
    key: str | trio.Event | None = None,
    port: int = 0,
    name: str | None = None,
    processes: int = 2,
    jobs: int = 2,
    threads: int = 16,
    shutdown_timeout: float = 10.0,
    heartbeat: float = 20.0,
    uploads_dir: Path | None = None,
    extra: Sequence[str] = (),
) -> Server:
    """Start a server process and wait until it is ready (the caller stops it).

    ``key`` is the API key to connect with; None: make the admin user ``bench`` and a key in
    ``db_name`` while the server starts (both only need the database).
    """
    argv = _server_argv(
        ctx, side, db_name=db_name, data_dir=data_dir, port=port, processes=processes,
        jobs=jobs, threads=threads, shutdown_timeout=shutdown_timeout, heartbeat=heartbeat,
        uploads_dir=uploads_dir, extra=extra,
    )  # fmt: skip
    child = ctx.children.start(name or side, argv)
    try:
        if key is None:
            key = await _create_key(ctx, db_name)
        line = await child.wait_for_stderr(READY.search, timeout=60)
    except BaseException:
        child.kill_group()
        raise
    match = READY.search(line)
    assert match is not None and isinstance(key, str)
    if db_name not in ctx.databases:
        ctx.databases.append(db_name)
    return Server(side, child, match.group(1), key, data_dir, db_name)


async def stop_server(server: Server) -> None:
    """SIGKILL the server's process group (it and its workers) and reap it."""
    server.child.kill_group()
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        await server.child.wait()


@asynccontextmanager
async def running_server(
    ctx: Context,
    side: str,
    *,
    processes: int = 2,
    jobs: int = 2,
    threads: int = 16,
    shutdown_timeout: float = 10.0,
    heartbeat: float = 20.0,
    extra: Sequence[str] = (),
) -> AsyncIterator[Server]:
    """Start one server (vtrio or baseline) with a fresh database; kill it after the block.

    The block may also stop the server itself (the shutdown benchmark does); killing the
    process group afterwards then only catches what it left behind.
    """
    number = next(_names)
    server = await start_server(
        ctx, side, db_name=f"bench_{side}_{number}", data_dir=_data_dir(ctx, side, number),
        processes=processes, jobs=jobs, threads=threads, shutdown_timeout=shutdown_timeout,
        heartbeat=heartbeat, extra=extra,
    )  # fmt: skip
    try:
        yield server
    finally:
        await stop_server(server)


@dataclass
class Cluster:
    """vtrio instances on one database (each with a data directory of its own, all with one
    uploads folder), and the API key every client uses."""

    ctx: Context
    db_name: str
    key: str
    uploads: Path
    servers: list[Server]

    async def restart(self, index: int, *, timeout: float = 60) -> Server:
        """Start instance ``index`` again (it must have exited), on its port, data directory
        and database; it replaces the old one in :attr:`servers`."""
        old = self.servers[index]
        port = int(old.url.rsplit(":", 1)[1].split("/")[0])
        with trio.fail_after(timeout):
            new = await start_server(
                self.ctx, VTRIO, db_name=self.db_name, data_dir=old.data_dir, key=self.key,
                port=port, name=f"vtrio-{index}-restarted", uploads_dir=self.uploads,
                processes=1,
            )  # fmt: skip
        self.servers[index] = new
        return new


@asynccontextmanager
async def running_cluster(ctx: Context, count: int = 2) -> AsyncIterator[Cluster]:
    """``count`` vtrio instances on one fresh database; killed after the block."""
    number = next(_names)
    db_name = f"bench_cluster_{number}"
    uploads = _data_dir(ctx, "cluster", number) / "uploads"
    key = await _create_key(ctx, db_name)
    servers: list[Server] = []
    try:
        # One after the other: instances started at once on a new uploads folder race to name
        # it (vtrio's uploads marker), and the loser exits.
        for index in range(count):
            data_dir = ctx.workdir / f"vtrio-{number}-{index}"
            data_dir.mkdir()
            server = await start_server(
                ctx, VTRIO, db_name=db_name, data_dir=data_dir, key=key, name=f"vtrio-{index}",
                uploads_dir=uploads, processes=1,
            )  # fmt: skip
            servers.append(server)
        yield Cluster(ctx, db_name, key, uploads, servers)
    finally:
        for server in servers:
            await stop_server(server)


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

    async def connect(
        self,
        url: str,
        key: str,
        counts: list[int],
        *,
        slow: bool = False,
        track: bool = False,
        window: int = 64,
    ) -> dict[str, Any]:
        """Open ``counts[i]`` more clients in process ``i``; raise if any failed.

        ``window``: handshakes in progress at once per process (0: all at once).
        """
        answers = await self._each(
            [
                {"cmd": "connect", "url": url, "key": key, "n": n, "slow": slow, "track": track,
                 "window": window}
                for n in counts
            ],
            timeout=180,
        )  # fmt: skip
        return _connected(answers, raise_on_failure=True)

    async def reconnect(
        self, url: str, *, window: int = 0, target: str | None = None
    ) -> dict[str, Any]:
        """Every client whose connection ended connects again, with ``?since=`` its last
        position; all at once (``window`` 0). Failures are counted, not raised. With
        ``target``, each tracked client notes when it reaches that position (see
        :meth:`wait_position`)."""
        command = {"cmd": "reconnect", "url": url, "window": window, "target": target}
        answers = await self._each(
            [command] * len(self.processes),
            timeout=180,
        )
        return _connected(answers, raise_on_failure=False)

    async def wait_position(self, position: str, timeout: float) -> dict[str, Any]:
        """Wait until every tracked client has received ``position`` (or later), at most
        ``timeout`` s; how many did, and the CLOCK_MONOTONIC instant the last one did."""
        answers = await self._all(
            {"cmd": "wait_position", "position": position, "timeout": timeout}, timeout + 30
        )
        return {
            "reached": sum(a["reached"] for a in answers),
            "tracked": sum(a["tracked"] for a in answers),
            "last_reached_ns": max(a["last_reached_ns"] for a in answers),
            "open": sum(a["open"] for a in answers),
        }

    async def _each(self, commands: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        """Send ``commands[i]`` to process ``i``, all at once; their answers."""
        answers: list[dict[str, Any]] = [{} for _ in self.processes]

        async def ask(index: int, child: Child, command: dict[str, Any]) -> None:
            await child.send_line(json.dumps(command))
            answers[index] = json.loads(await child.read_line())

        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                for index, (child, command) in enumerate(
                    zip(self.processes, commands, strict=True)
                ):
                    nursery.start_soon(ask, index, child, command)
        return answers

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
            "last_message_ns": max(a["last_message_ns"] for a in answers),
            "frames": sum(a["frames"] for a in answers),
            "latencies": [x for a in answers for x in a["latencies"]],
            "cpu_ns": sum(a["cpu_ns"] for a in answers),
            "open": sum(a["open"] for a in answers),
            "close_codes": codes,
            "tracked": [client for a in answers for client in a["tracked"]],
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


async def _subscribed(rpc: RpcClient, connections: int, timeout: float = 30) -> None:
    """Wait until the server counts ``connections`` connections. The baseline authenticates a
    client after the handshake, and sends it changes only from then on; vtrio before."""
    with trio.fail_after(timeout):
        while (await rpc.call("system.info"))["connections"] < connections:
            await trio.sleep(0.02)


def _connected(answers: list[dict[str, Any]], *, raise_on_failure: bool) -> dict[str, Any]:
    failed = sum(a["failed"] for a in answers)
    errors = [e for a in answers for e in a["errors"]]
    if failed and raise_on_failure:
        raise RuntimeError(f"{failed} client connections failed: {errors[:3]}")
    return {
        "connected": sum(a["connected"] for a in answers),
        "failed": failed,
        "errors": errors[:3],
        "started_ns": min(a["started_ns"] for a in answers),
        "done_ns": max(a["done_ns"] for a in answers),
    }


def spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@asynccontextmanager
async def client_group(
    ctx: Context,
    server: Server,
    n: int,
    *,
    processes: int | None = None,
    slow: bool = False,
    batch: bool = True,
    track: bool = False,
    window: int = 64,
) -> AsyncIterator[ClientGroup]:
    """``n`` connected clients of ``server`` for the block, in their own processes."""
    count = max(1, min(processes or ctx.options.client_procs, n))
    children = [
        ctx.children.python(f"clients-{server.side}", "benchmarks.loadclient", pipes=True)
        for _ in range(count)
    ]
    group = ClientGroup(children)
    url = server.url if batch else server.url + "?batch=0"
    try:
        async with server.rpc() as rpc:
            before = (await rpc.call("system.info"))["connections"]
            await group.connect(url, server.key, spread(n, count), slow=slow, track=track,
                                window=window)  # fmt: skip
            await _subscribed(rpc, before + n)
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

    async def stop(self) -> None:
        """End the run in progress (its ``run`` then returns, after its calls in flight)."""
        await self.child.send_line(json.dumps({"cmd": "stop"}))


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

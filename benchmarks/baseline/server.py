"""The baseline server: ``python -m benchmarks.baseline --port 0 --mongodb-url URL ...``.

Logs ``baseline ready at ws://HOST:PORT/ws`` on stderr once it accepts connections. See the
package docstring for every design choice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from aiohttp import WSMsgType, web
from pymongo import AsyncMongoClient

from benchmarks.baseline import rpc
from benchmarks.baseline.db import Database
from benchmarks.baseline.dispatcher import Connection, Dispatcher
from benchmarks.baseline.jobs import JobRunner
from vtrio.virtool import COLLECTIONS, Identity, hash_key, identity_of, well_formed

log = logging.getLogger("baseline")

STATE: web.AppKey[State] = web.AppKey("state")


@dataclass
class State:
    settings: argparse.Namespace
    client: AsyncMongoClient
    db: Database
    dispatcher: Dispatcher
    threads: ThreadPoolExecutor
    processes: ProcessPoolExecutor
    jobs: JobRunner
    uploads: Path
    started_at: float


async def authenticate(db: Database, key: str | None) -> Identity | None:
    """The same lookups as vtrio.auth.authenticate: the key by its hash, then its user."""
    if not key or not well_formed(key):
        return None
    record = await db.keys.find_one({"hash": hash_key(key)})
    if record is None:
        return None
    user = await db.users.find_one({"_id": record["user_id"]})
    return None if user is None else identity_of(user, record)


def _presented_key(request: web.Request) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    tokens = parse_qs(request.query_string).get("token")
    return tokens[-1] if tokens else None


async def websocket(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    ws = web.WebSocketResponse(autoping=True, heartbeat=5, max_msg_size=1 << 20)
    await ws.prepare(request)
    identity = await authenticate(state.db, _presented_key(request))
    if identity is None:
        await ws.close(code=4000, message=b"a valid API key is required")
        return ws
    connection = Connection(ws, identity)
    state.dispatcher.add(connection)
    try:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                rpc.on_message(state, connection, message.data)
    finally:
        state.dispatcher.remove(connection)
        for task in list(connection.tasks):
            task.cancel()
    return ws


async def on_startup(app: web.Application) -> None:
    settings = app["settings"]
    loop = asyncio.get_running_loop()
    threads = ThreadPoolExecutor(max_workers=settings.threads)
    loop.set_default_executor(threads)
    processes = ProcessPoolExecutor(max_workers=settings.processes)
    dispatcher = Dispatcher()
    client: AsyncMongoClient = AsyncMongoClient(settings.mongodb_url)
    db = Database(client, settings.db_name, dispatcher.dispatch)
    await client.admin.command("ping")
    # vtrio's own declared indexes (the same work for both servers).
    for name, spec in COLLECTIONS.items():
        if spec.indexes:
            await client[settings.db_name][name].create_indexes(list(spec.indexes))
    uploads = Path(settings.data_dir) / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    runner = JobRunner(
        db, threads, processes, uploads,
        name=f"{socket.gethostname()}:{settings.data_dir}", concurrency=settings.jobs,
    )  # fmt: skip
    runner.start()
    app[STATE] = State(
        settings, client, db, dispatcher, threads, processes, runner, uploads, app["started_at"]
    )
    # The socket was bound and is listening before run_app started: connections made from now
    # on wait in its backlog until the site serves them.
    host, port = app["socket"].getsockname()[:2]
    log.warning("baseline ready at ws://%s:%d/ws", host, port)


async def on_shutdown(app: web.Application) -> None:
    state = app[STATE]
    await state.dispatcher.close()  # each websocket in turn, with 1001
    state.threads.shutdown(wait=True)  # blocks the loop until running jobs' calls end
    state.processes.shutdown(wait=True)
    await state.jobs.close()


async def on_cleanup(app: web.Application) -> None:
    await app[STATE].client.close()


def _raise_open_file_limit() -> None:
    """Like vtrio's listener: the soft limit on open files up to the hard one, so that as many
    connections can be held (a server meant to hold thousands would)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mongodb-url", required=True)
    parser.add_argument("--db-name", default="baseline")
    parser.add_argument("--data-dir", default="baseline-data")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--jobs", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    started_at = time.monotonic()
    _raise_open_file_limit()
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(socket.SOMAXCONN)  # trio's default backlog
    app = web.Application()
    app["settings"] = settings
    app["socket"] = sock
    app["started_at"] = started_at
    app.router.add_get("/ws", websocket)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

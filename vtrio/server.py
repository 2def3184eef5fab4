"""The server's whole life: one root nursery, the service tree, and the signals that end it.

The tree, started top to bottom and stopped bottom to top::

    mongodb      the embedded mongod (or nothing, with --mongodb-url)
    http         the shared httpx client for NCBI and GitHub
    executors    run_in_thread / run_in_process
    database     pymongo through trio.to_thread; every write dispatches
    dispatcher   owns every websocket connection; closes them with 1001 on the way out
    websocket    the listening socket for /ws: stops accepting first

A service that fails to start, or dies while running, tears the others down in the same reverse
order and ends the process with a message that names it (see :mod:`vtrio.services`).

SIGINT or SIGTERM starts a graceful shutdown bounded by ``--shutdown-timeout``: the tree unwinds
in order, and whatever is still running when the grace period ends is cancelled. A second SIGINT
cancels everything at once. Either way every child process is stopped before ``serve`` returns.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import trio

from vtrio import auth
from vtrio.config import Settings
from vtrio.db import Database, open_database
from vtrio.dispatcher import Dispatcher
from vtrio.executors import Executors, open_executors
from vtrio.http import HttpClient, open_http_client
from vtrio.mongod import run_mongod
from vtrio.services import service
from vtrio.websocket import WebsocketLimits, serve_ws

log = logging.getLogger("vtrio")


@dataclass(frozen=True)
class App:
    """The running services, for everything that needs one of them."""

    settings: Settings
    http: HttpClient
    executors: Executors
    db: Database
    dispatcher: Dispatcher
    url: str


def mongodb(settings: Settings) -> AbstractAsyncContextManager[str]:
    """The MongoDB the tree uses: the configured URL, or an embedded mongod's."""
    if settings.mongodb_url:
        return nullcontext(settings.mongodb_url)
    return run_mongod(settings.data_dir, port=settings.mongod_port, binary=settings.mongod_path)


@asynccontextmanager
async def open_app(settings: Settings) -> AsyncIterator[App]:
    """Start the service tree; yield the running app; stop the tree in reverse order."""
    dispatcher = Dispatcher(close_timeout=settings.shutdown_timeout)
    async with (
        service("mongodb", mongodb(settings)) as mongodb_url,
        service(
            "http",
            open_http_client(
                connect_timeout=settings.http_connect_timeout,
                read_timeout=settings.http_read_timeout,
                total_timeout=settings.http_total_timeout,
                max_connections=settings.http_max_connections,
            ),
        ) as http,
        service(
            "executors",
            open_executors(
                threads=settings.threads,
                processes=settings.processes,
                process_backend=settings.process_backend,  # type: ignore[arg-type]
            ),
        ) as executors,
        service(
            "database",
            open_database(
                mongodb_url,
                settings.db_name,
                dispatch=dispatcher.dispatch,
                pool_size=settings.mongodb_pool_size,
                timeout=settings.mongodb_timeout,
            ),
        ) as db,
        service(
            "dispatcher",
            dispatcher.running(
                grace_period=settings.shutdown_timeout,
                check_keys=partial(auth.valid_key_ids, db),
            ),
        ) as connections,
        service(
            "websocket",
            serve_ws(
                host=settings.host,
                port=settings.port,
                dispatcher=dispatcher,
                connections=connections,
                authenticate=partial(auth.authenticate, db),
                limits=WebsocketLimits(
                    max_connections=settings.max_connections,
                    max_message_size=settings.max_message_size,
                    send_queue_size=settings.send_queue_size,
                    heartbeat_interval=settings.heartbeat_interval,
                ),
            ),
        ) as url,
    ):
        await auth.create_indexes(db)
        yield App(settings, http, executors, db, dispatcher, url)


async def serve(settings: Settings) -> None:
    """Run the server until SIGINT or SIGTERM; return once everything has stopped."""
    shutdown = _Shutdown(settings.shutdown_timeout)
    async with trio.open_nursery() as root:
        root.start_soon(shutdown.watch_signals)
        with shutdown.scope:
            async with open_app(settings) as app:
                log.info("vtrio ready at %s", app.url)
                shutdown.ready = True
                await shutdown.requested.wait()
                log.info("shutting down (grace period %.1f s)", settings.shutdown_timeout)
        root.cancel_scope.cancel()


class _Shutdown:
    """Turns signals into a graceful shutdown, or an immediate one."""

    def __init__(self, grace_period: float) -> None:
        self.grace_period = grace_period
        self.scope = trio.CancelScope()
        self.requested = trio.Event()
        self.ready = False

    async def watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.request(signal.Signals(signum))

    def request(self, signum: signal.Signals) -> None:
        if self.requested.is_set() or not self.ready:
            # A second signal, or one before start-up finished: stop at once. Cleanup that
            # must happen (stopping mongod) runs shielded and bounded.
            log.warning("%s: stopping now", signum.name)
            self.scope.cancel()
            return
        log.info("%s received: stopping gracefully (again to stop at once)", signum.name)
        self.requested.set()
        self.scope.deadline = trio.current_time() + self.grace_period

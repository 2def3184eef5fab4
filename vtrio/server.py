"""The server's whole life: one root nursery, the service tree, and the signals that end it.

The tree, started top to bottom and stopped bottom to top::

    mongodb      the embedded mongod (or nothing, with --mongodb-url)
    http         the shared httpx client for NCBI and GitHub
    executors    run_in_thread / run_in_process
    database     pymongo through trio.to_thread; every write dispatches
    jobs         runs waiting jobs; on the way out puts running ones back to waiting
    dispatcher   owns every websocket connection; closes them with 1001 on the way out
    websocket    the listening socket for /ws: stops accepting first

A service that fails to start, or dies while running, tears the others down in the same reverse
order and ends the process with a message that names it (see :mod:`vtrio.services`).

SIGINT or SIGTERM starts a graceful shutdown bounded by ``--shutdown-timeout``: every client is
told at once (1001) and gets no more messages, then the tree unwinds in order, and whatever is
still running when the grace period ends is cancelled. A second SIGINT cancels everything at
once. Either way every child process is stopped before ``serve`` returns.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import trio

from vtrio import access, api, auth, jobs, samples
from vtrio.config import Settings
from vtrio.db import Database, open_database
from vtrio.dispatcher import SHUTDOWN_REASON, CloseCode, Dispatcher
from vtrio.executors import Executors, open_executors
from vtrio.github import GitHubClient
from vtrio.http import HttpClient, open_http_client
from vtrio.jobs import JobRunner, runner_name
from vtrio.mongod import run_mongod
from vtrio.ncbi import NCBIClient
from vtrio.services import service
from vtrio.uploads import Uploads
from vtrio.websocket import WebsocketLimits, WebsocketServer, serve_ws

log = logging.getLogger("vtrio")


@dataclass
class App:
    """The running services, for everything that needs one of them."""

    settings: Settings
    http: HttpClient
    ncbi: NCBIClient
    github: GitHubClient
    executors: Executors
    db: Database
    uploads: Uploads
    jobs: JobRunner
    dispatcher: Dispatcher
    websocket: WebsocketServer | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        assert self.websocket is not None, "the websocket service has not started"
        return self.websocket.url

    def begin_shutdown(self) -> None:
        """The first steps of a graceful shutdown, taken the moment it is asked for: stop
        accepting, tell every client (1001), and stop the running jobs (back to ``waiting``),
        so that the CPU goes to closing cleanly while the tree unwinds."""
        if self.websocket is not None:
            self.websocket.stop_accepting()
        self.dispatcher.close_all_soon(CloseCode.GOING_AWAY, SHUTDOWN_REASON)
        self.jobs.stop_soon()


def mongodb_service(settings: Settings) -> AbstractAsyncContextManager[str]:
    """The MongoDB the tree uses: the configured URL, or an embedded mongod's."""
    if settings.mongodb_url:
        return nullcontext(settings.mongodb_url)
    return run_mongod(settings.data_dir, port=settings.mongod_port, binary=settings.mongod_path)


@asynccontextmanager
async def open_app(settings: Settings) -> AsyncIterator[App]:
    """Start the service tree; yield the running app; stop the tree in reverse order."""
    dispatcher = Dispatcher(rules=DISPATCH_RULES, close_timeout=settings.shutdown_timeout)
    async with (
        service("mongodb", mongodb_service(settings)) as mongodb_url,
        service("http", http_service(settings)) as http,
        service("executors", executor_service(settings)) as executors,
        service("database", database_service(settings, mongodb_url, dispatcher)) as db,
    ):
        await create_indexes(db)
        uploads = await open_uploads(settings)
        runner = JobRunner(
            db, executors, uploads, name=runner_name(settings.data_dir), concurrency=settings.jobs
        )
        app = App(
            settings,
            http,
            NCBIClient(http, base_url=settings.ncbi_base_url, api_key=settings.ncbi_api_key),
            GitHubClient(http, base_url=settings.github_base_url, token=settings.github_token),
            executors,
            db,
            uploads,
            runner,
            dispatcher,
        )
        async with (
            service("jobs", runner.running()),
            service("dispatcher", connections_service(settings, dispatcher, db)) as nursery,
            service("websocket", websocket_service(settings, app, nursery)) as app.websocket,
        ):
            yield app


# --- each service, built from the settings --------------------------------------------------


def http_service(settings: Settings) -> AbstractAsyncContextManager[HttpClient]:
    return open_http_client(
        connect_timeout=settings.http_connect_timeout,
        read_timeout=settings.http_read_timeout,
        total_timeout=settings.http_total_timeout,
        max_connections=settings.http_max_connections,
    )


def executor_service(settings: Settings) -> AbstractAsyncContextManager[Executors]:
    return open_executors(
        threads=settings.threads,
        processes=settings.processes,
        process_backend=settings.process_backend,  # type: ignore[arg-type]
    )


def database_service(
    settings: Settings, url: str, dispatcher: Dispatcher
) -> AbstractAsyncContextManager[Database]:
    return open_database(
        url,
        settings.db_name,
        dispatch=dispatcher.dispatch,
        pool_size=settings.mongodb_pool_size,
        timeout=settings.mongodb_timeout,
    )


async def open_uploads(settings: Settings) -> Uploads:
    folder = trio.Path(settings.data_dir / "uploads")
    await folder.mkdir(parents=True, exist_ok=True)
    return Uploads(folder)


def connections_service(
    settings: Settings, dispatcher: Dispatcher, db: Database
) -> AbstractAsyncContextManager[trio.Nursery]:
    return dispatcher.running(
        grace_period=settings.shutdown_timeout, check_keys=partial(auth.valid_key_ids, db)
    )


def websocket_service(
    settings: Settings, app: App, nursery: trio.Nursery
) -> AbstractAsyncContextManager[WebsocketServer]:
    return serve_ws(
        host=settings.host,
        port=settings.port,
        dispatcher=app.dispatcher,
        connections=nursery,
        authenticate=partial(auth.authenticate, app.db),
        on_message=api.endpoint(app).on_message,
        limits=WebsocketLimits(
            max_connections=settings.max_connections,
            max_message_size=settings.max_message_size,
            send_queue_size=settings.send_queue_size,
            heartbeat_interval=settings.heartbeat_interval,
            send_buffer_size=settings.send_buffer_size,
        ),
    )


DISPATCH_RULES = {"samples": access.may_receive, "jobs": access.may_receive}


async def create_indexes(db: Database) -> None:
    await auth.create_indexes(db)
    await samples.create_indexes(db)
    await jobs.create_indexes(db)


async def serve(settings: Settings) -> None:
    """Run the server until SIGINT or SIGTERM; return once everything has stopped."""
    shutdown = _Shutdown(settings.shutdown_timeout)
    async with trio.open_nursery() as root:
        root.start_soon(shutdown.watch_signals)
        with shutdown.scope:
            async with open_app(settings) as app:
                log.info("vtrio ready at %s", app.url)
                shutdown.app = app
                await shutdown.requested.wait()
        root.cancel_scope.cancel()


class _Shutdown:
    """Turns signals into a graceful shutdown, or an immediate one."""

    def __init__(self, grace_period: float) -> None:
        self.grace_period = grace_period
        self.scope = trio.CancelScope()
        self.requested = trio.Event()
        self.app: App | None = None  # set once the app is ready

    async def watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.request(signal.Signals(signum))

    def request(self, signum: signal.Signals) -> None:
        if self.requested.is_set() or self.app is None:
            # A second signal, or one before start-up finished: stop at once. Cleanup that
            # must happen (stopping mongod) runs shielded and bounded.
            log.warning("%s: stopping now", signum.name)
            self.scope.cancel()
            return
        log.info(
            "%s received: stopping gracefully within %.1f s (again to stop at once)",
            signum.name,
            self.grace_period,
        )
        # Here, in the signal's task, not in the main task: a busy server may take a while to
        # schedule that one, and the first steps should not wait for it.
        self.app.begin_shutdown()
        self.requested.set()
        self.scope.deadline = trio.current_time() + self.grace_period

"""The composition root: vtrio's service tree, its method table and its collections, in one place.

The tree, started top to bottom and stopped bottom to top (:func:`open_app`)::

    mongodb      the embedded mongod (or nothing, with --mongodb-url)
    http         the one shared httpx client (NCBI)
    executors    run_in_thread / run_in_process
    database     pymongo in worker threads, and the change feed: MongoDB's change stream
    uploads      the folder of reads files
    jobs         runs waiting jobs; stopping puts running ones back to waiting
    hub          every websocket connection; fans the feed's changes out to them
    keys         closes connections whose API key was revoked (on any instance)
    web          /health, /ready, /metrics, the dashboard and vtrio.js (plain HTTP)
    listener     the listening socket: /ws and plain HTTP on one port

A service that fails to start, or dies while running, tears the others down in the same reverse
order and ends the process with a message that names it (see :func:`vtrio.framework.service`).

Stopping is one signal, :class:`~vtrio.framework.Stopping`, that every service watches: the
listener stops accepting, the hub tells every client (1001), the jobs stop, all at once; then
the tree unwinds, bounded as a whole by ``--shutdown-timeout``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass

import trio

from vtrio.config import Settings
from vtrio.framework import (
    CLIENT_SCRIPT,
    ConnectionLimits,
    Database,
    Executors,
    HttpClient,
    Hub,
    ListenerLimits,
    Methods,
    Metrics,
    RpcEndpoint,
    Stopping,
    Web,
    background_tasks,
    load_static,
    open_database,
    open_executors,
    open_http_client,
    open_hub,
    run_mongod,
    serve_listener,
    service,
)
from vtrio.virtool import (
    COLLECTIONS,
    DASHBOARD,
    JobMethods,
    JobRunner,
    NCBIClient,
    SampleMethods,
    SystemMethods,
    Uploads,
    authenticate,
    closing_revoked_keys,
    count_by_state,
    open_uploads,
    runner_name,
)

log = logging.getLogger("vtrio")


@dataclass(frozen=True)
class App:
    """The running server's services, for the command line and the tests."""

    url: str
    settings: Settings
    db: Database
    hub: Hub
    executors: Executors
    jobs: JobRunner
    metrics: Metrics


@asynccontextmanager
async def open_app(settings: Settings, stopping: Stopping | None = None) -> AsyncIterator[App]:
    """Start the service tree; yield the running app; stop the tree in reverse order.

    The block ending is a stop request (graceful, bounded by ``stopping``'s grace period); an
    exception out of it, or a service failing, stops the tree as a failure (clients are told
    1011, not 1001).
    """
    stopping = stopping or Stopping(settings.shutdown_timeout)
    started_at = time.monotonic()
    async with background_tasks() as clock:
        clock.start_soon(stopping.hurry_at_deadline)  # outside the tree: it bounds its teardown
        async with service_tree(settings, stopping, started_at) as app:
            yield app
            stopping.request()  # the block is done with the server: a graceful stop


@asynccontextmanager
async def service_tree(
    settings: Settings, stopping: Stopping, started_at: float
) -> AsyncIterator[App]:
    """The tree, in the order its services start (they stop in the reverse order)."""
    metrics = Metrics()
    async with (
        service("mongodb", mongodb(settings)) as mongodb_url,
        service("http", http_client(settings)) as http,
        service("executors", executors(settings, stopping)) as pools,
        service("database", database(settings, mongodb_url, stopping, metrics)) as db,
        service("uploads", open_uploads(settings.uploads, db.settings)) as uploads,
        service("jobs", job_runner(settings, db, pools, uploads).running(stopping)) as runner,
        service("hub", hub(settings, stopping, db, metrics)) as live,
        service("keys", closing_revoked_keys(live, db)),
        service("web", web(stopping, db, metrics)) as pages,
        service("listener", listener(settings, live, stopping, db, pages, metrics, rpc_methods(
            db, uploads, runner, ncbi_client(settings, http), live, started_at=started_at
        ))) as url,
    ):  # fmt: skip
        measure(metrics, live, db, pools, runner)
        yield App(url, settings, db, live, pools, runner, metrics)


async def serve(
    settings: Settings,
    stopping: Stopping,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until ``stopping`` is requested; return once everything has stopped.

    Reports the websocket URL through ``task_status`` once every service runs.
    """
    with trio.CancelScope() as everything:
        async with open_app(settings, stopping) as app:
            log.info("vtrio ready at %s", app.url)
            task_status.started(app.url)
            await stopping.wait()
            everything.deadline = stopping.deadline
            # The connections drain (every client was told 1001 at the request) while the port
            # still answers plain HTTP: /ready says 503, so a load balancer sends no one new.
            await app.hub.wait_all_gone()


# --- each service, from the settings -----------------------------------------------------------


def mongodb(settings: Settings) -> AbstractAsyncContextManager[str]:
    """The MongoDB the tree uses: the configured URL, or an embedded mongod's."""
    if settings.mongodb_url:
        return nullcontext(settings.mongodb_url)
    return run_mongod(settings.data_dir, port=settings.mongod_port, binary=settings.mongod_path)


def http_client(settings: Settings) -> AbstractAsyncContextManager[HttpClient]:
    return open_http_client(
        connect_timeout=settings.http_connect_timeout,
        read_timeout=settings.http_read_timeout,
        total_timeout=settings.http_total_timeout,
        max_connections=settings.http_max_connections,
    )


def executors(settings: Settings, stopping: Stopping) -> AbstractAsyncContextManager[Executors]:
    return open_executors(threads=settings.threads, processes=settings.processes, stopping=stopping)


def database(
    settings: Settings, url: str, stopping: Stopping, metrics: Metrics
) -> AbstractAsyncContextManager[Database]:
    return open_database(
        url,
        settings.db_name,
        collections=COLLECTIONS,
        stopping=stopping,
        workers=settings.mongodb_pool_size,
        timeout=settings.mongodb_timeout,
        history_size=settings.history_size,
        metrics=metrics,
    )


def hub(
    settings: Settings, stopping: Stopping, db: Database, metrics: Metrics
) -> AbstractAsyncContextManager[Hub]:
    return open_hub(
        COLLECTIONS, stopping, db.changes,
        heartbeat_interval=settings.heartbeat_interval, metrics=metrics,
    )  # fmt: skip


@asynccontextmanager
async def web(stopping: Stopping, db: Database, metrics: Metrics) -> AsyncIterator[Web]:
    """The plain-HTTP pages, their static files read once, now."""

    async def ready() -> dict[str, object]:
        return {
            "mongodb": await db.answers(within=READY_CHECK_TIMEOUT),
            "changes": db.changes is not None and db.changes.live,
            "accepting": not stopping.requested,
        }

    static = await load_static({"/vtrio.js": CLIENT_SCRIPT, **DASHBOARD})
    yield Web(ready=ready, metrics=metrics, static=static)


READY_CHECK_TIMEOUT = 1.0
"""Seconds /ready waits for MongoDB to answer before it says it does not."""


def measure(metrics: Metrics, hub: Hub, db: Database, pools: Executors, runner: JobRunner) -> None:
    """The gauges, read from the services at each scrape, and the feed's counter."""
    jobs: dict[str, float] = {}

    async def count_jobs() -> None:
        with trio.move_on_after(READY_CHECK_TIMEOUT):
            jobs.update(await count_by_state(db.jobs))

    metrics.refresh_before_scrape(count_jobs)
    metrics.gauge("vtrio_jobs", "Jobs in MongoDB, by state", lambda: jobs, label="state")
    feed = db.changes
    gauges: dict[str, tuple[str, Callable[[], float]]] = {
        "vtrio_jobs_running_here": ("Jobs this instance runs", lambda: len(runner.running_jobs)),
        "vtrio_connections": ("Open websocket connections", lambda: len(hub.connections)),
        "vtrio_outbox_messages": ("Messages waiting in client outboxes", lambda: hub.outbox_depth),
        "vtrio_threads_busy": ("Threads running blocking work",
                               lambda: pools.statistics().threads_busy),
        "vtrio_processes_busy": ("Worker processes running CPU work",
                                 lambda: pools.statistics().processes_busy),
        "vtrio_change_feed_lag_seconds": ("From a change's commit to its reading",
                                          lambda: feed.lag if feed else 0.0),
        "vtrio_change_feed_live": ("1 while the change stream is read, else 0",
                                   lambda: float(feed is not None and feed.live)),
    }  # fmt: skip
    for name, (documentation, read) in gauges.items():
        metrics.gauge(name, documentation, read)
    if feed is not None:
        feed.subscribe(lambda changes: metrics.changes.inc(len(changes)))


def ncbi_client(settings: Settings, http: HttpClient) -> NCBIClient:
    return NCBIClient(http, base_url=settings.ncbi_base_url, api_key=settings.ncbi_api_key)


def job_runner(settings: Settings, db: Database, pools: Executors, uploads: Uploads) -> JobRunner:
    name = runner_name(settings.data_dir)
    return JobRunner(
        db.jobs, db.samples, pools, uploads, db.changes, name=name, concurrency=settings.jobs
    )


def rpc_methods(
    db: Database,
    uploads: Uploads,
    runner: JobRunner,
    ncbi: NCBIClient,
    hub: Hub,
    *,
    started_at: float,
) -> Methods:
    """The method table: every JSON-RPC method, with the services it may use."""
    return (
        SampleMethods(db.samples, db.jobs, uploads, runner.cancel_sample).methods()
        | JobMethods(db.jobs, db.samples, runner).methods()
        | SystemMethods(
            db.jobs,
            uploads,
            ncbi,
            lambda: len(hub.connections),
            db.changes,
            instance=runner.name,
            started_at=started_at,
        ).methods()
    )


def listener(
    settings: Settings,
    hub: Hub,
    stopping: Stopping,
    db: Database,
    pages: Web,
    metrics: Metrics,
    methods: Methods,
) -> AbstractAsyncContextManager[str]:
    async def authenticate_key(key: str | None) -> object | None:
        return await authenticate(db, key)

    endpoint = RpcEndpoint(methods, metrics=metrics)
    return serve_listener(
        host=settings.host,
        port=settings.port,
        hub=hub,
        stopping=stopping,
        authenticate=authenticate_key,
        on_message=endpoint.on_message,
        on_oversized=endpoint.on_oversized,
        http=pages,
        limits=ListenerLimits(
            max_connections=settings.max_connections,
            max_handshakes=settings.max_handshakes,
            handshake_timeout=settings.handshake_timeout,
            send_buffer_size=settings.send_buffer_size,
            connection=ConnectionLimits(
                max_message_size=settings.max_message_size,
                max_parsed_size=endpoint.max_request_size,
                send_queue_size=settings.send_queue_size,
                close_timeout=settings.heartbeat_interval,
            ),
        ),
    )

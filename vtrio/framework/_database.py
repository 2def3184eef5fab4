"""Connecting to MongoDB: :func:`open_database` and the :class:`Database` it yields.

The database service owns everything vtrio does with pymongo: the client, the worker threads
that run its calls (:mod:`vtrio.framework._workers`), and the change feed that reads MongoDB's
change stream (:mod:`vtrio.framework._feed`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import pymongo
import trio
from pymongo import IndexModel, MongoClient
from pymongo.database import Database as PymongoDatabase
from pymongo.errors import PyMongoError

from vtrio.framework._changes import CollectionSpec
from vtrio.framework._collection import Collection, Shared
from vtrio.framework._db_errors import (
    DatabaseError,
    DatabaseUnavailable,
    brief,
    mask_url,
    redact,
    translate,
)
from vtrio.framework._feed import FEED_NAME, LIVE_AWAIT, ChangeFeed, open_feed
from vtrio.framework._metrics import Metrics
from vtrio.framework._services import Stopping
from vtrio.framework._workers import Workers

__all__ = ["Database", "open_database"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSE_TIMEOUT = 1.0
"""How long closing may spend telling MongoDB to end the client's sessions."""
INDEX_CONFLICTS = (85, 86)  # IndexOptionsConflict, IndexKeySpecsConflict


class Database:
    """One MongoDB database: its collections by attribute or key (``db.samples``,
    ``db["samples"]``), each a cached :class:`Collection`, and its :attr:`changes`.

    A collection missing from the declarations is a plain one: not watched, no indexes.
    """

    def __init__(
        self,
        database: PymongoDatabase,
        specs: Mapping[str, CollectionSpec],
        shared: Shared,
        changes: ChangeFeed | None,
    ) -> None:
        self._database = database
        self._specs = dict(specs)
        self._shared = shared
        self._collections: dict[str, Collection] = {}
        self.changes = changes
        """The change feed (None when opened with ``watch=False``)."""

    @property
    def name(self) -> str:
        return self._database.name

    @property
    def client(self) -> MongoClient:
        """The underlying (blocking) pymongo client: for tests only."""
        return self._database.client

    def __getitem__(self, name: str) -> Collection:
        collection = self._collections.get(name)
        if collection is None:
            spec = self._specs.get(name, CollectionSpec())
            collection = Collection(self._database[name], spec, self._shared)
            self._collections[name] = collection
        return collection

    def __getattr__(self, name: str) -> Collection:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    async def command(
        self, command: str | MutableMapping[str, Any], **kwargs: Any
    ) -> dict[str, Any]:
        """Run a database command (pymongo's arguments).

        Resource handling: a command may write, so it is never abandoned: cancelled once
        sent, it runs to its end (bounded by the timeout) and the caller then gets Cancelled.
        """
        reply: dict[str, Any] = await self._write(lambda: self._database.command(command, **kwargs))
        return reply

    async def create_collection(self, name: str, **kwargs: Any) -> Collection:
        """Create a collection (pymongo's options, e.g. ``validator=``); return it.

        Resource handling: as for :meth:`command`.
        """
        await self._write(lambda: self._database.create_collection(name, **kwargs))
        return self[name]

    async def answers(self, within: float) -> bool:
        """Whether MongoDB answers a ping within ``within`` seconds (abandoned after)."""
        with trio.move_on_after(within):
            try:
                await self._shared.workers.run(
                    self._bounded(lambda: self._database.command("ping")), abandon_on_cancel=True
                )
            except PyMongoError:
                return False
            return True
        return False

    async def list_collection_names(self) -> list[str]:
        """The names of the database's collections.

        Resource handling: abandoned at once when cancelled.
        """
        try:
            return await self._shared.workers.run(
                self._bounded(self._database.list_collection_names), abandon_on_cancel=True
            )
        except PyMongoError as exc:
            raise self._error(exc) from exc

    async def _write(self, fn: Callable[[], T]) -> T:
        try:
            result = await self._shared.workers.run(self._bounded(fn), abandon_on_cancel=False)
        except PyMongoError as exc:
            raise self._error(exc) from exc
        await trio.lowlevel.checkpoint_if_cancelled()
        return result

    def _bounded(self, fn: Callable[[], T]) -> Callable[[], T]:
        def bounded() -> T:
            with pymongo.timeout(self._shared.timeout):
                return fn()

        return bounded

    def _error(self, exc: PyMongoError) -> DatabaseError:
        shared = self._shared
        return translate(exc, collection=None, url=shared.url, timeout=shared.timeout, write=True)


@asynccontextmanager
async def open_database(
    url: str,
    name: str,
    *,
    collections: Mapping[str, CollectionSpec],
    stopping: Stopping | None = None,
    workers: int = 8,
    timeout: float = 10.0,  # noqa: ASYNC109 (pymongo's timeoutMS, not a deadline on the call)
    watch: bool = True,
    history_size: int = 10_000,
    metrics: Metrics | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> AsyncIterator[Database]:
    """Connect to the MongoDB at ``url``, check it answers, and yield its database ``name``.

    ``collections`` declares the collections: each one's indexes are created (a declared index
    replaces an existing one of the same name whose keys or options differ), and with
    ``watch`` one change stream follows them all (:attr:`Database.changes`, keeping the last
    ``history_size`` changes), which needs a replica set. ``workers`` threads run pymongo's
    calls, over as many connections. ``timeout`` (seconds) bounds the connection check and
    each operation, all its round trips included (pymongo's ``timeoutMS``).
    ``client_options`` are extra ``MongoClient`` keyword arguments (e.g. ``event_listeners``).

    Error handling: raises :class:`DatabaseUnavailable`, naming the URL with any password
    masked, if MongoDB does not answer a ``ping`` within ``timeout``, and DatabaseError if it
    is not a replica set and ``watch`` is asked for.

    Resource handling: on exit, including cancellation, the feed stops, the workers finish
    what they run and end, and the client is closed, bounded by ``stopping``'s deadline (or
    at once when it hurries); a caller still waiting for a write then gets DatabaseUnavailable.
    """
    masked = mask_url(url)
    stopping = stopping or Stopping(timeout)
    pool = Workers(workers, on_job=None if metrics is None else metrics.observe_job)
    options: dict[str, Any] = {
        "timeoutMS": round(timeout * 1000),
        "appname": "vtrio",
        # Streaming monitoring parks a thread in a server-side wait that closing does not
        # interrupt; polling leaves nothing to wait for when the process exits.
        "serverMonitoringMode": "poll",
        **(client_options or {}),
        "maxPoolSize": workers + 2,  # the workers' and a spare or two
    }
    client = await _connect(url, masked, options)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_close, client, stopping)
        hello = await _ping(client, url, timeout)
        if watch:
            _require_replica_set(hello, masked)
        pool.start()
        stack.callback(pool.stop)
        stack.callback(stopping.on_hurry(partial(pool.release_held, _ABANDONED)))
        feed = None
        if watch:
            feed_client = await _connect(url, masked, _feed_options(options, timeout))
            stack.push_async_callback(_close, feed_client, stopping)
            feed = await stack.enter_async_context(
                open_feed(feed_client[name], collections, history_size=history_size)
            )
        shared = Shared(workers=pool, timeout=timeout, url=masked, feed=feed, metrics=metrics)
        database = Database(client[name], collections, shared, feed)
        await _create_indexes(database, collections)
        yield database


def _feed_options(options: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """The change feed's client: its own, because a change stream's getMore must say how long
    it waits for news (``maxTimeMS``), which an operation timeout (``timeoutMS``) would
    overwrite with all the time it has left, and a quiet stream would then end in a timeout
    on the client's side instead of an empty batch. The socket timeout bounds every round trip.
    """
    feed_options = {key: value for key, value in options.items() if key != "timeoutMS"}
    milliseconds = round(timeout * 1000)
    return {
        **feed_options,
        "appname": FEED_NAME,
        "socketTimeoutMS": round(LIVE_AWAIT * 1000) + milliseconds,
        "connectTimeoutMS": milliseconds,
        "serverSelectionTimeoutMS": milliseconds,
        "maxPoolSize": 8,  # the live stream's, and the replays the hub runs at once
    }


_ABANDONED = DatabaseUnavailable(
    "the server stopped before MongoDB answered; the write may or may not have been applied"
)


def _require_replica_set(hello: Mapping[str, Any], url: str) -> None:
    if "setName" not in hello and hello.get("msg") != "isdbgrid":
        raise DatabaseError(
            f"MongoDB at {url} is a standalone server: vtrio needs a replica set (a single "
            "node will do) for change streams; start mongod with --replSet, or leave "
            "--mongodb-url unset for the embedded one"
        )


async def _create_indexes(database: Database, specs: Mapping[str, CollectionSpec]) -> None:
    for name, spec in specs.items():
        if spec.indexes:
            await _create_declared(database[name], spec.indexes)


async def _create_declared(collection: Collection, indexes: Sequence[IndexModel]) -> None:
    for index in indexes:
        try:
            await collection.create_indexes([index])
        except DatabaseError as exc:
            if getattr(exc.__cause__, "code", None) not in INDEX_CONFLICTS:
                raise
            # The declaration changed since the index was made: the declaration wins.
            log.warning("%s: replacing index %s", collection.name, index.document["name"])
            await collection.drop_index(index.document["name"])
            await collection.create_indexes([index])


async def _close(client: MongoClient, stopping: Stopping) -> None:
    def close() -> None:
        # close() sends endSessions first; to a server that has gone away, that would wait
        # for a whole operation timeout, and a shutdown should not.
        with pymongo.timeout(CLOSE_TIMEOUT):
            client.close()

    with stopping.shielded():
        await trio.to_thread.run_sync(close, abandon_on_cancel=True)


async def _connect(url: str, masked: str, options: Mapping[str, Any]) -> MongoClient:
    """A new client (in a thread: a ``mongodb+srv`` URL means DNS lookups)."""
    try:
        return await trio.to_thread.run_sync(
            lambda: MongoClient(url, **options), abandon_on_cancel=True
        )
    except PyMongoError as exc:
        reason = redact(brief(exc), url)
        raise DatabaseError(f"cannot use the MongoDB URL {masked}: {reason}") from exc


async def _ping(client: MongoClient, url: str, op_timeout: float) -> dict[str, Any]:
    """Check that MongoDB answers; its ``hello``. Abandoned at once when cancelled."""

    def hello() -> dict[str, Any]:
        with pymongo.timeout(op_timeout):
            reply: dict[str, Any] = client.admin.command("hello")
            return reply

    try:
        return await trio.to_thread.run_sync(hello, abandon_on_cancel=True)
    except PyMongoError as exc:
        raise DatabaseUnavailable(
            f"cannot reach MongoDB at {mask_url(url)} within {op_timeout:g} s "
            f"({redact(brief(exc), url)}); "
            "check that MongoDB is running and that the URL is right"
        ) from exc

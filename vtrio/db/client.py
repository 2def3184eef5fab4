"""Connecting to MongoDB: :func:`open_database` and the :class:`Database` it yields."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pymongo
import trio
from pymongo import MongoClient
from pymongo.database import Database as PymongoDatabase
from pymongo.errors import PyMongoError

from vtrio.db.collection import Collection, Shared
from vtrio.db.collections import COLLECTIONS
from vtrio.db.errors import (
    DatabaseError,
    DatabaseUnavailable,
    brief,
    mask_url,
    redact,
    translate,
)
from vtrio.db.spec import CollectionSpec, Dispatch
from vtrio.db.threads import run_read, run_write


class Database:
    """One MongoDB database: its collections by attribute or key (``db.samples``,
    ``db["samples"]``), each a cached :class:`~vtrio.db.collection.Collection`.

    A collection missing from the specs dispatches whole documents and is not silent.
    """

    def __init__(
        self, database: PymongoDatabase, specs: Mapping[str, CollectionSpec], shared: Shared
    ) -> None:
        self._database = database
        self._specs = dict(specs)
        self._shared = shared
        self._collections: dict[str, Collection] = {}

    @property
    def name(self) -> str:
        return self._database.name

    @property
    def pymongo(self) -> PymongoDatabase:
        """The underlying (blocking) pymongo database: for tests and migrations only."""
        return self._database

    @property
    def client(self) -> MongoClient:
        """The underlying (blocking) pymongo client: for tests only."""
        return self._database.client

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """The limiter of pymongo's threads, sized to the connection pool."""
        return self._shared.limiter

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

    async def command(self, command: str | Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Run a database command (pymongo's arguments); dispatches nothing.

        A command may write, so it is never abandoned: cancelled once sent, it runs to its end
        (bounded by the timeout) and the caller then gets ``Cancelled``.
        """
        try:
            reply = await self._run(partial(self._database.command, command, **kwargs))
        except PyMongoError as exc:
            raise self._error(exc) from exc
        await trio.lowlevel.checkpoint_if_cancelled()
        return reply

    async def create_collection(self, name: str, **kwargs: Any) -> Collection:
        """Create a collection (pymongo's options, e.g. ``validator=``); return it.

        Cancellation as for :meth:`command`.
        """
        try:
            await self._run(partial(self._database.create_collection, name, **kwargs))
        except PyMongoError as exc:
            raise self._error(exc) from exc
        await trio.lowlevel.checkpoint_if_cancelled()
        return self[name]

    async def list_collection_names(self) -> list[str]:
        """The names of the database's collections. Abandoned at once when cancelled."""
        try:
            return await run_read(
                self._database.list_collection_names, self._shared.limiter, self._shared.timeout
            )
        except PyMongoError as exc:
            raise self._error(exc) from exc

    async def _run(self, fn: Any) -> Any:
        return await run_write(fn, self._shared.limiter, self._shared.timeout)

    def _error(self, exc: PyMongoError) -> DatabaseError:
        shared = self._shared
        return translate(exc, collection=None, url=shared.url, timeout=shared.timeout, write=True)


@asynccontextmanager
async def open_database(
    url: str,
    name: str,
    *,
    dispatch: Dispatch,
    pool_size: int = 32,
    timeout: float = 10.0,  # noqa: ASYNC109 (pymongo's timeoutMS, not a deadline on the call)
    collections: Mapping[str, CollectionSpec] | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> AsyncIterator[Database]:
    """Connect to the MongoDB at ``url``, check it answers, and yield its database ``name``.

    ``pool_size`` is pymongo's ``maxPoolSize`` and the number of threads running pymongo calls
    at once. ``timeout`` (seconds) bounds the connection check and each operation, all its round
    trips included (pymongo's ``timeoutMS``). ``collections`` says how each collection
    dispatches (default: :data:`vtrio.db.collections.COLLECTIONS`). ``client_options`` are
    extra ``MongoClient`` keyword arguments (e.g. ``event_listeners``).

    Raises :class:`DatabaseUnavailable`, naming the URL with any password masked, if MongoDB
    does not answer a ``ping`` within ``timeout``. On exit, including cancellation, the client is
    closed; threads of abandoned reads still running then end with an error nobody sees.
    """
    masked = mask_url(url)
    limiter = trio.CapacityLimiter(pool_size)
    options: dict[str, Any] = {
        "timeoutMS": round(timeout * 1000),
        "appname": "vtrio",
        # Streaming monitoring parks a thread in a server-side wait that closing does not
        # interrupt; polling leaves nothing to wait for when the process exits.
        "serverMonitoringMode": "poll",
        **(client_options or {}),
        "maxPoolSize": pool_size,  # always the limiter's size
    }
    client = await _connect(url, masked, options, limiter)
    try:
        await _ping(client, url, limiter, timeout)
        shared = Shared(dispatch=dispatch, limiter=limiter, timeout=timeout, url=masked)
        specs = COLLECTIONS if collections is None else collections
        yield Database(client[name], specs, shared)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close, client)


# pymongo's monitor threads look for their stop flag every MIN_HEARTBEAT_INTERVAL (0.5 s), and
# pymongo joins them when the interpreter exits: every process of ours took half a second to
# exit after all else had stopped. Looking ten times as often costs nothing measurable; the
# price is that a server that is down may be probed up to 20 times a second instead of 2 while
# operations keep asking for it. (This is process-wide: it applies to every MongoClient.)
pymongo.common.MIN_HEARTBEAT_INTERVAL = 0.05

CLOSE_TIMEOUT = 1.0
"""How long closing may spend telling MongoDB to end the client's sessions."""


def _close(client: MongoClient) -> None:
    # close() sends endSessions first; to a server that has gone away, that would wait for
    # a whole operation timeout, and a shutdown should not.
    with pymongo.timeout(CLOSE_TIMEOUT):
        client.close()


async def _connect(
    url: str, masked: str, options: Mapping[str, Any], limiter: trio.CapacityLimiter
) -> MongoClient:
    """A new client (in a thread: a ``mongodb+srv`` URL means DNS lookups)."""
    try:
        return await trio.to_thread.run_sync(partial(MongoClient, url, **options), limiter=limiter)
    except PyMongoError as exc:
        reason = redact(brief(exc), url)
        raise DatabaseError(f"cannot use the MongoDB URL {masked}: {reason}") from exc


async def _ping(
    client: MongoClient, url: str, limiter: trio.CapacityLimiter, op_timeout: float
) -> None:
    """Check that MongoDB answers; abandoned at once when cancelled."""
    masked = mask_url(url)
    try:
        await run_read(partial(client.admin.command, "ping"), limiter, op_timeout)
    except PyMongoError as exc:
        raise DatabaseUnavailable(
            f"cannot reach MongoDB at {masked} within {op_timeout:g} s "
            f"({redact(brief(exc), url)}); "
            "check that MongoDB is running and that the URL is right"
        ) from exc

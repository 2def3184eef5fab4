"""A MongoDB collection, asynchronous: pymongo in worker threads, writes fenced by the feed.

Every call runs in a worker thread (:mod:`vtrio.framework._workers`), inside one ``timeoutMS``
deadline for all its round trips. Concurrent ``find_one`` calls by ``_id`` and concurrent
``insert_one`` calls are coalesced into one command each when the threads are busy.

A write's change reaches clients through the change feed, whoever made it; a write through
this layer waits, before it returns, until this instance's feed has read past it (the write
*fence*), so that a client's own response never overtakes the change message its request
caused. If the feed is behind by more than the timeout, the write returns anyway (the message
follows) and the lag is logged.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import outcome
import pymongo
import trio
from bson import Timestamp
from pymongo import IndexModel, ReturnDocument, UpdateOne
from pymongo.client_session import ClientSession
from pymongo.collection import Collection as PymongoCollection
from pymongo.common import validate_ok_for_replace, validate_ok_for_update
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError
from pymongo.read_concern import ReadConcern

from vtrio.framework._changes import CollectionSpec
from vtrio.framework._db_errors import DatabaseError, translate
from vtrio.framework._documents import (
    Document,
    Projection,
    check_simple,
    id_key,
    inclusion,
    project,
)
from vtrio.framework._feed import ChangeFeed
from vtrio.framework._metrics import Metrics
from vtrio.framework._workers import Workers

__all__ = ["Collection", "UpdateManyResult"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Filter = Mapping[str, Any]


@dataclass(frozen=True)
class Shared:
    """What every collection of one database shares."""

    workers: Workers
    timeout: float
    url: str  # masked
    feed: ChangeFeed | None  # None: no feed (an admin command), nothing to wait for
    metrics: Metrics | None = None


P = ParamSpec("P")
R = TypeVar("R")


def _measured(
    operation: str,
) -> Callable[[Callable[Concatenate[Collection, P], Awaitable[R]]],
              Callable[Concatenate[Collection, P], Awaitable[R]]]:  # fmt: skip
    """Count and time a collection method as the metrics' ``operation``."""

    def measure(
        method: Callable[Concatenate[Collection, P], Awaitable[R]],
    ) -> Callable[Concatenate[Collection, P], Awaitable[R]]:
        @functools.wraps(method)
        async def measured(self: Collection, *args: P.args, **kwargs: P.kwargs) -> R:
            metrics = self._shared.metrics
            if metrics is None:
                return await method(self, *args, **kwargs)
            started = time.perf_counter()
            try:
                return await method(self, *args, **kwargs)
            except DatabaseError:
                metrics.mongodb_errors.labels(operation).inc()
                raise
            finally:
                metrics.mongodb_seconds.labels(operation).observe(time.perf_counter() - started)

        return measured

    return measure


@dataclass(frozen=True)
class UpdateManyResult:
    """What :meth:`Collection.update_many` did."""

    matched_count: int
    modified_count: int
    upserted_id: Any | None = None


@dataclass
class _Written(Generic[T]):
    """A write's outcome in its thread: the caller's result, and its operation time if it
    changed anything (None if it did not: nothing to wait for)."""

    result: T
    operation_time: Timestamp | None
    in_feed: bool = False
    """The result is not here: it is the document as the feed will have it after the fence."""


class Collection:
    """A collection with async methods (module docstring). Made by :class:`Database`."""

    def __init__(self, collection: PymongoCollection, spec: CollectionSpec, shared: Shared) -> None:
        self._collection = collection
        self._shared = shared
        self.spec = spec
        self._projection = None if spec.projection is None else inclusion(spec.projection)

    @property
    def name(self) -> str:
        """The collection's name: the ``interface`` of its messages."""
        return self._collection.name

    def __repr__(self) -> str:
        return f"<Collection {self.name!r} {self.spec}>"

    # ---- reads ----------------------------------------------------------------------------
    #
    # Resource handling, for every read: cancelled before a worker takes it, it never runs;
    # cancelled while it runs, the caller returns at once and the result is dropped.
    # Error handling: pymongo's failures come out as DatabaseError subclasses.

    @_measured("find")
    async def find(
        self,
        filter: Filter | None = None,
        projection: Projection | None = None,
        *,
        sort: Any = None,
        skip: int = 0,
        limit: int = 0,
    ) -> list[Document]:
        """The matching documents, as a list (``limit=0``: all of them)."""
        return await self._read(
            lambda: list(
                self._collection.find(filter or {}, projection, sort=sort, skip=skip, limit=limit)
            )
        )

    @_measured("find_one")
    async def find_one(
        self,
        filter: Filter | None = None,
        projection: Projection | None = None,
        *,
        sort: Any = None,
    ) -> Document | None:
        """The first matching document, or None. Calls by ``_id`` alone are coalesced."""
        key = _by_id(filter) if sort is None else None
        if key is not None:
            return await self._find_by_id(key, projection)
        return await self._read(
            lambda: self._collection.find_one(filter or {}, projection, sort=sort)
        )

    @_measured("count_documents")
    async def count_documents(self, filter: Filter | None = None) -> int:
        """How many documents match."""
        return await self._read(lambda: self._collection.count_documents(filter or {}))

    @_measured("distinct")
    async def distinct(self, key: str, filter: Filter | None = None) -> list[Any]:
        """The distinct values of ``key`` among the matching documents."""
        return await self._read(lambda: self._collection.distinct(key, filter or {}))

    @_measured("aggregate")
    async def aggregate(self, pipeline: Sequence[Mapping[str, Any]]) -> list[Document]:
        """The pipeline's result, as a list. Stages that write (``$out``, ``$merge``) are
        abandoned like any read when cancelled: avoid them here."""
        return await self._read(lambda: list(self._collection.aggregate(list(pipeline))))

    # Index management is idempotent: abandoned on cancellation like a read.

    @_measured("create_index")
    async def create_index(self, keys: Any, **kwargs: Any) -> str:
        """Create an index (pymongo's arguments); return its name."""
        return await self._read(lambda: self._collection.create_index(keys, **kwargs))

    @_measured("create_indexes")
    async def create_indexes(self, indexes: Sequence[IndexModel]) -> list[str]:
        """Create several indexes in one command; return their names."""
        return await self._read(lambda: self._collection.create_indexes(list(indexes)))

    @_measured("drop_index")
    async def drop_index(self, index: Any) -> None:
        """Drop an index, given by name or by its keys."""
        await self._read(lambda: self._collection.drop_index(index))

    @_measured("index_information")
    async def index_information(self) -> dict[str, Any]:
        """The collection's indexes, by name."""
        return await self._read(lambda: dict(self._collection.index_information()))

    # ---- writes ---------------------------------------------------------------------------
    #
    # Resource handling, for every write: cancelled before a worker takes it, nothing is
    # written and Cancelled is raised. Cancelled once it has been sent, the write runs to its
    # end (bounded by the timeout), and then the caller gets Cancelled (its change is
    # dispatched by the feed either way).
    # Error handling: a refused write raises a DatabaseError subclass (DuplicateKey,
    # DocumentInvalid) and changed nothing; a timeout or a lost connection raises
    # DatabaseUnavailable, and the write may or may not have been applied.

    @_measured("insert_one")
    async def insert_one(self, document: Mapping[str, Any]) -> Document:
        """Insert a copy of ``document``; return the copy, with its ``_id``. Concurrent calls
        are coalesced into one ``insert`` (unordered: a duplicate key fails its call only)."""
        doc = dict(document)  # pymongo gives it an _id if it has none
        written: _Written[Document] = await self._shared.workers.join(
            ("insert", self.name), doc, self._insert_all, abandon_on_cancel=False
        )
        return await self._fenced(written)

    @_measured("insert_many")
    async def insert_many(self, documents: Sequence[Mapping[str, Any]]) -> list[Document]:
        """Insert copies of ``documents`` in order; return the copies, with their ``_id``.

        1 round trip per 48 MB or 100,000 documents (pymongo's batches). Should one fail (a
        duplicate key, say), the ones before it stay inserted, the rest are not inserted, and
        the error is raised.
        """
        docs = [dict(document) for document in documents]
        if not docs:
            return []

        def write(session: ClientSession) -> _Written[list[Document]]:
            self._collection.insert_many(docs, ordered=True, session=session)
            return _Written(docs, session.operation_time)

        return await self._write(write)

    @_measured("find_one_and_update")
    async def find_one_and_update(
        self,
        filter: Filter,
        update: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        projection: Projection | None = None,
        sort: Any = None,
        upsert: bool = False,
    ) -> Document | None:
        """Update the first matching document (in ``sort`` order, e.g. ``[("created_at", 1)]``);
        return it after the update (``projection`` applied), or None. 1 round trip.

        Concurrent calls that pin one ``_id``, only ``$set`` or ``$unset`` fields, and change
        none of the fields their filter tests, are coalesced into one bulk update. When each
        of them changed its document (1 round trip for the lot), each caller gets its document
        from the change feed, as its change or a later one left it, once the fence has passed;
        one the feed no longer holds is read. Otherwise one read-back follows (2 round trips):
        each caller then gets its document as it is after the bulk update (which includes the
        changes of any others made to it meanwhile).
        When some of the lot matched nothing, the reply does not say which: those are asked
        again one by one (harmless, as setting a field to its value changes nothing; a
        document whose filter fields another writer changed in that instant may then be told
        as not matched).
        """
        validate_ok_for_update(update)
        check_simple(projection)
        pinned = _pinned_id(filter)
        if pinned is not None and sort is None and not upsert and _coalescible(filter, update):
            with self._keeping(pinned):
                written: _Written[Document | None] = await self._shared.workers.join(
                    ("update", self.name), (filter, update, pinned), self._update_all,
                    abandon_on_cancel=False,
                )  # fmt: skip
                doc = await self._fenced_document(written, pinned)
            return None if doc is None else project(doc, projection)

        def write(session: ClientSession) -> _Written[Document | None]:
            doc = self._collection.find_one_and_update(
                filter, update, projection=projection, sort=sort, upsert=upsert,
                return_document=ReturnDocument.AFTER, session=session,
            )  # fmt: skip
            return _Written(doc, session.operation_time if doc is not None else None)

        return await self._write(write)

    @_measured("update_one")
    async def update_one(
        self,
        filter: Filter,
        update: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        upsert: bool = False,
    ) -> Document | None:
        """Update the first matching document; return it after the update, projected by the
        collection's projection (with ``_id``), or None if nothing matched. 1 round trip."""
        return await self.find_one_and_update(
            filter, update, projection=self._projection, upsert=upsert
        )

    @_measured("replace_one")
    async def replace_one(
        self, filter: Filter, replacement: Mapping[str, Any], *, upsert: bool = False
    ) -> Document | None:
        """Replace the first matching document; return the new one, projected like
        :meth:`update_one`, or None if nothing matched. 1 round trip."""
        validate_ok_for_replace(replacement)

        def write(session: ClientSession) -> _Written[Document | None]:
            doc = self._collection.find_one_and_replace(
                filter, replacement, projection=self._projection, upsert=upsert,
                return_document=ReturnDocument.AFTER, session=session,
            )  # fmt: skip
            return _Written(doc, session.operation_time if doc is not None else None)

        return await self._write(write)

    @_measured("update_many")
    async def update_many(
        self,
        filter: Filter,
        update: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        upsert: bool = False,
    ) -> UpdateManyResult:
        """Update every matching document. 1 round trip, whatever their number."""
        validate_ok_for_update(update)

        def write(session: ClientSession) -> _Written[UpdateManyResult]:
            result = self._collection.update_many(filter, update, upsert=upsert, session=session)
            changed = result.modified_count or result.upserted_id is not None
            summary = UpdateManyResult(
                result.matched_count, result.modified_count, result.upserted_id
            )
            return _Written(summary, session.operation_time if changed else None)

        return await self._write(write)

    @_measured("delete_one")
    async def delete_one(self, filter: Filter) -> Any | None:
        """Delete the first matching document; return its id, or None. 1 round trip."""

        def write(session: ClientSession) -> _Written[Any | None]:
            doc = self._collection.find_one_and_delete(
                filter, projection={"_id": True}, session=session
            )
            if doc is None:
                return _Written(None, None)
            return _Written(doc["_id"], session.operation_time)

        return await self._write(write)

    @_measured("delete_many")
    async def delete_many(self, filter: Filter) -> int:
        """Delete every matching document; return how many. 1 round trip."""

        def write(session: ClientSession) -> _Written[int]:
            deleted = self._collection.delete_many(filter, session=session).deleted_count
            return _Written(deleted, session.operation_time if deleted else None)

        return await self._write(write)

    # ---- the thread side --------------------------------------------------------------------

    def _insert_all(self, docs: list[Document]) -> list[outcome.Outcome[_Written[Document]]]:
        """One coalesced ``insert`` for every caller of a job: each gets its own outcome."""
        failed: dict[int, DatabaseError] = {}
        try:
            with self._session() as session:
                try:
                    self._collection.insert_many(docs, ordered=False, session=session)
                except BulkWriteError as exc:
                    if exc.details.get("writeConcernErrors"):
                        raise  # every insert of the command is in doubt
                    failed = self._failed_writes(exc)
                operation_time = session.operation_time
        except PyMongoError as exc:
            error = self._error(exc, write=True)
            return [outcome.Error(error) for _ in docs]
        return [
            outcome.Error(failed[index]) if index in failed
            else outcome.Value(_Written(doc, operation_time))
            for index, doc in enumerate(docs)
        ]  # fmt: skip

    def _update_all(
        self, items: list[tuple[Filter, Any, Any]]
    ) -> list[outcome.Outcome[_Written[Document | None]]]:
        """One coalesced update for every caller of a job (see :meth:`find_one_and_update`)."""
        try:
            with self._session() as session:
                if len(items) == 1:  # nothing to coalesce: one round trip, as ever
                    return [outcome.Value(self._update_each(items[0], session))]
                requests = [UpdateOne(filter, update) for filter, update, _ in items]
                failed: dict[int, DatabaseError] = {}
                try:
                    result = self._collection.bulk_write(requests, ordered=False, session=session)
                    matched, modified = result.matched_count, result.modified_count
                except BulkWriteError as exc:
                    if exc.details.get("writeConcernErrors"):
                        raise  # every update of the command is in doubt
                    failed = self._failed_writes(exc)
                    matched = exc.details.get("nMatched", 0)
                    modified = exc.details.get("nModified", 0)
                if modified == len(items) and self._shared.feed is not None:
                    # Each one changed its document (so none failed): the feed will have each
                    # as it left it.
                    written: _Written[Document | None] = _Written(
                        None, session.operation_time, in_feed=True
                    )
                    return [outcome.Value(written) for _ in items]
                if matched == len(items) - len(failed):
                    return self._read_back(items, failed, session)
                return [
                    outcome.Error(failed[index]) if index in failed
                    else outcome.Value(self._update_each(item, session))
                    for index, item in enumerate(items)
                ]  # fmt: skip
        except PyMongoError as exc:
            error = self._error(exc, write=True)
            return [outcome.Error(error) for _ in items]

    def _update_each(self, item: tuple[Filter, Any, Any], session: ClientSession) -> _Written[Any]:
        filter, update, _ = item
        doc = self._collection.find_one_and_update(
            filter, update, return_document=ReturnDocument.AFTER, session=session
        )
        return _Written(doc, session.operation_time if doc is not None else None)

    def _read_back(
        self,
        items: list[tuple[Filter, Any, Any]],
        failed: dict[int, DatabaseError],
        session: ClientSession,
    ) -> list[outcome.Outcome[_Written[Document | None]]]:
        """After a bulk update that matched every statement: each caller's document.

        Read at the majority-committed point, whose time the reply gives as its operation
        time: the documents then show no write, from anywhere, later than that time, so the
        fence on it covers every change they show. (A local read may show a write that is
        still committing, at a time past the one its reply gives.)"""
        ids = list({id_key(id_): id_ for _, _, id_ in items}.values())
        committed = self._collection.with_options(read_concern=_MAJORITY)
        docs = committed.find({"_id": {"$in": ids}}, limit=len(ids), session=session)
        found = {id_key(doc["_id"]): doc for doc in docs}
        operation_time = session.operation_time
        answers: list[outcome.Outcome[_Written[Document | None]]] = []
        for index, (_, _, id_) in enumerate(items):
            if index in failed:
                answers.append(outcome.Error(failed[index]))
            else:
                doc = found.get(id_key(id_))  # gone already: deleted in this instant
                answers.append(outcome.Value(_Written(dict(doc) if doc else None, operation_time)))
        return answers

    def _failed_writes(self, exc: BulkWriteError) -> dict[int, DatabaseError]:
        """The callers a bulk write failed, by index, each with its own statement's error."""
        failed = {}
        for failure in exc.details.get("writeErrors", []):
            cause = OperationFailure(failure.get("errmsg", ""), failure.get("code"), failure)
            error = self._error(cause, write=True)
            error.__cause__ = cause
            failed[failure["index"]] = error
        return failed

    @contextmanager
    def _session(self) -> Iterator[ClientSession]:
        """A session for one write, under one deadline: its operation time fences the write."""
        client = self._collection.database.client
        with (
            pymongo.timeout(self._shared.timeout),
            client.start_session(causal_consistency=False) as session,
        ):
            yield session

    def _find_by_ids(
        self, projection: Projection | None, ids: list[Any]
    ) -> list[outcome.Outcome[Document | None]]:
        try:
            with pymongo.timeout(self._shared.timeout):
                if len(ids) == 1:
                    doc = self._collection.find_one({"_id": ids[0]}, projection)
                    found = {} if doc is None else {id_key(ids[0]): doc}
                else:
                    # The limit makes it one round trip: without one, the cursor stays open
                    # and pymongo sends an empty getMore after the batch (5x slower).
                    unique = list({id_key(id_): id_ for id_ in ids}.values())
                    docs = self._collection.find(
                        {"_id": {"$in": unique}}, projection, limit=len(unique)
                    )
                    found = {id_key(doc["_id"]): doc for doc in docs}
        except PyMongoError as exc:
            error = self._error(exc, write=False)
            return [outcome.Error(error) for _ in ids]
        answers: list[outcome.Outcome[Document | None]] = []
        given: set[Hashable] = set()
        for id_ in ids:
            doc = found.get(key := id_key(id_))
            answers.append(outcome.Value(dict(doc) if doc is not None and key in given else doc))
            given.add(key)
        return answers

    # ---- the trio side ----------------------------------------------------------------------

    async def _find_by_id(self, id_: Any, projection: Projection | None) -> Document | None:
        def run(ids: list[Any]) -> list[outcome.Outcome[Document | None]]:
            return self._find_by_ids(projection, ids)

        key = ("find_one", self.name, _projection_key(projection))
        document: Document | None = await self._shared.workers.join(
            key, id_, run, abandon_on_cancel=True
        )
        return document

    async def _read(self, fn: Callable[[], T]) -> T:
        def bounded() -> T:
            with pymongo.timeout(self._shared.timeout):
                return fn()

        try:
            return await self._shared.workers.run(bounded, abandon_on_cancel=True)
        except PyMongoError as exc:
            raise self._error(exc, write=False) from exc

    async def _write(self, fn: Callable[[ClientSession], _Written[T]]) -> T:
        def write() -> _Written[T]:
            with self._session() as session:
                return fn(session)

        try:
            written = await self._shared.workers.run(write, abandon_on_cancel=False)
        except PyMongoError as exc:
            raise self._error(exc, write=True) from exc
        return await self._fenced(written)

    async def _fenced(self, written: _Written[T]) -> T:
        """The write's result, once the feed has read past it (module docstring)."""
        await self._fence(written)
        return written.result

    async def _fenced_document(
        self, written: _Written[Document | None], id_: Any
    ) -> Document | None:
        """A coalesced update's document, once the feed has read past it: from the feed when
        the write left it there, else read (the feed was behind, or no longer has it)."""
        passed = await self._fence(written)
        if not written.in_feed:
            return written.result
        feed = self._shared.feed
        doc = feed.document(self.name, id_) if passed and feed is not None else None
        return doc if doc is not None else await self._find_by_id(id_, None)

    def _keeping(self, id_: Any) -> AbstractContextManager[None]:
        """While inside, the feed keeps document ``id_`` as changes leave it."""
        feed = self._shared.feed
        return nullcontext() if feed is None else feed.keeping(self.name, id_)

    async def _fence(self, written: _Written[Any]) -> bool:
        """Wait for the feed to read past the write, if it changed anything; false if the
        feed was that far behind (the changes come later).

        Cancellation: raises Cancelled after the wait if cancelled while the write ran."""
        feed, passed = self._shared.feed, True
        if feed is not None and written.operation_time is not None:
            started = time.perf_counter()
            passed = await feed.wait_past(written.operation_time, self._shared.timeout)
            if self._shared.metrics is not None:
                self._shared.metrics.write_fence_seconds.observe(time.perf_counter() - started)
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancel while the write ran: now
        return passed

    def _error(self, exc: PyMongoError, *, write: bool) -> DatabaseError:
        shared = self._shared
        return translate(
            exc, collection=self.name, url=shared.url, timeout=shared.timeout, write=write
        )


def _by_id(filter: Filter | None) -> Any | None:
    """The id of a filter that names one document by ``_id`` alone, if it is one."""
    if filter is None or len(filter) != 1 or "_id" not in filter:
        return None
    value = filter["_id"]
    return None if isinstance(value, Mapping) or value is None else value


def _pinned_id(filter: Filter) -> Any | None:
    """The ``_id`` a filter pins, alone or among ``$and`` conditions; None if it pins none."""
    value = _by_id(filter)
    if value is not None:
        return value
    conditions = filter.get("$and") if len(filter) == 1 else None
    if isinstance(conditions, list):
        for condition in conditions:
            if isinstance(condition, Mapping) and (value := _by_id(condition)) is not None:
                return value
    return None


_IDEMPOTENT = frozenset({"$set", "$unset"})


def _coalescible(filter: Filter, update: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``update`` may go in a bulk update (see Collection.find_one_and_update): applying
    it twice does what applying it once does, and it changes no field ``filter`` tests."""
    if not isinstance(update, Mapping) or not update or not update.keys() <= _IDEMPOTENT:
        return False
    changed = {field.split(".")[0] for fields in update.values() for field in fields}
    return not changed & _tested_fields(filter)


def _tested_fields(filter: Any) -> set[str]:
    """The top-level fields a filter's conditions name (through ``$and``, ``$or``, ...)."""
    if isinstance(filter, list):
        return set().union(*map(_tested_fields, filter))
    if not isinstance(filter, Mapping):
        return set()
    fields: set[str] = set()
    for key, value in filter.items():
        if key.startswith("$"):
            fields |= _tested_fields(value)
        else:
            fields.add(key.split(".")[0])
    return fields


def _projection_key(projection: Projection | None) -> Hashable:
    if projection is None:
        return None
    if isinstance(projection, Mapping):
        return tuple(sorted(projection.items()))
    return tuple(projection)


_MAJORITY = ReadConcern("majority")

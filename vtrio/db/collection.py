"""A MongoDB collection whose writes dispatch their changes once MongoDB has acknowledged them.

Every pymongo call runs in a worker thread (:mod:`vtrio.db.threads`), so the event loop never
blocks. All the round trips of one write run in ONE thread call, inside one ``timeoutMS``
deadline.

Dispatching: the moment a write's acknowledgement reaches its thread, the thread queues its
messages for ``dispatch(collection name, operation, data, subject)`` on the event loop, in a
queue trio runs first in, first out, and ahead of the calling task's own wake-up: so messages
leave in acknowledgement order (tasks woken together run in no set order), and before the call
returns. ``data`` is the document projected by the collection's
:class:`~vtrio.db.spec.CollectionSpec` with ``_id`` renamed ``id`` (insert, update), or the list of
removed ids (delete). ``silent=True``, or a silent collection, dispatches nothing. A write that
fails raises a :class:`~vtrio.db.errors.DatabaseError` and dispatches nothing (but see
:meth:`Collection.insert_many`).

Cancellation, for every write method: cancelled before the write is sent (while waiting for a
free thread), nothing is written and ``Cancelled`` is raised. Cancelled once it has been sent, the
write runs to its end (bounded by the timeout), its messages are dispatched, and then the caller
gets ``Cancelled``. Reads, and index management, return at once when cancelled: their thread is
abandoned and keeps its limiter token until it ends, at the latest at the timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import bson
import trio
from pymongo import IndexModel, ReturnDocument
from pymongo.collection import Collection as PymongoCollection
from pymongo.common import validate_ok_for_replace, validate_ok_for_update
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from vtrio.db.documents import (
    Document,
    Projection,
    check_simple,
    covering,
    inclusion,
    message_data,
    project,
)
from vtrio.db.errors import DatabaseError, translate
from vtrio.db.spec import CollectionSpec, Dispatch
from vtrio.db.threads import run_read, run_write

log = logging.getLogger(__name__)

T = TypeVar("T")
Filter = Mapping[str, Any]


class Message(NamedTuple):
    """One change message: what it carries, and what access rules judge it by."""

    operation: str
    data: Any
    subject: Any


IDS_PER_COMMAND = 20_000
"""Ids per ``$in`` list: keeps each command far below MongoDB's 16 MB document limit."""

_ONE_BATCH = 2**31 - 1  # a cursor's whole result in one reply (up to 16 MB)


@dataclass(frozen=True)
class Shared:
    """What every collection of one database shares."""

    dispatch: Dispatch
    limiter: trio.CapacityLimiter
    timeout: float
    url: str  # masked


@dataclass(frozen=True)
class UpdateManyResult:
    """What :meth:`Collection.update_many` did.

    ``ids`` are the documents this call selected (and updated, unless they stopped matching in
    the meantime) or, for an upsert, the one it inserted or updated.
    """

    matched_count: int
    modified_count: int
    ids: list[Any]
    upserted_id: Any | None = None


@dataclass
class _Written(Generic[T]):
    """A write's outcome in its thread: the caller's result, the messages, a partial failure."""

    result: T
    messages: list[Message] = field(default_factory=list)
    error: PyMongoError | None = None


class Collection:
    """A pymongo collection with async methods; writes dispatch their changes (module doc)."""

    def __init__(self, collection: PymongoCollection, spec: CollectionSpec, shared: Shared) -> None:
        self._collection = collection
        self._shared = shared
        self.spec = spec
        self._server_projection = None if spec.projection is None else inclusion(spec.projection)

    @property
    def name(self) -> str:
        """The collection's name: the ``interface`` of its messages."""
        return self._collection.name

    @property
    def pymongo(self) -> PymongoCollection:
        """The underlying (blocking) pymongo collection: for tests and migrations only."""
        return self._collection

    def __repr__(self) -> str:
        return f"<Collection {self.name!r} {self.spec}>"

    # ---- reads: one thread call each, abandoned on cancellation --------------------------

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

    async def find_one(
        self,
        filter: Filter | None = None,
        projection: Projection | None = None,
        *,
        sort: Any = None,
    ) -> Document | None:
        """The first matching document, or None."""
        return await self._read(
            lambda: self._collection.find_one(filter or {}, projection, sort=sort)
        )

    async def count_documents(self, filter: Filter | None = None) -> int:
        """How many documents match."""
        return await self._read(lambda: self._collection.count_documents(filter or {}))

    async def distinct(self, key: str, filter: Filter | None = None) -> list[Any]:
        """The distinct values of ``key`` among the matching documents."""
        return await self._read(lambda: self._collection.distinct(key, filter or {}))

    async def aggregate(self, pipeline: Sequence[Mapping[str, Any]]) -> list[Document]:
        """The pipeline's result, as a list. Stages that write (``$out``, ``$merge``) dispatch
        nothing, and are abandoned like any read when cancelled."""
        return await self._read(lambda: list(self._collection.aggregate(list(pipeline))))

    # ---- index management: idempotent, so abandoned on cancellation like reads ----------

    async def create_index(self, keys: Any, **kwargs: Any) -> str:
        """Create an index (pymongo's arguments); return its name."""
        return await self._read(lambda: self._collection.create_index(keys, **kwargs))

    async def create_indexes(self, indexes: Sequence[IndexModel]) -> list[str]:
        """Create several indexes in one command; return their names."""
        return await self._read(lambda: self._collection.create_indexes(list(indexes)))

    async def drop_index(self, index: Any) -> None:
        """Drop an index, given by name or by its keys."""
        await self._read(lambda: self._collection.drop_index(index))

    async def index_information(self) -> dict[str, Any]:
        """The collection's indexes, by name."""
        return await self._read(lambda: dict(self._collection.index_information()))

    # ---- writes: one thread call each, run to the end even when cancelled ----------------

    async def insert_one(self, document: Mapping[str, Any], *, silent: bool = False) -> Document:
        """Insert a copy of ``document``; return the copy, with its ``_id``. 1 round trip.

        Dispatches ``insert``. On cancellation: see the module docstring.
        """
        doc = dict(document)
        send = self._sends(silent)

        def write() -> _Written[Document]:
            self._collection.insert_one(doc)
            return _Written(doc, [self._message("insert", doc)] if send else [])

        return await self._write(write)

    async def insert_many(
        self, documents: Sequence[Mapping[str, Any]], *, silent: bool = False
    ) -> list[Document]:
        """Insert copies of ``documents`` in order; return the copies, with their ``_id``.

        1 round trip per 48 MB or 100,000 documents (pymongo's batches). Dispatches one ``insert``
        per document. Should one fail (e.g. a duplicate key), the ones before it stay inserted
        and are dispatched, the rest are not inserted, and the error is raised.
        On cancellation: see the module docstring.
        """
        docs = [dict(document) for document in documents]
        if not docs:
            return []
        send = self._sends(silent)

        def write() -> _Written[list[Document]]:
            try:
                self._collection.insert_many(docs, ordered=True)
            except BulkWriteError as exc:
                inserted = docs[: exc.details.get("nInserted", 0)]
                messages = [self._message("insert", doc) for doc in inserted] if send else []
                return _Written(inserted, messages, exc)
            return _Written(docs, [self._message("insert", doc) for doc in docs] if send else [])

        return await self._write(write)

    async def find_one_and_update(
        self,
        filter: Filter,
        update: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        projection: Projection | None = None,
        sort: Any = None,
        upsert: bool = False,
        silent: bool = False,
    ) -> Document | None:
        """Update the first matching document (in ``sort`` order, e.g. ``[("created_at", 1)]``);
        return it after the update, or None.

        1 round trip. ``projection`` (top-level fields only) shapes the returned document, not
        the message. Dispatches ``update``, or ``insert`` if the upsert inserted.
        On cancellation: see the module docstring.
        """
        validate_ok_for_update(update)
        check_simple(projection)
        send = self._sends(silent)
        server = covering(self.spec.projection, projection)

        def write() -> _Written[Document | None]:
            doc, inserted = self._modify(
                filter, update, server, upsert=upsert, replace=False, sort=sort
            )
            if doc is None:
                return _Written(None)
            messages = [self._message("insert" if inserted else "update", doc)] if send else []
            return _Written(project(doc, projection), messages)

        return await self._write(write)

    async def update_one(
        self,
        filter: Filter,
        update: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        upsert: bool = False,
        silent: bool = False,
    ) -> Document | None:
        """Update the first matching document; return it after the update, projected by the
        collection's projection (with ``_id``), or None if nothing matched.

        1 round trip (``findAndModify``). Dispatches ``update``, or ``insert`` if the upsert
        inserted. On cancellation: see the module docstring.
        """
        validate_ok_for_update(update)
        return await self._modify_one(filter, update, upsert=upsert, replace=False, silent=silent)

    async def replace_one(
        self,
        filter: Filter,
        replacement: Mapping[str, Any],
        *,
        upsert: bool = False,
        silent: bool = False,
    ) -> Document | None:
        """Replace the first matching document; return the new one, projected like
        :meth:`update_one`, or None if nothing matched.

        1 round trip. Dispatches ``update``, or ``insert`` if the upsert inserted.
        On cancellation: see the module docstring.
        """
        validate_ok_for_replace(replacement)
        return await self._modify_one(
            filter, replacement, upsert=upsert, replace=True, silent=silent
        )

    async def update_many(
        self,
        filter: Filter,
        update: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        upsert: bool = False,
        silent: bool = False,
    ) -> UpdateManyResult:
        """Update every matching document. Dispatches one ``update`` per document.

        Round trips, whatever the number N of documents (up to 20,000; beyond, one update and
        one find more per further 20,000): 3 — the matching ids, one ``update`` restricted to
        them, one ``find`` of them with the projection; 2 when silent. With ``upsert=True`` and
        nothing matching: 2 — the ids, then one upsert as in :meth:`update_one`.

        Concurrent changes: the documents updated are those matching at the first round trip
        AND still matching at the second; a document that starts matching in between is not
        touched by this call. With ``upsert=True`` and nothing matching, the call updates (and
        dispatches) at most one document that started matching in between, else inserts one.
        The dispatched documents show their state after the update (as read in the third round
        trip); a selected document that stopped matching in between is dispatched too,
        unchanged.

        Refused by MongoDB (e.g. a duplicate key, a validator): MongoDB stops at the failing
        document, those updated before it stay updated, and its reply does not say which. So
        the selected documents are read back (one round trip more) and dispatched as they now
        are (some perhaps unchanged), then the error is raised. A timeout or lost connection
        after MongoDB acknowledged updates leaves no way to read them back: each acknowledged
        document is dispatched as an update carrying its id alone (reload it), then the error
        is raised. A failure before anything was acknowledged dispatches nothing.
        On cancellation: see the module docstring.
        """
        validate_ok_for_update(update)
        send = self._sends(silent)

        def write() -> _Written[UpdateManyResult]:
            ids = self._ids(filter)
            if not ids:
                return self._upsert_many(filter, update, send) if upsert else _nothing_updated()
            matched = modified = 0
            sent: list[Any] = []  # ids whose update command MongoDB has acknowledged
            for chunk in _chunks(ids):
                try:
                    result = self._collection.update_many(_among(filter, chunk), update)
                except OperationFailure as exc:
                    if exc.timeout:
                        return self._unconfirmed(sent, send, matched, modified, exc)
                    return self._failed_update(ids, send, exc)
                except PyMongoError as exc:
                    return self._unconfirmed(sent, send, matched, modified, exc)
                sent.extend(chunk)
                matched += result.matched_count
                modified += result.modified_count
            try:
                docs = self._fetch(ids) if send else []
            except PyMongoError as exc:
                return self._unconfirmed(sent, send, matched, modified, exc)
            messages = [self._message("update", doc) for doc in docs]
            return _Written(UpdateManyResult(matched, modified, ids), messages)

        return await self._write(write)

    async def delete_one(self, filter: Filter, *, silent: bool = False) -> Any | None:
        """Delete the first matching document; return its id, or None. 1 round trip.

        Dispatches ``delete`` with ``[id]``. On cancellation: see the module docstring.
        """
        send = self._sends(silent)

        def write() -> _Written[Any | None]:
            doc = self._collection.find_one_and_delete(filter, projection=self._server_projection)
            if doc is None:
                return _Written(None)
            return _Written(doc["_id"], [self._deleted([doc])] if send else [])

        return await self._write(write)

    async def delete_many(self, filter: Filter, *, silent: bool = False) -> list[Any]:
        """Delete every matching document; return the ids removed. Dispatches one ``delete``
        with that list.

        Round trips, whatever the number N of documents (up to 20,000; beyond, one delete more
        per further 20,000): 2 — the matching ids, one ``delete`` restricted to them; 3 if fewer
        were deleted than selected (a concurrent change), the third finding which remain.

        Concurrent changes: the documents deleted are those matching at the first round trip
        AND still matching at the second; one that starts matching in between is not deleted.
        The returned (and dispatched) ids are exactly those gone after the call; one deleted
        concurrently by another writer may appear in both writers' messages.
        On cancellation: see the module docstring.
        """
        send = self._sends(silent)

        def write() -> _Written[list[Any]]:
            docs = self._matching(filter, self._server_projection if send else {"_id": True})
            if not docs:
                return _Written([])
            ids = [doc["_id"] for doc in docs]
            deleted, done = 0, 0  # documents deleted; selected documents whose chunk is done
            try:
                for chunk in _chunks(ids):
                    deleted += self._collection.delete_many(_among(filter, chunk)).deleted_count
                    done += len(chunk)
                if deleted < len(ids):
                    remaining = {_key(doc["_id"]) for doc in self._fetch(ids, {"_id": True})}
                    docs = [doc for doc in docs if _key(doc["_id"]) not in remaining]
            except PyMongoError as exc:
                # Chunks MongoDB acknowledged stay deleted: say so, then raise.
                gone = docs[:done]
                return _Written(
                    [d["_id"] for d in gone], [self._deleted(gone)] if send and gone else [], exc
                )
            ids = [doc["_id"] for doc in docs]
            return _Written(ids, [self._deleted(docs)] if send and docs else [])

        return await self._write(write)

    # ---- helpers: the thread side ---------------------------------------------------------

    def _modify(
        self,
        filter: Filter,
        update: Any,
        projection: Mapping[str, Any] | None,
        *,
        upsert: bool,
        replace: bool,
        sort: Any = None,
    ) -> tuple[Document | None, bool]:
        """One ``findAndModify``: the document after the write, and whether it was inserted."""
        if not upsert:
            method = (
                self._collection.find_one_and_replace
                if replace
                else self._collection.find_one_and_update
            )
            after = ReturnDocument.AFTER
            doc = method(filter, update, projection=projection, sort=sort, return_document=after)
            return doc, False
        # Only the command's reply says whether an upsert inserted; pymongo's helpers drop it.
        # (A raw command is not retried on a transient network error, unlike the helpers.)
        command: dict[str, Any] = {
            "findAndModify": self.name,
            "query": filter,
            "update": update,
            "new": True,
            "upsert": True,
        }
        if projection is not None:
            command["fields"] = projection
        if sort is not None:
            command["sort"] = _sort_document(sort)
        write_concern = self._collection.write_concern
        if not write_concern.is_server_default:
            command["writeConcern"] = write_concern.document
        reply = self._collection.database.command(
            command, codec_options=self._collection.codec_options
        )
        return reply.get("value"), "upserted" in reply.get("lastErrorObject", {})

    def _upsert_many(self, filter: Filter, update: Any, send: bool) -> _Written[UpdateManyResult]:
        projection = self._server_projection
        doc, inserted = self._modify(filter, update, projection, upsert=True, replace=False)
        assert doc is not None, "an upsert always returns a document"
        count = 0 if inserted else 1
        result = UpdateManyResult(count, count, [doc["_id"]], doc["_id"] if inserted else None)
        messages = [self._message("insert" if inserted else "update", doc)] if send else []
        return _Written(result, messages)

    def _failed_update(
        self, ids: list[Any], send: bool, error: OperationFailure
    ) -> _Written[UpdateManyResult]:
        """MongoDB refused an update_many part-way. The documents it updated before the failing
        one stay updated and it does not say which (its counts say 0): read the selected ones
        back (one round trip) and dispatch their current state."""
        messages: list[Message] = []
        if send:
            try:
                messages = [self._message("update", doc) for doc in self._fetch(ids)]
            except PyMongoError:
                log.warning("%s: cannot read back the documents of a failed update_many", self.name)
        return _Written(UpdateManyResult(0, 0, ids), messages, error)

    def _unconfirmed(
        self, ids: list[Any], send: bool, matched: int, modified: int, error: PyMongoError
    ) -> _Written[UpdateManyResult]:
        """An update_many that failed after MongoDB had acknowledged some of its updates (those
        of ``ids``), with no means left to read their new state: dispatch each as an update
        carrying its id alone, so that clients reload it, then raise."""
        messages = [Message("update", {"id": id_}, {"id": id_}) for id_ in ids] if send else []
        return _Written(UpdateManyResult(matched, modified, ids), messages, error)

    def _ids(self, filter: Filter) -> list[Any]:
        """The ids of the matching documents: one round trip (up to 16 MB of ids)."""
        return [doc["_id"] for doc in self._matching(filter, {"_id": True})]

    def _matching(self, filter: Filter, projection: Mapping[str, Any] | None) -> list[Document]:
        """The matching documents, projected: one round trip (up to 16 MB)."""
        return list(self._collection.find(filter, projection, batch_size=_ONE_BATCH))

    def _fetch(self, ids: list[Any], projection: Mapping[str, Any] | None = None) -> list[Document]:
        """The documents with these ids, projected by ``projection`` (default: the spec's)."""
        projection = projection or self._server_projection
        found: list[Document] = []
        for chunk in _chunks(ids):
            cursor = self._collection.find(
                {"_id": {"$in": chunk}}, projection, batch_size=_ONE_BATCH
            )
            found.extend(cursor)
        return found

    def _message(self, operation: str, doc: Mapping[str, Any]) -> Message:
        data = message_data(project(doc, self.spec.projection))
        return Message(operation, data, data)

    def _deleted(self, docs: list[Document]) -> Message:
        """A delete carries only ids; the documents go along for access rules to judge by."""
        subjects = [message_data(project(doc, self.spec.projection)) for doc in docs]
        return Message("delete", [doc["_id"] for doc in docs], subjects)

    # ---- helpers: the trio side -----------------------------------------------------------

    async def _modify_one(
        self, filter: Filter, update: Any, *, upsert: bool, replace: bool, silent: bool
    ) -> Document | None:
        send = self._sends(silent)
        projection = self._server_projection

        def write() -> _Written[Document | None]:
            doc, inserted = self._modify(filter, update, projection, upsert=upsert, replace=replace)
            if doc is None:
                return _Written(None)
            operation = "insert" if inserted else "update"
            return _Written(doc, [self._message(operation, doc)] if send else [])

        return await self._write(write)

    def _sends(self, silent: bool) -> bool:
        return not (silent or self.spec.silent)

    async def _read(self, fn: Callable[[], T]) -> T:
        try:
            return await run_read(fn, self._shared.limiter, self._shared.timeout)
        except PyMongoError as exc:
            raise self._error(exc, write=False) from exc

    async def _write(self, fn: Callable[[], _Written[T]]) -> T:
        """Run a write's thread function; dispatch its messages; then honour a cancellation."""
        loop = trio.lowlevel.current_trio_token()

        def write_then_dispatch() -> _Written[T]:
            written = fn()
            if written.messages:
                loop.run_sync_soon(self._dispatch, written.messages)
            return written

        try:
            written = await run_write(
                write_then_dispatch, self._shared.limiter, self._shared.timeout
            )
        except PyMongoError as exc:
            raise self._error(exc, write=True) from exc
        if written.error is not None:
            raise self._error(written.error, write=True) from written.error
        await trio.lowlevel.checkpoint_if_cancelled()
        return written.result

    def _dispatch(self, messages: list[Message]) -> None:
        # Runs as a trio callback, not in a task: nothing may escape it.
        for operation, data, subject in messages:
            try:
                self._shared.dispatch(self.name, operation, data, subject)
            except Exception:
                # The write is done: a faulty dispatcher must not turn it into a failure.
                log.exception("dispatching %s %s failed", self.name, operation)

    def _error(self, exc: PyMongoError, *, write: bool) -> DatabaseError:
        shared = self._shared
        return translate(
            exc, collection=self.name, url=shared.url, timeout=shared.timeout, write=write
        )


def _nothing_updated() -> _Written[UpdateManyResult]:
    return _Written(UpdateManyResult(0, 0, []))


def _among(filter: Filter, ids: list[Any]) -> dict[str, Any]:
    """``filter`` restricted to ``ids``."""
    return {"$and": [filter, {"_id": {"$in": ids}}]}


def _chunks(ids: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(ids), IDS_PER_COMMAND):
        yield ids[start : start + IDS_PER_COMMAND]


def _sort_document(sort: Any) -> dict[str, Any]:
    """pymongo's sort forms (a key, (key, direction) pairs, a mapping) as a command's ``sort``."""
    if isinstance(sort, str):
        return {sort: 1}
    if isinstance(sort, Mapping):
        return dict(sort)
    return {key: direction for key, direction in sort}


def _key(value: Any) -> Hashable:
    """A hashable stand-in for an ``_id`` (which may be a document)."""
    return value if isinstance(value, Hashable) else bson.encode({"_id": value})

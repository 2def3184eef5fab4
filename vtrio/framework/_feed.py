"""The change feed: MongoDB's own change stream, read by one thread, as :class:`Change`\\ s in
commit order, with positions that order them across the whole deployment.

One change stream per instance covers every declared collection of the database, whoever wrote
to it (this instance, another one, an admin command, ``mongosh``); the replica set's oplog is the
engine that carries every change to every instance. Each change is read with the document as
it was before and after it (MongoDB 6.0 pre- and post-images, which the feed turns on for the
declared collections), so that the hub can tell who gained or lost the right to see it.

**Positions.** A change's :class:`Position` is its cluster time and its ordinal among the
changes of that cluster time (a transaction's changes share one), as 22 hex digits that sort in
commit order. Every instance runs the same stream over the same collections, so every instance
gives a change the same position: a client may resume on any of them.

**History.** The last ``history_size`` changes are kept in memory, and a reconnecting client
is served what it missed from there. When memory does not reach back that far, it is extended
back from MongoDB if it has room (:meth:`ChangeFeed.reach_back`: one read, however many clients
resume at once); else the client's catch-up reads a stream of its own, opened at its position
(:meth:`ChangeFeed.read_history`). A position MongoDB's oplog no longer covers is
:class:`HistoryLost`.

**Faults.** The stream is reopened from its last position after any error (a mongod restart, a
failover, a lost connection), with backoff, losing nothing. When it cannot be (the history the
position needs is gone, the collection was dropped, the stream was invalidated), subscribers are
told (:meth:`ChangeFeed.subscribe`'s ``on_reset``: clients must reload) and the feed goes on
from the present.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pymongo
import trio
from bson import Timestamp
from pymongo.database import Database as PymongoDatabase
from pymongo.errors import OperationFailure, PyMongoError

from vtrio.framework._changes import Change, CollectionSpec, Operation
from vtrio.framework._documents import Document, id_key, project

__all__ = ["FEED_NAME", "ChangeFeed", "HistoryLost", "Position", "open_feed"]

log = logging.getLogger(__name__)

FEED_NAME = "vtrio-changes"
"""The change feed's thread name, and its MongoDB client's ``appname``: what a profiler's
thread list, a mongod's log and ``$currentOp`` call it."""
LIVE_AWAIT = 1.0
"""Seconds the live stream's getMore waits for news (a batch returns at once when there is
some). An empty batch still moves the feed's position on, so a quiet stream reports where it
is at least this often."""
REPLAY_AWAIT = 0.2
"""Seconds a replay's getMore waits for news before it counts as caught up."""
REPLAY_BATCH = 1000
"""Changes read from MongoDB in one round trip of a replay."""
_LAST_ORDINAL = 0xFFFFFF
HISTORY_LOST_CODES = frozenset({136, 280, 286})  # CappedPositionLost, ...Fatal, ...HistoryLost
_RESET_EVENTS = frozenset({"drop", "rename", "dropDatabase", "invalidate"})


Image = tuple[str, Any, Document | None]
"""``(collection, id, document)``: the document exactly as a change left it (its post-image);
None if the change left none (a delete, or an update made while images were off)."""


class HistoryLost(Exception):
    """The changes after a position can no longer be had: the client must reload."""


@dataclass(frozen=True, order=True)
class Position:
    """Where a change stands in the deployment's commit order; ``str()`` is its wire form."""

    time: int
    increment: int
    ordinal: int  # among the changes of this cluster time, from 1; 0: before all of them

    def __str__(self) -> str:
        return f"{self.time:08x}{self.increment:08x}{self.ordinal:06x}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """The position ``text`` is the wire form of; ValueError if it is none."""
        if len(text) != 22 or text.strip("0123456789abcdef"):
            raise ValueError(f"{text[:40]!r} is not a position")
        return cls(int(text[:8], 16), int(text[8:16], 16), int(text[16:], 16))

    @classmethod
    def before(cls, timestamp: Timestamp) -> Position:
        """The position just before every change at ``timestamp``."""
        return cls(timestamp.time, timestamp.inc, 0)

    @classmethod
    def after(cls, timestamp: Timestamp) -> Position:
        """The position just after every change at ``timestamp``."""
        return cls(timestamp.time, timestamp.inc, _LAST_ORDINAL)

    @property
    def timestamp(self) -> Timestamp:
        return Timestamp(self.time, self.increment)


Subscriber = Callable[[Sequence[Change]], None]


class ChangeFeed:
    """The database's committed changes, in order, for subscribers on the event loop.

    Made by :func:`open_feed`. Subscribers are called on the event loop, in commit order,
    with each batch of changes the stream read; they must not wait, and should not raise.
    """

    def __init__(
        self,
        database: PymongoDatabase,
        specs: Mapping[str, CollectionSpec],
        *,
        start: Timestamp,
        history_size: int,
    ) -> None:
        self._database = database
        self._specs = dict(specs)
        self._history: deque[Change] = deque()
        self._history_size = history_size
        # The documents writers wait for (see keeping()): how many wait for each, and each
        # one's post-image as the last change read left it (None: not known).
        self._kept: Counter[tuple[str, Hashable]] = Counter()
        self._images: dict[tuple[str, Hashable], Document | None] = {}
        self.floor = Position.before(start)
        """The history holds every change after this position."""
        self.position = self.floor
        """The position of the last change read (or the floor, before any)."""
        self._read_to = start  # the cluster time up to which the stream has read
        self._subscribers: list[tuple[Subscriber, Callable[[], None]]] = []
        self._fences: list[tuple[Timestamp, trio.Event]] = []
        self._progress = trio.lowlevel.ParkingLot()
        self._reaching_back = trio.Lock()
        # (floor, position): from that floor, the history had no room back to that position.
        self._beyond_reach: tuple[Position, Position] | None = None
        self.lag = 0.0
        """Seconds between the last change's commit and its reading, as last measured."""
        self.live = True
        """False while the stream is failing and being reopened."""

    # ---- for the rest of the framework -------------------------------------------------------

    def subscribe(
        self, on_changes: Subscriber, on_reset: Callable[[], None] = lambda: None
    ) -> Callable[[], None]:
        """Call ``on_changes(changes)`` for every batch from now on, and ``on_reset()`` when
        the feed had to skip ahead (clients cannot have everything after their position);
        return the function that stops it."""
        entry = (on_changes, on_reset)
        self._subscribers.append(entry)
        return lambda: self._subscribers.remove(entry)

    async def wait_past(self, timestamp: Timestamp, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until the feed has read everything up to ``timestamp`` (a write's operation
        time): its changes have then been handed to every subscriber. False if that took
        longer than ``timeout`` (the stream is behind: the changes come later)."""
        if self._read_to >= timestamp:
            return True
        passed = trio.Event()
        self._fences.append((timestamp, passed))
        with trio.move_on_after(timeout):
            await passed.wait()
            return True
        log.warning("the change stream is %.1f s or more behind a write", timeout)
        return False

    @contextmanager
    def keeping(self, collection: str, id: Any) -> Iterator[None]:
        """Keep the document ``id`` of ``collection`` as each change read from now on leaves
        it, for :meth:`document`, until the block ends.

        For a writer that needs its document back: entered before the write is sent, then
        left, it holds one document for as long as the write and its fence take; no more is
        kept than writers are waiting."""
        key = (collection, id_key(id))
        self._kept[key] += 1
        try:
            yield
        finally:
            self._kept[key] -= 1
            if not self._kept[key]:
                del self._kept[key]
                self._images.pop(key, None)

    def document(self, collection: str, id: Any) -> Document | None:
        """The document ``id`` of ``collection`` (a copy) exactly as the last change to it
        that the feed read inside :meth:`keeping` left it, if that change had a post-image;
        else None (ask MongoDB).

        A writer that waited for the feed to read past its write, a write that changed the
        document (one that changes nothing makes no change), gets the document as its write
        or a later one left it without reading it back: the state of a change the feed has
        already handed to every subscriber."""
        image = self._images.get((collection, id_key(id)))
        return None if image is None else dict(image)

    def history_after(self, position: Position, limit: int) -> list[Change] | None:
        """Up to ``limit`` changes after ``position`` from memory, in order; None if memory
        does not reach back to it."""
        if position < self.floor:
            return None
        if position >= self.position:
            return []
        # Scanning from the newest end: a reconnecting client is usually close behind.
        newer: list[Change] = []
        for change in reversed(self._history):
            if change.position <= str(position):
                break
            newer.append(change)
        newer.reverse()
        return newer[:limit]

    async def read_history(self, position: Position, limit: int) -> list[Change]:
        """Up to ``limit`` changes after ``position``, from MongoDB (a stream of its own, in a
        thread). Raises HistoryLost if the oplog no longer reaches back to it."""
        return await trio.to_thread.run_sync(
            self._read_history, position, limit, abandon_on_cancel=True
        )

    async def reach_back(self, position: Position) -> bool:
        """Extend the history in memory back to ``position``, if it has room for the changes
        between there and its floor (read from MongoDB, in a thread); return whether it now
        reaches back that far.

        One reach at a time: connections resuming together (every client of an instance that
        restarted, say) read MongoDB once between them, then all catch up from memory.
        Raises HistoryLost if the oplog no longer reaches back to ``position``.
        """
        async with self._reaching_back:
            if position >= self.floor:
                return True
            floor, room = self.floor, self._history_size - len(self._history)
            if room <= 0 or self._known_beyond_reach(floor, position):
                return False
            older = await trio.to_thread.run_sync(
                self._read_between, position, floor, room, abandon_on_cancel=True
            )
            if older is None:
                self._beyond_reach = (floor, position)  # and so is every older position
                return False
            if self.floor != floor:
                return False  # the history moved on meanwhile: what was read no longer joins it
            self._history.extendleft(reversed(older))
            self.floor = position
            return True

    def _known_beyond_reach(self, floor: Position, position: Position) -> bool:
        if self._beyond_reach is None:
            return False
        beyond_floor, beyond = self._beyond_reach
        return floor == beyond_floor and position <= beyond

    async def wait_for(self, position: Position) -> None:
        """Wait until the feed has read up to ``position`` (which another instance's feed may
        have reached first)."""
        while self.position < position and self._read_to <= position.timestamp:
            await self._progress.park()

    # ---- the event loop's side of the stream -------------------------------------------------

    def _received(
        self, changes: list[Change], images: list[Image], read_to: Timestamp, whole: bool,
        lag: float,
    ) -> None:  # fmt: skip
        """Runs on the event loop: one batch the thread read, in order, with the documents it
        left; the stream has read up to ``read_to``, and ``whole``: everything at ``read_to``
        too."""
        self._keep_images(images)
        if changes:
            self._remember(changes)
            self.position = Position.parse(changes[-1].position)
            self.lag = lag
            for on_changes, _ in list(self._subscribers):
                _call(on_changes, changes)
        if whole:  # a quiet stream moves on too: a client may resume from where it is now
            self.position = max(self.position, Position.after(read_to))
        self._read_to = max(self._read_to, read_to)
        self.live = True
        self._pass_fences()
        self._progress.unpark_all()

    def _remember(self, changes: list[Change]) -> None:
        self._history.extend(changes)
        while len(self._history) > self._history_size:
            self.floor = Position.parse(self._history.popleft().position)

    def _keep_images(self, images: list[Image]) -> None:
        if not self._kept:
            return
        for collection, id, document in images:
            key = (collection, id_key(id))
            if key in self._kept:
                self._images[key] = document

    def _pass_fences(self) -> None:
        if not self._fences:
            return
        waiting = []
        for timestamp, passed in self._fences:
            if timestamp <= self._read_to:
                passed.set()
            else:
                waiting.append((timestamp, passed))
        self._fences = waiting

    def _reset(self, start: Timestamp) -> None:
        """Runs on the event loop: the stream skipped ahead to ``start``."""
        self._history.clear()
        self._images.clear()  # the changes skipped may have changed them
        self.floor = self.position = Position.before(start)
        self._read_to = max(self._read_to, start)
        for _, on_reset in list(self._subscribers):
            _call(on_reset)
        self._pass_fences()
        self._progress.unpark_all()

    def _failing(self) -> None:
        self.live = False

    # ---- the thread's side -------------------------------------------------------------------

    def _open(self, start: Position) -> _Cursor:
        return _Cursor(self._database, self._specs, start)

    def _read_history(self, position: Position, limit: int) -> list[Change]:
        """In a thread: the changes after ``position``, from a stream opened there, up to
        ``limit`` or until it reaches where the live stream has read."""
        with _history_errors(), self._open(position) as cursor:
            changes: list[Change] = []
            while len(changes) < limit:
                try:
                    batch = cursor.next_batch(REPLAY_AWAIT)
                except PyMongoError as exc:
                    if not exc.timeout or not changes:
                        raise
                    break  # what was read stands; the replay goes on from its last one
                if not batch and cursor.read_to >= self._read_to:
                    break  # caught up with the live stream: the rest is in memory
                changes.extend(batch)
            return changes[:limit]

    def _read_between(self, position: Position, floor: Position, limit: int) -> list[Change] | None:
        """In a thread: the changes after ``position`` up to ``floor`` (inclusive), or None if
        there are more than ``limit``."""
        end = str(floor)
        with _history_errors(), self._open(position) as cursor:
            changes: list[Change] = []
            while True:
                batch = cursor.next_batch(REPLAY_AWAIT)
                for change in batch:
                    if change.position > end:
                        return changes
                    if len(changes) == limit:
                        return None
                    changes.append(change)
                if not batch and cursor.read_to >= floor.timestamp:
                    return changes  # MongoDB's high-water mark has passed the floor

    def _follow(self, token: trio.lowlevel.TrioToken, stopped: threading.Event) -> None:
        """The stream's thread: read batches and hand them to the event loop, until stopped."""
        with suppress(trio.RunFinishedError):  # the event loop ended: so does the feed
            position, backoff = self.position, _Backoff()
            while not stopped.is_set():
                position = self._follow_from(position, token, stopped, backoff)

    def _follow_from(
        self,
        position: Position,
        token: trio.lowlevel.TrioToken,
        stopped: threading.Event,
        backoff: _Backoff,
    ) -> Position:
        """Read from ``position`` until stopped or until the stream fails; return where to go
        on from: the last change handed over, or where the stream now starts after skipping
        ahead or losing its history."""
        try:
            with self._open(position) as cursor:
                while not stopped.is_set():
                    batch = cursor.next_batch(LIVE_AWAIT)
                    if batch:
                        position = Position.parse(batch[-1].position)
                    lag = _lag(cursor.last_wall_time)
                    token.run_sync_soon(
                        self._received, batch, cursor.images, cursor.read_to,
                        cursor.read_whole, lag,
                    )  # fmt: skip
                    backoff.reset()
        except _Reset as reset:
            log.warning("the change stream skipped ahead: %s; clients will reload", reset)
            token.run_sync_soon(self._reset, reset.start)
            return Position.before(reset.start)
        except PyMongoError as exc:
            if stopped.is_set():
                return position  # the client was closed under the stream: the feed is stopping
            # ``position`` is the last change handed over: reopening there repeats nothing.
            return self._recover(exc, position, token, stopped, backoff)
        return position

    def _recover(
        self,
        exc: PyMongoError,
        position: Position,
        token: trio.lowlevel.TrioToken,
        stopped: threading.Event,
        backoff: _Backoff,
    ) -> Position:
        """After the stream failed: where to reopen it (the same position, after a pause; or
        the present, when the history it needs is gone)."""
        if _history_lost(exc):
            with suppress(PyMongoError):  # else: try again after the pause, as below
                start = _now(self._database)
                log.error("change history lost (%s); clients will reload", exc)
                token.run_sync_soon(self._reset, start)
                return Position.before(start)
        log.warning("the change stream failed (%s): reopening it from %s", exc, position)
        token.run_sync_soon(self._failing)
        stopped.wait(backoff.next())
        return position


class _Reset(Exception):
    """The stream cannot go on from where it is: start again at ``start``."""

    def __init__(self, reason: str, start: Timestamp) -> None:
        super().__init__(reason)
        self.start = start


class _Cursor:
    """One change stream, opened at a position, read a batch (one getMore) at a time.

    Runs in a thread. The raw commands, rather than pymongo's ``watch()``: a batch is exactly
    what one getMore returned (so clients get one frame for it), its ``postBatchResumeToken``
    says how far the stream has read even when nothing watched changed, and the position to
    open at is the feed's own.
    """

    def __init__(
        self, database: PymongoDatabase, specs: Mapping[str, CollectionSpec], start: Position
    ) -> None:
        self._database = database
        self._specs = specs
        self._start = start
        self._id = 0
        self._pending: list[dict[str, Any]] = []
        self._last = (start.timestamp, 0)  # the last cluster time seen, and its changes so far
        self.read_to = start.timestamp
        """The stream has read every change before this cluster time, and those at it when
        :attr:`read_whole` (its last batch was empty: MongoDB's high-water mark)."""
        self.read_whole = False
        self.last_wall_time: datetime | None = None
        self.images: list[Image] = []
        """The documents the last batch's changes left, in order."""

    def __enter__(self) -> _Cursor:
        pipeline = [
            {"$changeStream": {
                "startAtOperationTime": self._start.timestamp,
                "fullDocument": "whenAvailable",
                "fullDocumentBeforeChange": "whenAvailable",
            }},
            {"$match": {"$or": [
                {"ns.coll": {"$in": sorted(self._specs)}},
                {"operationType": {"$in": ["dropDatabase", "invalidate"]}},
            ]}},
        ]  # fmt: skip
        # A cursor's getMores must come in the session that opened it.
        self._session = self._database.client.start_session(causal_consistency=False)
        reply = self._command({"aggregate": 1, "pipeline": pipeline, "cursor": {}})
        self._id = reply["cursor"]["id"]
        self._pending = reply["cursor"]["firstBatch"]
        if not self._pending:
            self._advance(reply["cursor"])
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._id:
                with pymongo.timeout(1):
                    self._command({"killCursors": "$cmd.aggregate", "cursors": [self._id]})
        except PyMongoError:
            pass  # MongoDB ends an abandoned cursor itself, after 10 minutes
        finally:
            self._session.end_session()

    def _command(self, command: Mapping[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = self._database.command(dict(command), session=self._session)
        return reply

    def next_batch(self, wait: float) -> list[Change]:
        """The changes of the next getMore (or of the opening reply), in order. A getMore waits
        for news up to ``wait`` seconds (its ``maxTimeMS``: the feed's client has no operation
        timeout to overwrite it; its socket timeout bounds the round trip).

        Error handling: after any failure, a batch may have been lost on its way: the stream
        must be opened again from the last change had, not continued."""
        self.images = []
        if self._pending:
            events, self._pending = self._pending, []
        else:
            reply = self._command({
                "getMore": self._id, "collection": "$cmd.aggregate",
                "maxTimeMS": max(1, round(wait * 1000)),
            })  # fmt: skip
            events = reply["cursor"]["nextBatch"]
            if not events:
                self._advance(reply["cursor"])
        return [change for event in events if (change := self._change(event)) is not None]

    def _advance(self, cursor: Mapping[str, Any]) -> None:
        """After an empty batch: its resume token is a high-water mark (every change up to it
        has been returned). A batch's last event is not: a transaction's changes, which share a
        cluster time, may go on in the next batch."""
        token = cursor.get("postBatchResumeToken")
        if token is not None:
            self.read_to = max(self.read_to, token_time(token["_data"]))
            self.read_whole = True

    def _change(self, event: Mapping[str, Any]) -> Change | None:
        position = self._count(event["clusterTime"])
        if position <= self._start:
            return None  # the ones up to the start, at the start's cluster time, were had
        if event["clusterTime"] > self.read_to:
            self.read_to, self.read_whole = event["clusterTime"], False
        self.last_wall_time = event.get("wallTime")
        kind = event["operationType"]
        if kind in _RESET_EVENTS:
            raise _Reset(f"{kind} of {event.get('ns', {}).get('coll', 'the database')}",
                         _now(self._database))  # fmt: skip
        change = change_of(event, self._specs, str(position), self._database)
        if change is not None:
            self.images.append((change.collection, change.id, event.get("fullDocument")))
        return change

    def _count(self, cluster_time: Timestamp) -> Position:
        ordinal = self._last[1] + 1 if cluster_time == self._last[0] else 1
        self._last = (cluster_time, ordinal)
        return Position(cluster_time.time, cluster_time.inc, ordinal)


def change_of(
    event: Mapping[str, Any],
    specs: Mapping[str, CollectionSpec],
    position: str,
    database: PymongoDatabase,
) -> Change | None:
    """The Change a change event stands for, documents projected by its collection's spec."""
    collection = event["ns"]["coll"]
    projection = specs[collection].projection
    key = event.get("documentKey", {}).get("_id")
    before = event.get("fullDocumentBeforeChange")
    before = None if before is None else project(before, projection)
    kind = event["operationType"]
    if kind == "delete":
        return Change(collection, "delete", key, before=before, position=position)
    if kind not in ("insert", "update", "replace"):
        return None  # an event vtrio does not dispatch (an index built, say)
    after = event.get("fullDocument")
    if after is None:  # no post-image (images were off then): the document as it is now
        after = database[collection].find_one({"_id": key})
        if after is None:
            return None  # deleted since: its delete follows
    operation: Operation = "insert" if kind == "insert" else "update"
    return Change(
        collection, operation, key, after=project(after, projection), before=before,
        position=position,
    )  # fmt: skip


def token_time(data: str) -> Timestamp:
    """The cluster time a resume token's hex ``_data`` begins with (type byte 0x82, then the
    timestamp's 8 bytes, big endian: MongoDB's KeyString encoding)."""
    if not data.startswith("82") or len(data) < 18:
        raise ValueError(f"not a resume token: {data[:20]!r}")
    return Timestamp(int(data[2:10], 16), int(data[10:18], 16))


def _now(database: PymongoDatabase) -> Timestamp:
    """The cluster time now, as MongoDB says (a ping's operationTime)."""
    with database.client.start_session(causal_consistency=False) as session:
        database.command("ping", session=session)
        assert session.operation_time is not None
        return session.operation_time


@contextmanager
def _history_errors() -> Iterator[None]:
    """MongoDB's ways of saying that the changes after a position are gone, as HistoryLost."""
    try:
        yield
    except _Reset as exc:
        raise HistoryLost(str(exc)) from exc
    except OperationFailure as exc:
        if exc.code in HISTORY_LOST_CODES or exc.code == 15:  # 15: a malformed start
            raise HistoryLost(str(exc)) from exc
        raise


def _history_lost(exc: PyMongoError) -> bool:
    return isinstance(exc, OperationFailure) and exc.code in HISTORY_LOST_CODES


def _lag(wall_time: datetime | None) -> float:
    """Seconds since ``wall_time`` (a change event's, naive UTC as bson decodes it)."""
    if wall_time is None:
        return 0.0
    return max(0.0, time.time() - wall_time.replace(tzinfo=UTC).timestamp())


def _call(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("a change subscriber failed")


class _Backoff:
    """Seconds to wait before reopening a failed stream: 0.05, doubling, at most 2."""

    def __init__(self) -> None:
        self._next = 0.05

    def next(self) -> float:
        delay, self._next = self._next, min(2.0, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = 0.05


async def enable_images(database: PymongoDatabase, names: Sequence[str]) -> None:
    """Turn on pre- and post-images for ``names`` (creating the collections that do not exist):
    MongoDB then records each document as it was before and after every change."""

    def enable(name: str) -> None:
        try:
            database.command("collMod", name, changeStreamPreAndPostImages={"enabled": True})
        except OperationFailure as exc:
            if exc.code != 26:  # NamespaceNotFound
                raise
            try:
                # check_exists=False: pymongo's own check would raise CollectionInvalid for
                # a collection another instance made since; MongoDB says NamespaceExists.
                database.create_collection(
                    name, check_exists=False, changeStreamPreAndPostImages={"enabled": True}
                )
            except OperationFailure as again:
                if again.code != 48:  # NamespaceExists: another instance made it meanwhile
                    raise
                enable(name)

    for name in names:
        await trio.to_thread.run_sync(enable, name)


@asynccontextmanager
async def open_feed(
    database: PymongoDatabase, specs: Mapping[str, CollectionSpec], *, history_size: int
) -> AsyncIterator[ChangeFeed]:
    """Follow the database's change stream for the block; yield the feed.

    Resource handling: the stream's thread is told to stop on exit and its client's
    connection is closed, which ends a getMore in progress; the thread is a daemon thread
    and holds nothing the process needs.
    """
    await enable_images(database, sorted(specs))
    start = await trio.to_thread.run_sync(_now, database)
    feed = ChangeFeed(database, specs, start=start, history_size=history_size)
    stopped = threading.Event()
    token = trio.lowlevel.current_trio_token()
    thread = threading.Thread(
        target=feed._follow, args=(token, stopped), name=FEED_NAME, daemon=True
    )
    thread.start()
    try:
        yield feed
    finally:
        stopped.set()

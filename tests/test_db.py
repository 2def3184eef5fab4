"""The MongoDB layer against the session's real mongod: the change feed, the write fence,
coalescing, errors and cancellation."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pymongo
import pytest
import trio
import trio.testing
from pymongo import monitoring
from pymongo.errors import DuplicateKeyError, OperationFailure, ServerSelectionTimeoutError

from vtrio.framework import (
    FEED_NAME,
    Change,
    CollectionSpec,
    Database,
    DatabaseError,
    DatabaseTimeout,
    DatabaseUnavailable,
    DocumentInvalid,
    DuplicateKey,
    Metrics,
    Position,
    Stopping,
    find_mongod,
    mask_url,
    open_database,
)

SPECS = {
    "samples": CollectionSpec(projection=["name", "ready"]),
    "jobs": CollectionSpec(),
    "users": CollectionSpec(silent=True),
}


class Recorder:
    """A feed subscriber that keeps every change, as (collection, operation, id, after, before)."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.seen = trio.lowlevel.ParkingLot()

    def __call__(self, changes: Sequence[Change]) -> None:
        self.changes.extend(changes)
        self.seen.unpark_all()

    @property
    def summary(self) -> list[tuple[str, str, Any, Any, Any]]:
        return [(c.collection, c.operation, c.id, c.after, c.before) for c in self.changes]

    async def wait_for(self, count: int, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while len(self.changes) < count:
                await self.seen.park()


class Commands(monitoring.CommandListener):
    """Records the name of every command the layer sends (not the change stream's thread);
    ``on_started`` runs in the sending thread."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.on_started: Callable[[monitoring.CommandStartedEvent], None] | None = None

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        ignored = event.command_name in ("getMore", "aggregate", "hello", "endSessions")
        if not ignored and threading.current_thread().name != FEED_NAME:
            self.names.append(event.command_name)
        if self.on_started is not None:
            self.on_started(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def commands() -> Commands:
    return Commands()


@pytest.fixture
async def db(
    mongodb_url: str, db_name: str, recorder: Recorder, commands: Commands
) -> AsyncIterator[Database]:
    async with open_database(
        mongodb_url, db_name, collections=SPECS, client_options={"event_listeners": [commands]}
    ) as database:
        assert database.changes is not None
        database.changes.subscribe(recorder)
        yield database


@pytest.fixture
async def one_worker(mongodb_url: str, db_name: str, commands: Commands) -> AsyncIterator[Database]:
    """A database served by one worker thread, so that concurrent calls queue and coalesce."""
    async with open_database(
        mongodb_url, db_name, collections=SPECS, workers=1,
        client_options={"event_listeners": [commands]},
    ) as database:  # fmt: skip
        yield database


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- the feed -------------------------------------------------------------------------------


async def test_every_write_reaches_the_feed_in_commit_order_projected(
    db: Database, recorder: Recorder
) -> None:
    samples = db.samples
    await samples.insert_many([{"_id": 1, "name": "a", "n": 0}, {"_id": 2, "name": "b"}])
    assert await samples.update_one({"_id": 1}, {"$set": {"ready": True}}) == {
        "_id": 1,
        "name": "a",
        "ready": True,
    }
    assert await samples.replace_one({"_id": 2}, {"name": "B", "n": 9}) == {"_id": 2, "name": "B"}
    await samples.update_many({}, {"$set": {"ready": False}})
    assert await samples.delete_one({"_id": 1}) == 1
    assert await samples.delete_one({"_id": 1}) is None  # nothing to delete: no change
    assert await samples.delete_many({}) == 1
    await recorder.wait_for(8)
    a, b = {"_id": 1, "name": "a"}, {"_id": 2, "name": "b"}
    assert recorder.summary[:4] == [
        ("samples", "insert", 1, a, None),
        ("samples", "insert", 2, b, None),
        ("samples", "update", 1, {**a, "ready": True}, a),  # before and after, projected
        ("samples", "update", 2, {"_id": 2, "name": "B"}, b),
    ]
    assert sorted(recorder.summary[4:6], key=lambda c: c[2]) == [
        ("samples", "update", 1, {**a, "ready": False}, {**a, "ready": True}),
        ("samples", "update", 2, {"_id": 2, "name": "B", "ready": False}, {"_id": 2, "name": "B"}),
    ]
    assert recorder.summary[6:] == [
        ("samples", "delete", 1, None, {**a, "ready": False}),
        ("samples", "delete", 2, None, {"_id": 2, "name": "B", "ready": False}),
    ]
    positions = [change.position for change in recorder.changes]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert db.changes is not None and str(db.changes.position) == positions[-1]


async def test_writes_made_elsewhere_reach_the_feed_and_undeclared_collections_do_not(
    db: Database, recorder: Recorder
) -> None:
    other = db.client[db.name]
    await trio.to_thread.run_sync(lambda: other.things.insert_one({"_id": "undeclared"}))
    await trio.to_thread.run_sync(lambda: other.users.insert_one({"_id": "silent, but watched"}))
    await trio.to_thread.run_sync(lambda: other.samples.insert_one({"_id": "e", "name": "e"}))
    await recorder.wait_for(2)
    assert [(c.collection, c.id) for c in recorder.changes] == [
        ("users", "silent, but watched"),  # silent means: no client hears of it
        ("samples", "e"),
    ]


async def test_a_write_returns_once_the_feed_has_it(db: Database, recorder: Recorder) -> None:
    for n in range(20):
        await db.samples.insert_one({"_id": n})
        assert recorder.changes[-1].id == n  # before the call returned, not after
        await db.samples.update_one({"_id": n}, {"$set": {"name": "x"}})
        assert recorder.changes[-1].after == {"_id": n, "name": "x"}


async def test_a_write_that_changes_nothing_waits_for_nothing(
    db: Database, recorder: Recorder
) -> None:
    assert await db.samples.update_one({"_id": "none"}, {"$set": {"a": 1}}) is None
    assert (await db.samples.update_many({"_id": "none"}, {"$set": {"a": 1}})).matched_count == 0
    assert await db.samples.delete_many({"_id": "none"}) == 0
    assert recorder.changes == []


async def test_the_feed_keeps_history_and_replays_from_mongodb_what_memory_lost(
    mongodb_url: str, db_name: str
) -> None:
    async with open_database(mongodb_url, db_name, collections=SPECS, history_size=5) as db:
        feed = db.changes
        assert feed is not None
        start = feed.position
        for n in range(12):
            await db.samples.insert_one({"_id": n, "name": str(n)})
        assert feed.history_after(start, 100) is None  # memory holds the last 5 only
        recent = feed.history_after(feed.floor, 100)
        assert recent is not None and [c.id for c in recent] == list(range(7, 12))
        replayed = await feed.read_history(start, 100)
        assert [c.id for c in replayed] == list(range(12))
        assert [c.position for c in replayed[7:]] == [c.position for c in recent]
        middle = Position.parse(replayed[3].position)
        assert [c.id for c in await feed.read_history(middle, 4)] == [4, 5, 6, 7]
    # (A position older than the oplog: tests/test_cluster.py, on a mongod whose oplog rolls.)


async def test_connections_resuming_from_before_the_feed_began_share_one_read(
    mongodb_url: str, db_name: str
) -> None:
    # An instance that restarts begins with an empty history, and all its clients resume from
    # before it: one read from MongoDB extends the history back for all of them.
    async with open_database(mongodb_url, db_name, collections=SPECS) as before:
        assert before.changes is not None
        start = before.changes.position
        for n in range(6):
            await before.samples.insert_one({"_id": n, "name": str(n)})
    streams_opened = []
    commands = Commands()
    commands.on_started = lambda event: (
        streams_opened.append(event) if event.command_name == "aggregate" else None
    )
    options = {"event_listeners": [commands]}
    async with open_database(
        mongodb_url, db_name, collections=SPECS, history_size=10, client_options=options
    ) as db:
        feed = db.changes
        assert feed is not None and feed.history_after(start, 100) is None
        opened = len(streams_opened)
        reached = []

        async def resume() -> None:
            reached.append(await feed.reach_back(start))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(resume)
        assert reached == [True] * 20
        assert len(streams_opened) - opened == 1
        back = feed.history_after(start, 100)
        assert back is not None and [c.id for c in back] == list(range(6))
    async with open_database(mongodb_url, db_name, collections=SPECS, history_size=4) as small:
        # No room for the six: the history stays as it was, and a catch-up reads on its own.
        assert small.changes is not None
        assert await small.changes.reach_back(start) is False
        assert small.changes.history_after(start, 100) is None
        assert [c.id for c in await small.changes.read_history(start, 100)] == list(range(6))


def test_positions_are_fixed_width_hex_in_commit_order() -> None:
    earlier, later = Position(0x6B0F4AEC, 3, 1), Position(0x6B0F4AEC, 3, 2)
    assert str(earlier) == "6b0f4aec00000003000001" and str(earlier) < str(later)
    assert Position.parse(str(later)) == later
    for garbage in ("", "zz", "6b0f4aec00000003", "6B0F4AEC00000003000001", "x" * 22):
        with pytest.raises(ValueError):
            Position.parse(garbage)


async def test_a_failing_subscriber_does_not_fail_the_write(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(changes: Sequence[Change]) -> None:
        raise RuntimeError("subscriber bug")

    assert db.changes is not None
    db.changes.subscribe(broken)
    assert (await db.samples.insert_one({"_id": 1}))["_id"] == 1
    assert await db.samples.count_documents({}) == 1
    assert "a change subscriber failed" in caplog.text


async def test_a_standalone_mongod_is_refused_with_the_reason(tmp_path: Any) -> None:
    port = closed_port()
    mongod = await trio.lowlevel.open_process(
        [str(find_mongod()), "--dbpath", str(tmp_path), "--bind_ip", "127.0.0.1",
         "--port", str(port), "--logpath", str(tmp_path / "log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"mongodb://127.0.0.1:{port}/"
        with pytest.raises(DatabaseError, match="needs a replica set"):
            async with open_database(url, "vtrio", collections=SPECS, timeout=10):
                pytest.fail("a standalone mongod has no change streams")
    finally:
        mongod.terminate()
        with trio.CancelScope(shield=True):
            await mongod.wait()


# ---- the worker threads ---------------------------------------------------------------------


async def test_calls_one_at_a_time_go_to_the_thread_that_went_idle_last(
    db: Database, commands: Commands
) -> None:
    """One call at a time, one thread takes them all (the thread likeliest to be awake still),
    not each thread in turn; a call made while that thread is busy goes to another at once."""
    await db.samples.insert_one({"_id": "s", "name": "s"})
    finds: list[str] = []

    def record(event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find":
            finds.append(threading.current_thread().name)

    commands.on_started = record
    for _ in range(20):
        assert await db.samples.find_one({"_id": "s"}) == {"_id": "s", "name": "s"}
    assert len(finds) == 20 and len(set(finds)) == 1, finds

    sent, proceed = hold_inserts(commands)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.samples.insert_one, {"_id": "held"})
        assert await trio.to_thread.run_sync(sent.wait, 5)
        with trio.fail_after(5):  # served by another thread while the insert is held
            assert await db.samples.find_one({"_id": "s"}) == {"_id": "s", "name": "s"}
        proceed.set()
    assert await db.samples.find_one({"_id": "held"}) == {"_id": "held"}


# ---- coalescing -----------------------------------------------------------------------------


async def test_concurrent_finds_by_id_are_one_command_each_caller_its_own_answer(
    one_worker: Database, commands: Commands
) -> None:
    db = one_worker
    await db.samples.insert_many([{"_id": n, "name": str(n)} for n in range(50)])
    found: dict[int, Any] = {}

    async def find(n: int) -> None:
        found[n] = await db.samples.find_one({"_id": n % 60})

    commands.names.clear()
    async with trio.open_nursery() as nursery:
        for n in range(120):
            nursery.start_soon(find, n)
    assert found == {n: ({"_id": n % 60, "name": str(n % 60)} if n % 60 < 50 else None)
                     for n in range(120)}  # fmt: skip
    assert found[0] is not found[60]  # one caller's document is not another's
    assert 1 <= commands.names.count("find") <= 10  # 120 calls, a few commands


async def test_the_metrics_say_what_each_job_served_and_how_long_it_waited(
    mongodb_url: str, db_name: str
) -> None:
    metrics = Metrics()
    async with open_database(
        mongodb_url, db_name, collections=SPECS, workers=1, metrics=metrics
    ) as db:
        await db.samples.insert_one({"_id": "s", "name": "s"})  # one job, one call, fenced
        async with trio.open_nursery() as nursery:
            for _ in range(60):
                nursery.start_soon(db.samples.find_one, {"_id": "s"})

    def value(name: str) -> float:
        sample = metrics.registry.get_sample_value(name)
        assert sample is not None, name
        return sample

    jobs = value("vtrio_mongodb_job_calls_count")
    assert value("vtrio_mongodb_job_calls_sum") >= 61  # the index check's calls are jobs too
    assert jobs < 61 - 40  # the 60 finds went in a few coalesced jobs
    assert value("vtrio_mongodb_queue_seconds_count") == jobs
    assert value("vtrio_mongodb_job_seconds_count") == jobs
    assert value("vtrio_mongodb_job_seconds_sum") > 0
    assert value("vtrio_write_fence_seconds_count") == 1  # the insert waited for its change


async def test_concurrent_inserts_are_one_command_and_a_duplicate_fails_its_caller_only(
    one_worker: Database, commands: Commands
) -> None:
    db = one_worker
    await db.samples.insert_one({"_id": "taken"})
    outcomes: dict[Any, Any] = {}

    async def insert(doc_id: Any) -> None:
        try:
            outcomes[doc_id] = (await db.samples.insert_one({"_id": doc_id}))["_id"]
        except DuplicateKey as exc:
            outcomes[doc_id] = exc

    commands.names.clear()
    async with trio.open_nursery() as nursery:
        for doc_id in [*range(40), "taken", *range(40, 80)]:
            nursery.start_soon(insert, doc_id)
    assert isinstance(outcomes.pop("taken"), DuplicateKey)
    assert outcomes == {n: n for n in range(80)}
    assert await db.samples.count_documents({}) == 81
    assert commands.names.count("insert") <= 10


async def test_concurrent_updates_by_id_are_one_bulk_update_each_caller_its_own_answer(
    one_worker: Database, commands: Commands
) -> None:
    db = one_worker
    await db.samples.create_index("name", unique=True)
    await db.samples.insert_many([{"_id": n, "name": str(n), "v": 0} for n in range(40)])
    answers: dict[int, Any] = {}

    async def update(n: int) -> None:
        # Odd ones ask for a condition no document meets; 10 asks for a name another has.
        only = {"v": 0} if n % 2 == 0 else {"v": -1}
        name = {"name": "12"} if n == 10 else {}
        try:
            answers[n] = await db.samples.find_one_and_update(
                {"$and": [{"_id": n}, only]}, {"$set": {"host": f"h{n}", **name}}
            )
        except DuplicateKey as exc:
            answers[n] = exc

    commands.names.clear()
    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(update, n)
    assert isinstance(answers.pop(10), DuplicateKey)
    assert answers == {
        n: {"_id": n, "name": str(n), "v": 0, "host": f"h{n}"} if n % 2 == 0 else None
        for n in range(40) if n != 10
    }  # fmt: skip
    assert "update" in commands.names  # a bulk update went out
    assert commands.names.count("update") <= 5
    # An update of a field its filter tests is not coalesced: one findAndModify each.
    commands.names.clear()
    async with trio.open_nursery() as nursery:
        for n in range(0, 40, 2):
            nursery.start_soon(db.samples.find_one_and_update,
                               {"_id": n, "v": 0}, {"$set": {"v": 1}})  # fmt: skip
    assert commands.names.count("findAndModify") == 20
    assert await db.samples.count_documents({"v": 1}) == 20


async def test_coalesced_updates_that_change_their_documents_take_them_from_the_feed(
    one_worker: Database, commands: Commands, mongodb_url: str, db_name: str
) -> None:
    db = one_worker
    await db.samples.insert_many([{"_id": n, "name": str(n), "v": 0} for n in range(40)])

    async def update_all(value: Callable[[int], int]) -> dict[int, Any]:
        answers: dict[int, Any] = {}

        async def update(n: int) -> None:
            answers[n] = await db.samples.find_one_and_update(
                {"_id": n}, {"$set": {"v": value(n)}}, projection=["v"]
            )

        commands.names.clear()
        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(update, n)
        assert answers == {n: {"_id": n, "v": value(n)} for n in range(40)}
        assert "update" in commands.names  # coalesced into bulk updates
        return answers

    # Every update changed its document: each comes from the feed, none read back.
    await update_all(lambda n: n + 1)
    assert "find" not in commands.names
    assert db.changes is not None
    assert db.changes.document("samples", 0) is None  # nothing kept once no writer waits
    # Half change nothing (no change event): the lot is read back.
    await update_all(lambda n: n + 1 if n % 2 else n + 2)
    assert "find" in commands.names
    # Another program turned post-images off: the changes carry no document to take.
    with pymongo.MongoClient(mongodb_url) as other:
        other[db_name].command(
            "collMod", "samples", changeStreamPreAndPostImages={"enabled": False}
        )
    await update_all(lambda n: n + 3)
    assert "find" in commands.names


# ---- errors ---------------------------------------------------------------------------------


async def test_a_duplicate_key_raises_and_changes_nothing(db: Database, recorder: Recorder) -> None:
    await db.samples.create_index("name", unique=True, name="unique_name")
    await db.samples.insert_one({"_id": 1, "name": "a"})
    await db.samples.insert_one({"_id": 2, "name": "b"})
    with pytest.raises(DuplicateKey) as info:
        await db.samples.insert_one({"name": "a"})
    assert isinstance(info.value.__cause__, DuplicateKeyError | OperationFailure)
    assert info.value.index == "unique_name" and info.value.key == {"name": "a"}
    assert "name='a'" in str(info.value) and "'unique_name'" in str(info.value)
    with pytest.raises(DuplicateKey):
        await db.samples.update_one({"_id": 2}, {"$set": {"name": "a"}})
    with pytest.raises(DuplicateKey):
        await db.samples.replace_one({"_id": 3}, {"name": "b"}, upsert=True)
    assert await db.samples.find_one({"_id": 2}) == {"_id": 2, "name": "b"}
    assert len(recorder.changes) == 2  # the two inserts


async def test_insert_many_keeps_the_documents_before_a_failure(db: Database) -> None:
    await db.samples.create_index("name", unique=True)
    await db.samples.insert_one({"_id": 1, "name": "a"})
    with pytest.raises(DuplicateKey):
        await db.samples.insert_many([{"_id": 2, "name": "b"}, {"name": "a"}, {"name": "c"}])
    assert await db.samples.distinct("name") == ["a", "b"]


async def test_a_validation_failure_raises_and_changes_nothing(db: Database) -> None:
    validator = {"$jsonSchema": {"bsonType": "object", "required": ["name"]}}
    checked = await db.create_collection("checked", validator=validator)
    with pytest.raises(DocumentInvalid) as info:
        await checked.insert_one({"x": 1})
    assert "missing: name" in str(info.value)
    await checked.insert_one({"_id": 1, "name": "ok"})
    with pytest.raises(DocumentInvalid):
        await checked.update_one({"_id": 1}, {"$unset": {"name": ""}})
    assert await checked.find({}) == [{"_id": 1, "name": "ok"}]


async def test_reads_pass_through(db: Database) -> None:
    await db.things.insert_many([{"_id": i, "kind": i % 2} for i in range(6)])
    page = await db.things.find({"kind": 0}, ["kind"], sort=[("_id", -1)], skip=1, limit=2)
    assert page == [{"_id": 2, "kind": 0}, {"_id": 0, "kind": 0}]
    assert await db.things.find_one({"_id": 5}, {"_id": False}) == {"kind": 1}
    assert await db.things.count_documents({"kind": 1}) == 3
    assert sorted(await db.things.distinct("kind")) == [0, 1]
    grouped = await db.things.aggregate(
        [{"$group": {"_id": "$kind", "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}]
    )
    assert grouped == [{"_id": 0, "n": 3}, {"_id": 1, "n": 3}]
    assert await db.things.create_index("kind") == "kind_1"
    assert "kind_1" in await db.things.index_information()
    assert (await db.command("ping"))["ok"] == 1


async def test_other_refusals_are_database_errors(db: Database) -> None:
    with pytest.raises(DatabaseError) as info:
        await db.things.find({"$nonsense": 1})
    assert isinstance(info.value.__cause__, OperationFailure)
    with pytest.raises(ValueError, match=r"\$ operators"):
        await db.things.update_one({}, {"name": "not an update"})


async def test_an_operation_past_the_timeout_raises_database_timeout(
    mongodb_url: str, db_name: str
) -> None:
    async with open_database(mongodb_url, db_name, collections=SPECS, timeout=0.3) as db:
        await db.things.insert_one({"_id": 1})
        with pytest.raises(DatabaseTimeout, match=r"within the 0\.3 s timeout"):
            await db.things.find({"$where": "sleep(1000) || true"})
        assert await db.things.count_documents({}) == 1  # the client is still usable


async def test_an_unreachable_server_raises_promptly_naming_the_url_without_password() -> None:
    port = closed_port()
    url = f"mongodb://vtrio:s3cret@127.0.0.1:{port}/?authSource=admin"
    start = trio.current_time()
    with pytest.raises(DatabaseUnavailable) as info:
        async with open_database(url, "vtrio", collections=SPECS, timeout=0.5):
            pytest.fail("connected to a closed port")
    assert trio.current_time() - start < 2
    message = str(info.value)
    assert f"mongodb://vtrio:***@127.0.0.1:{port}/" in message
    assert "s3cret" not in message
    assert isinstance(info.value.__cause__, ServerSelectionTimeoutError)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("mongodb://u:p@h:1/db", "mongodb://u:***@h:1/db"),
        ("mongodb+srv://u:p%40ss@h/db?w=1", "mongodb+srv://u:***@h/db?w=1"),
        ("mongodb://u@h", "mongodb://u@h"),
        ("mongodb://h:1/?authSource=a@b", "mongodb://h:1/?authSource=a@b"),
        ("mongodb://h", "mongodb://h"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_collection_spec_takes_top_level_fields_and_always_keeps_the_id() -> None:
    assert CollectionSpec(projection=["name"]).projection == ("_id", "name")
    assert CollectionSpec().projection is None
    for bad in (["a.b"], ["$x"], [""]):
        with pytest.raises(ValueError, match="top-level"):
            CollectionSpec(projection=bad)
    with pytest.raises(TypeError):
        CollectionSpec(projection="name")


@pytest.mark.parametrize(
    ("projection", "expected"),
    [
        (None, {"_id": 1, "a": 1, "b": 2}),
        (["a"], {"_id": 1, "a": 1}),
        ({"a": True, "_id": False}, {"a": 1}),
        ({"b": 0}, {"_id": 1, "a": 1}),
        ({"_id": 1}, {"_id": 1}),
    ],
)
async def test_find_one_and_update_applies_the_callers_projection(
    db: Database, projection: Any, expected: dict[str, Any]
) -> None:
    await db.samples.insert_one({"_id": 1, "a": 0, "b": 2, "name": "n"})
    returned = await db.samples.find_one_and_update(
        {"_id": 1}, {"$set": {"a": 1}, "$unset": {"name": ""}}, projection=projection
    )
    assert returned == expected


@pytest.mark.parametrize("upsert", [False, True])
async def test_find_one_and_update_takes_a_sort(db: Database, upsert: bool) -> None:
    await db.jobs.insert_many([{"_id": i, "state": "waiting", "at": -i} for i in range(3)])
    for expected in (2, 1, 0):
        claimed = await db.jobs.find_one_and_update(
            {"state": "waiting"}, {"$set": {"state": "running"}}, sort=[("at", 1)], upsert=upsert
        )
        assert claimed is not None and claimed["_id"] == expected


# ---- cancellation ---------------------------------------------------------------------------


def hold_inserts(commands: Commands) -> tuple[threading.Event, threading.Event]:
    """Make the next ``insert`` command wait in its thread: (sent, proceed)."""
    sent, proceed = threading.Event(), threading.Event()

    def hold(event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert":
            commands.on_started = None
            sent.set()
            proceed.wait(10)

    commands.on_started = hold
    return sent, proceed


async def test_a_write_cancelled_once_sent_completes_then_raises_cancelled(
    db: Database, recorder: Recorder, commands: Commands
) -> None:
    sent, proceed = hold_inserts(commands)
    seen: dict[str, Any] = {}

    async def writer(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await db.samples.insert_one({"_id": "late", "name": "L"})
            except trio.Cancelled:  # (a blocking look, on purpose: no checkpoint here)
                seen["in MongoDB when cancelled"] = db.client[db.name].samples.find_one()
                raise
        seen["cancelled"] = scope.cancelled_caught

    async with trio.open_nursery() as nursery:
        scope = await nursery.start(writer)
        assert await trio.to_thread.run_sync(sent.wait, 5)
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert seen == {}, "the write returned before MongoDB acknowledged it"
        proceed.set()
    assert seen == {"in MongoDB when cancelled": {"_id": "late", "name": "L"}, "cancelled": True}
    await recorder.wait_for(1)  # and its change is on the feed, as any write's
    assert recorder.changes[0].id == "late"


async def test_a_write_cancelled_before_it_is_sent_does_nothing(
    one_worker: Database, commands: Commands
) -> None:
    db = one_worker
    sent, proceed = hold_inserts(commands)  # the one worker is busy with this insert
    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.samples.insert_one, {"_id": "first"})
        assert await trio.to_thread.run_sync(sent.wait, 5)
        with trio.move_on_after(0.1) as scope:
            await db.samples.update_one({"_id": "first"}, {"$set": {"never": True}})
        proceed.set()
    assert scope.cancelled_caught
    assert await db.samples.find_one({"_id": "first"}) == {"_id": "first"}


async def test_a_cancelled_read_returns_at_once(mongodb_url: str, db_name: str) -> None:
    async with open_database(mongodb_url, db_name, collections=SPECS, timeout=1.0) as db:
        await db.things.insert_one({"_id": 1})
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await db.things.find({"$where": "sleep(5000) || true"})
        assert scope.cancelled_caught
        assert trio.current_time() - start < 0.8  # not the 1 s timeout, nor the 5 s sleep
        assert await db.things.count_documents({}) == 1


async def test_a_write_held_past_the_stop_deadline_is_released(
    mongodb_url: str, db_name: str, commands: Commands
) -> None:
    stopping = Stopping(30)
    async with open_database(
        mongodb_url, db_name, collections=SPECS, stopping=stopping,
        client_options={"event_listeners": [commands]},
    ) as db:  # fmt: skip
        sent, proceed = hold_inserts(commands)
        outcome: dict[str, Any] = {}

        async def writer() -> None:
            with trio.CancelScope() as scope:
                outcome["scope"] = scope
                try:
                    await db.samples.insert_one({"_id": "held"})
                except DatabaseUnavailable as exc:
                    outcome["error"] = exc

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                assert await trio.to_thread.run_sync(sent.wait, 5)
                outcome["scope"].cancel()  # the write holds its caller...
                await trio.testing.wait_all_tasks_blocked()
                assert "error" not in outcome
                stopping.hurry()  # ...until the stop's deadline, here at once
        finally:
            proceed.set()
    assert "may or may not have been applied" in str(outcome["error"])


# ---- concurrency with other writers ----------------------------------------------------------


async def test_update_many_updates_only_what_matches_when_it_runs(db: Database) -> None:
    await db.things.insert_many([{"_id": i, "group": 1} for i in range(5)])
    result = await db.things.update_many({"group": 1}, {"$inc": {"v": 1}})
    assert (result.matched_count, result.modified_count) == (5, 5)
    assert await db.things.count_documents({"v": 1}) == 5
    upserted = await db.things.update_many({"group": 2}, {"$set": {"v": 0}}, upsert=True)
    assert upserted.upserted_id is not None


async def test_the_pool_and_timeout_reach_pymongo(mongodb_url: str, db_name: str) -> None:
    async with open_database(mongodb_url, db_name, collections=SPECS, workers=7) as db:
        assert isinstance(db.client, pymongo.MongoClient)
        assert db.client.options.pool_options.max_pool_size == 7 + 2
        assert db.client.options.timeout == 10.0

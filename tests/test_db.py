"""vtrio.db against the session's real mongod: dispatching, errors, cancellation, round trips."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pymongo
import pytest
import trio
from pymongo import monitoring
from pymongo.errors import DuplicateKeyError, OperationFailure, ServerSelectionTimeoutError

from vtrio.db import (
    CollectionSpec,
    Database,
    DatabaseError,
    DatabaseTimeout,
    DatabaseUnavailable,
    DocumentInvalid,
    DuplicateKey,
    mask_url,
    open_database,
)

SPECS = {
    "samples": CollectionSpec(projection=["name", "ready"]),
    "users": CollectionSpec(silent=True),
}

Message = tuple[str, str, Any]


class Recorder:
    """A dispatch function that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.subjects: list[Any] = []

    def __call__(self, interface: str, operation: str, data: Any, subject: Any) -> None:
        self.messages.append((interface, operation, data))
        self.subjects.append(subject)


class Commands(monitoring.CommandListener):
    """Records the name of every command sent; ``on_started`` runs in the sending thread."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.on_started: Callable[[monitoring.CommandStartedEvent], None] | None = None

    def started(self, event: monitoring.CommandStartedEvent) -> None:
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
        mongodb_url,
        db_name,
        dispatch=recorder,
        collections=SPECS,
        client_options={"event_listeners": [commands]},
    ) as database:
        yield database


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- dispatching ----------------------------------------------------------------------------


async def test_insert_one_returns_a_copy_and_dispatches_the_projected_document(
    db: Database, recorder: Recorder
) -> None:
    original = {"name": "A", "ready": False, "secret": 1}
    inserted = await db.samples.insert_one(original)
    assert "_id" not in original
    assert inserted == {**original, "_id": inserted["_id"]}
    assert recorder.messages == [
        ("samples", "insert", {"id": inserted["_id"], "name": "A", "ready": False})
    ]
    assert await db.samples.find_one({"_id": inserted["_id"]}) == inserted


async def test_every_write_dispatches_in_order(db: Database, recorder: Recorder) -> None:
    samples = db.samples
    await samples.insert_many(
        [{"_id": 1, "name": "a", "n": 0}, {"_id": 2, "name": "b", "n": 0}, {"_id": 3, "name": "c"}]
    )
    assert await samples.update_one({"_id": 1}, {"$set": {"ready": True}}) == {
        "_id": 1,
        "name": "a",
        "ready": True,
    }
    returned = await samples.find_one_and_update({"_id": 2}, {"$inc": {"n": 5}}, projection=["n"])
    assert returned == {"_id": 2, "n": 5}
    assert await samples.replace_one({"_id": 3}, {"name": "C", "n": 9}) == {"_id": 3, "name": "C"}
    result = await samples.update_many({"n": {"$gte": 0}}, {"$set": {"ready": False}})
    assert (result.matched_count, result.modified_count, sorted(result.ids)) == (3, 3, [1, 2, 3])
    assert await samples.delete_one({"_id": 1}) == 1
    assert await samples.delete_one({"_id": 1}) is None
    assert sorted(await samples.delete_many({})) == [2, 3]

    messages = recorder.messages
    assert messages[:6] == [
        ("samples", "insert", {"id": 1, "name": "a"}),
        ("samples", "insert", {"id": 2, "name": "b"}),
        ("samples", "insert", {"id": 3, "name": "c"}),
        ("samples", "update", {"id": 1, "name": "a", "ready": True}),
        ("samples", "update", {"id": 2, "name": "b"}),
        ("samples", "update", {"id": 3, "name": "C"}),
    ]
    assert sorted(messages[6:9], key=lambda m: m[2]["id"]) == [
        ("samples", "update", {"id": 1, "name": "a", "ready": False}),
        ("samples", "update", {"id": 2, "name": "b", "ready": False}),
        ("samples", "update", {"id": 3, "name": "C", "ready": False}),
    ]
    assert messages[9] == ("samples", "delete", [1])
    assert messages[10][:2] == ("samples", "delete") and sorted(messages[10][2]) == [2, 3]
    assert len(messages) == 11


async def test_an_upsert_that_inserts_is_an_insert(db: Database, recorder: Recorder) -> None:
    samples = db.samples
    await samples.update_one({"_id": "u"}, {"$set": {"name": "U"}}, upsert=True)
    await samples.update_one({"_id": "u"}, {"$set": {"name": "V"}}, upsert=True)
    await samples.replace_one({"_id": "r"}, {"name": "R"}, upsert=True)
    await samples.replace_one({"_id": "r"}, {"name": "S"}, upsert=True)
    found = await samples.find_one_and_update(
        {"_id": "f"}, {"$set": {"name": "F", "x": 1}}, upsert=True
    )
    assert found == {"_id": "f", "name": "F", "x": 1}
    inserted = await samples.update_many({"name": "M"}, {"$set": {"ready": True}}, upsert=True)
    assert inserted.matched_count == 0 and inserted.upserted_id is not None
    updated = await samples.update_many({"name": "M"}, {"$set": {"ready": False}}, upsert=True)
    assert updated.matched_count == 1 and updated.upserted_id is None
    mid = inserted.upserted_id
    assert recorder.messages == [
        ("samples", "insert", {"id": "u", "name": "U"}),
        ("samples", "update", {"id": "u", "name": "V"}),
        ("samples", "insert", {"id": "r", "name": "R"}),
        ("samples", "update", {"id": "r", "name": "S"}),
        ("samples", "insert", {"id": "f", "name": "F"}),
        ("samples", "insert", {"id": mid, "name": "M", "ready": True}),
        ("samples", "update", {"id": mid, "name": "M", "ready": False}),
    ]


async def test_silent_calls_and_silent_collections_dispatch_nothing(
    db: Database, recorder: Recorder
) -> None:
    for collection, silent in ((db.samples, True), (db.users, False)):
        await collection.insert_one({"_id": 1, "name": "a"}, silent=silent)
        await collection.insert_many([{"_id": 2}, {"_id": 3}], silent=silent)
        await collection.update_one({"_id": 1}, {"$set": {"x": 1}}, upsert=True, silent=silent)
        await collection.find_one_and_update(
            {"_id": 4}, {"$set": {"x": 1}}, upsert=True, silent=silent
        )
        await collection.replace_one({"_id": 2}, {"y": 2}, silent=silent)
        assert (
            await collection.update_many({}, {"$set": {"z": 1}}, silent=silent)
        ).matched_count == 4
        assert await collection.delete_one({"_id": 4}, silent=silent) == 4
        assert sorted(await collection.delete_many({}, silent=silent)) == [1, 2, 3]
    assert recorder.messages == []


async def test_an_undeclared_collection_dispatches_whole_documents(
    db: Database, recorder: Recorder
) -> None:
    assert db.things is db["things"]
    await db.things.insert_one({"_id": "t", "a": 1, "b": {"c": 2}})
    assert recorder.messages == [("things", "insert", {"id": "t", "a": 1, "b": {"c": 2}})]


async def test_a_failing_dispatcher_does_not_fail_the_write(
    mongodb_url: str, db_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(interface: str, operation: str, data: Any, subject: Any) -> None:
        raise RuntimeError("dispatcher bug")

    async with open_database(mongodb_url, db_name, dispatch=broken) as db:
        assert (await db.things.insert_one({"_id": 1}))["_id"] == 1
        assert await db.things.count_documents({}) == 1
    assert "dispatching things insert failed" in caplog.text


# ---- reads ----------------------------------------------------------------------------------


async def test_reads_pass_through(db: Database, recorder: Recorder) -> None:
    await db.things.insert_many([{"_id": i, "kind": i % 2} for i in range(6)], silent=True)
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
    assert recorder.messages == []


# ---- errors ---------------------------------------------------------------------------------


async def test_a_duplicate_key_raises_and_dispatches_nothing(
    db: Database, recorder: Recorder
) -> None:
    await db.samples.create_index("name", unique=True, name="unique_name")
    await db.samples.insert_one({"_id": 1, "name": "a"}, silent=True)
    await db.samples.insert_one({"_id": 2, "name": "b"}, silent=True)
    with pytest.raises(DuplicateKey) as info:
        await db.samples.insert_one({"name": "a"})
    assert isinstance(info.value.__cause__, DuplicateKeyError)
    assert info.value.index == "unique_name" and info.value.key == {"name": "a"}
    assert "name='a'" in str(info.value) and "'unique_name'" in str(info.value)
    with pytest.raises(DuplicateKey):
        await db.samples.update_one({"_id": 2}, {"$set": {"name": "a"}})
    with pytest.raises(DuplicateKey):
        await db.samples.replace_one({"_id": 3}, {"name": "b"}, upsert=True)
    assert recorder.messages == []
    assert await db.samples.find_one({"_id": 2}) == {"_id": 2, "name": "b"}


async def test_insert_many_dispatches_the_documents_inserted_before_a_failure(
    db: Database, recorder: Recorder
) -> None:
    await db.samples.create_index("name", unique=True)
    await db.samples.insert_one({"_id": 1, "name": "a"}, silent=True)
    with pytest.raises(DuplicateKey):
        await db.samples.insert_many([{"_id": 2, "name": "b"}, {"name": "a"}, {"name": "c"}])
    assert recorder.messages == [("samples", "insert", {"id": 2, "name": "b"})]
    assert await db.samples.distinct("name") == ["a", "b"]


async def test_update_many_refused_midway_dispatches_the_selected_documents_as_they_are(
    db: Database, recorder: Recorder
) -> None:
    # MongoDB keeps the updates made before the failing document, and does not say which.
    await db.samples.create_index("name", unique=True)
    await db.samples.insert_many([{"_id": i, "name": str(i)} for i in range(3)], silent=True)
    with pytest.raises(DuplicateKey):
        await db.samples.update_many({}, {"$set": {"name": "same"}})
    assert recorder.messages == [
        ("samples", "update", {"id": 0, "name": "same"}),
        ("samples", "update", {"id": 1, "name": "1"}),
        ("samples", "update", {"id": 2, "name": "2"}),
    ]


async def test_a_validation_failure_raises_and_dispatches_nothing(
    db: Database, recorder: Recorder
) -> None:
    validator = {"$jsonSchema": {"bsonType": "object", "required": ["name"]}}
    checked = await db.create_collection("checked", validator=validator)
    with pytest.raises(DocumentInvalid) as info:
        await checked.insert_one({"x": 1})
    assert isinstance(info.value.__cause__, OperationFailure)
    assert "missing: name" in str(info.value)
    await checked.insert_one({"_id": 1, "name": "ok"}, silent=True)
    with pytest.raises(DocumentInvalid):
        await checked.update_one({"_id": 1}, {"$unset": {"name": ""}})
    assert recorder.messages == []
    assert await checked.find({}) == [{"_id": 1, "name": "ok"}]


async def test_other_refusals_are_database_errors(db: Database) -> None:
    with pytest.raises(DatabaseError) as info:
        await db.things.find({"$nonsense": 1})
    assert isinstance(info.value.__cause__, OperationFailure)
    with pytest.raises(ValueError, match=r"\$ operators"):
        await db.things.update_one({}, {"name": "not an update"})


async def test_an_operation_past_the_timeout_raises_database_timeout(
    mongodb_url: str, db_name: str
) -> None:
    async with open_database(mongodb_url, db_name, dispatch=Recorder(), timeout=0.3) as db:
        await db.things.insert_one({"_id": 1})
        with pytest.raises(DatabaseTimeout, match=r"within the 0\.3 s timeout"):
            await db.things.find({"$where": "sleep(1000) || true"})
        assert await db.things.count_documents({}) == 1  # the client is still usable


async def test_an_unreachable_server_raises_promptly_naming_the_url_without_password() -> None:
    port = closed_port()
    url = f"mongodb://vtrio:s3cret@127.0.0.1:{port}/?authSource=admin"
    start = trio.current_time()
    with pytest.raises(DatabaseUnavailable) as info:
        async with open_database(url, "vtrio", dispatch=Recorder(), timeout=0.5):
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
        ({}, {"_id": 1, "a": 1, "b": 2}),
    ],
)
async def test_find_one_and_update_applies_the_callers_projection(
    db: Database, recorder: Recorder, projection: Any, expected: dict[str, Any]
) -> None:
    await db.samples.insert_one({"_id": 1, "a": 0, "b": 2, "name": "n"}, silent=True)
    returned = await db.samples.find_one_and_update(
        {"_id": 1}, {"$set": {"a": 1}, "$unset": {"name": ""}}, projection=projection
    )
    assert returned == expected
    assert recorder.messages == [("samples", "update", {"id": 1})]


@pytest.mark.parametrize("upsert", [False, True])
async def test_find_one_and_update_takes_a_sort(db: Database, upsert: bool) -> None:
    await db.jobs.insert_many([{"_id": i, "state": "waiting", "at": -i} for i in range(3)])
    for expected in (2, 1, 0):
        claimed = await db.jobs.find_one_and_update(
            {"state": "waiting"}, {"$set": {"state": "running"}}, sort=[("at", 1)], upsert=upsert
        )
        assert claimed is not None and claimed["_id"] == expected


# ---- cancellation ---------------------------------------------------------------------------


async def test_a_write_cancelled_once_sent_completes_dispatches_then_raises_cancelled(
    db: Database, recorder: Recorder, commands: Commands
) -> None:
    sent, proceed = threading.Event(), threading.Event()

    def hold(event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert":
            sent.set()
            proceed.wait(5)

    commands.on_started = hold
    seen: dict[str, Any] = {}

    async def writer(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await db.samples.insert_one({"_id": "late", "name": "L"})
            except trio.Cancelled:
                seen["messages when cancelled"] = list(recorder.messages)
                raise
        seen["cancelled"] = scope.cancelled_caught

    async with trio.open_nursery() as nursery:
        scope = await nursery.start(writer)
        assert await trio.to_thread.run_sync(sent.wait, 5)
        scope.cancel()
        await trio.sleep(0.1)
        assert seen == {}, "the write returned before MongoDB acknowledged it"
        commands.on_started = None
        proceed.set()

    message = ("samples", "insert", {"id": "late", "name": "L"})
    assert seen == {"messages when cancelled": [message], "cancelled": True}
    assert await db.samples.find_one({"_id": "late"}) == {"_id": "late", "name": "L"}


async def test_a_write_cancelled_before_it_is_sent_does_nothing(
    db: Database, recorder: Recorder
) -> None:
    limiter = db.limiter
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for holder in holders:
        await limiter.acquire_on_behalf_of(holder)
    with trio.move_on_after(0.1) as scope:
        await db.samples.insert_one({"_id": "never"})
    for holder in holders:
        limiter.release_on_behalf_of(holder)
    assert scope.cancelled_caught
    assert recorder.messages == []
    assert await db.samples.count_documents({}) == 0


async def test_a_cancelled_read_returns_at_once_and_its_thread_ends_at_the_timeout(
    mongodb_url: str, db_name: str
) -> None:
    async with open_database(
        mongodb_url, db_name, dispatch=Recorder(), pool_size=1, timeout=1.0
    ) as db:
        await db.things.insert_one({"_id": 1}, silent=True)
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await db.things.find({"$where": "sleep(5000) || true"})
        assert scope.cancelled_caught
        assert trio.current_time() - start < 0.8  # not the 1 s timeout, nor the 5 s sleep
        assert db.limiter.borrowed_tokens == 1  # the abandoned thread still runs
        with trio.fail_after(3):
            async with db.limiter:  # free once pymongo's timeout has ended the thread
                assert trio.current_time() - start < 2.5
        assert await db.things.count_documents({}) == 1


# ---- round trips and concurrent changes -----------------------------------------------------


async def test_update_many_and_delete_many_round_trips_do_not_grow_with_n(
    db: Database, recorder: Recorder, commands: Commands
) -> None:
    trips: dict[int, tuple[list[str], list[str]]] = {}
    for n in (1, 500):
        things = db[f"things_{n}"]
        await things.insert_many([{"group": 1, "v": i} for i in range(n)], silent=True)
        commands.names.clear()
        result = await things.update_many({"group": 1}, {"$inc": {"v": 1}})
        updates = list(commands.names)
        commands.names.clear()
        deleted = await things.delete_many({"group": 1})
        trips[n] = (updates, list(commands.names))
        assert result.matched_count == result.modified_count == len(deleted) == n
    assert trips[1] == trips[500] == (["find", "update", "find"], ["find", "delete"])
    assert len(recorder.messages) == 1 + 1 + 500 + 1


async def test_update_many_leaves_documents_that_start_matching_meanwhile(
    db: Database, recorder: Recorder, commands: Commands
) -> None:
    await db.things.insert_many([{"_id": i, "flag": True} for i in range(3)], silent=True)
    other = db.client[db.name].things

    def interfere(event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "update":
            commands.on_started = None
            other.insert_one({"_id": 9, "flag": True})
            other.update_one({"_id": 0}, {"$set": {"flag": False}})

    commands.on_started = interfere
    result = await db.things.update_many({"flag": True}, {"$set": {"seen": True}})
    assert (result.matched_count, result.ids) == (2, [0, 1, 2])
    assert await db.things.find({"seen": True}, ["_id"]) == [{"_id": 1}, {"_id": 2}]
    assert [data for _, _, data in recorder.messages] == [
        {"id": 0, "flag": False},
        {"id": 1, "flag": True, "seen": True},
        {"id": 2, "flag": True, "seen": True},
    ]


async def test_delete_many_reports_only_the_documents_it_removed(
    db: Database, recorder: Recorder, commands: Commands
) -> None:
    await db.things.insert_many([{"_id": i, "flag": True} for i in range(5)], silent=True)
    other = db.client[db.name].things

    def interfere(event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "delete":
            commands.on_started = None
            other.update_one({"_id": 0}, {"$set": {"flag": False}})

    commands.on_started = interfere
    commands.names.clear()
    assert await db.things.delete_many({"flag": True}) == [1, 2, 3, 4]
    assert commands.names == ["find", "delete", "update", "find"]  # "update": the interference
    assert recorder.messages == [("things", "delete", [1, 2, 3, 4])]
    assert await db.things.find({}) == [{"_id": 0, "flag": False}]


async def test_the_pool_size_and_timeout_reach_pymongo(mongodb_url: str, db_name: str) -> None:
    async with open_database(mongodb_url, db_name, dispatch=Recorder(), pool_size=7) as db:
        assert db.limiter.total_tokens == 7
        assert isinstance(db.client, pymongo.MongoClient)
        assert db.client.options.pool_options.max_pool_size == 7
        assert db.client.options.timeout == 10.0


async def test_deletes_send_ids_and_give_rules_the_removed_documents(
    db: Database, recorder: Recorder
) -> None:
    await db.things.insert_many([{"_id": n, "owner": f"u{n}", "secret": "x"} for n in range(3)])
    assert await db.things.delete_one({"_id": 0}) == 0
    assert sorted(await db.things.delete_many({"_id": {"$gt": 0}})) == [1, 2]
    deletes = [m for m in recorder.messages if m[1] == "delete"]
    assert [sorted(m[2]) for m in deletes] == [[0], [1, 2]]
    subjects = recorder.subjects[-2:]
    assert subjects[0] == [{"id": 0, "owner": "u0", "secret": "x"}]
    assert sorted(subjects[1], key=lambda d: d["id"]) == [
        {"id": 1, "owner": "u1", "secret": "x"},
        {"id": 2, "owner": "u2", "secret": "x"},
    ]


async def test_an_update_many_that_times_out_after_committing_still_tells_the_clients(
    mongodb_url: str, db_name: str
) -> None:
    commands, recorder = Commands(), Recorder()
    async with open_database(
        mongodb_url,
        db_name,
        dispatch=recorder,
        timeout=0.5,
        client_options={"event_listeners": [commands]},
    ) as db:
        await db.things.insert_many([{"_id": n, "v": 0} for n in range(3)], silent=True)

        def stall_the_read_back(event: monitoring.CommandStartedEvent) -> None:
            if event.command_name == "find" and "update" in commands.names:
                time.sleep(0.6)  # past the whole call's deadline: the read-back times out

        commands.on_started = stall_the_read_back
        with pytest.raises(DatabaseUnavailable):
            await db.things.update_many({}, {"$set": {"v": 1}})
        commands.on_started = None
        assert await db.things.count_documents({"v": 1}) == 3  # committed
    # ... and each client hears the documents changed, and reloads them.
    assert sorted(data["id"] for _, operation, data in recorder.messages) == [0, 1, 2]
    assert all(data == {"id": data["id"]} for _, _, data in recorder.messages)

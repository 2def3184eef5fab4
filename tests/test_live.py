"""Live data end to end: MongoDB writes reach real websocket clients over loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.live import (
    RawClient,
    closed_with,
    connect,
    new_key,
    publish,
    receive_json,
    receive_messages,
    settings_for,
)
from vtrio import virtool
from vtrio.framework import (
    Change,
    CloseCode,
    Connection,
    DuplicateKey,
    Hub,
    Stopping,
    serve_listener,
)
from vtrio.server import App, open_app
from vtrio.virtool import Identity


@pytest.fixture
async def app(mongodb_url: str, db_name: str, tmp_path: Path):
    async with open_app(settings_for(mongodb_url, db_name, tmp_path)) as app:
        yield app


def mine(sample_id: str, **fields: object) -> dict[str, object]:
    """A sample alice (new_key's user) may see: hers."""
    return {"_id": sample_id, "user": "alice", **fields}


async def test_writes_reach_a_client_in_order(app: App) -> None:
    async with connect(app.url, await new_key(app), query="?batch=0") as client:
        await app.db.samples.insert_one(mine("s1", name="one"))
        await app.db.samples.update_one({"_id": "s1"}, {"$set": {"name": "uno"}})
        await app.db.samples.delete_one({"_id": "s1"})
        messages = [await receive_json(client) for _ in range(3)]
    assert [(m["interface"], m["operation"]) for m in messages] == [
        ("samples", "insert"),
        ("samples", "update"),
        ("samples", "delete"),
    ]
    assert messages[0]["data"] == {"id": "s1", "name": "one", "user": "alice"}
    assert messages[1]["data"]["name"] == "uno"
    assert messages[2]["data"] == ["s1"]
    positions = [m["position"] for m in messages]
    assert positions == sorted(positions) and len(set(positions)) == 3


async def test_writes_made_elsewhere_reach_clients(app: App) -> None:
    # Another program writing to MongoDB directly (pymongo, in a thread): its changes are
    # dispatched like the server's own.
    other = app.db.client[app.db.name].samples
    async with connect(app.url, await new_key(app), query="?batch=0") as client:
        await trio.to_thread.run_sync(other.insert_one, mine("from-elsewhere", name="x"))
        await trio.to_thread.run_sync(
            lambda: other.update_one({"_id": "from-elsewhere"}, {"$set": {"host": "h"}})
        )
        inserted, updated = await receive_json(client), await receive_json(client)
    assert (inserted["operation"], inserted["data"]["id"]) == ("insert", "from-elsewhere")
    assert (updated["operation"], updated["data"]["host"]) == ("update", "h")


async def test_silent_collections_undeclared_ones_and_failed_writes_send_nothing(
    app: App,
) -> None:
    await app.db.samples.insert_one(mine("taken"))
    async with connect(app.url, await new_key(app), query="?batch=0") as client:
        with pytest.raises(DuplicateKey):
            await app.db.samples.insert_one(mine("taken"))
        await app.db.keys.insert_one({"_id": "silent collection", "hash": "x"})
        await app.db.notes.insert_one({"_id": "not declared, not watched"})
        await app.db.samples.insert_one(mine("loud"))
        # The first message to arrive is the loud write's: nothing came before it.
        assert (await receive_json(client))["data"]["id"] == "loud"


async def test_datetimes_and_object_ids_are_strings(app: App) -> None:
    from datetime import UTC, datetime

    async with connect(app.url, await new_key(app)) as client:
        at = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
        inserted = await app.db.samples.insert_one({"user": "alice", "created_at": at})
        message = await receive_json(client)
    assert message["data"] == {
        "id": str(inserted["_id"]),
        "user": "alice",
        "created_at": "2024-05-06T07:08:09Z",
    }


async def test_a_backlog_is_coalesced_and_batch_0_is_not(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    # Messages go straight to a socket with room; they queue, and are coalesced, only while a
    # client's socket is full. Small buffers and clients that read late make that happen.
    settings = settings_for(mongodb_url, db_name, tmp_path, send_buffer_size=4096)
    async with open_app(settings) as app:
        key = await new_key(app)
        batched = await RawClient.connect(app.url, key, receive_buffer=4096)
        plain = await RawClient.connect(app.url, key, receive_buffer=4096, query="?batch=0")
        await wait_for_clients(app, 2)
        total = 300
        for n in range(total):
            publish(app, "insert", {"id": n, "padding": "x" * 100})
            await trio.lowlevel.checkpoint()

        frames = await batched_frames(batched, total)
        assert any(isinstance(frame, list) for frame in frames)  # the backlog, coalesced
        assert isinstance(frames[0], dict)  # what fitted at once went out alone
        assert [m["data"]["id"] for m in flatten(frames)] == list(range(total))
        frames = await plain.frames(total)
        assert all(isinstance(frame, dict) for frame in frames)
        assert [m["data"]["id"] for m in frames] == list(range(total))

        publish(app, "insert", {"id": "lone"})
        assert (await batched.frames(1))[0]["data"] == {"id": "lone"}  # a plain object
        batched.close()
        plain.close()


def flatten(frames: list) -> list:
    return [m for frame in frames for m in (frame if isinstance(frame, list) else [frame])]


async def batched_frames(client: RawClient, messages: int) -> list:
    frames: list = []
    while len(flatten(frames)) < messages:
        frames.extend(await client.frames(1))
    return frames


async def wait_for_clients(app: App, count: int) -> None:
    with trio.fail_after(10):
        while len(app.hub.connections) < count:
            await trio.sleep(0.01)


async def test_stalled_client_is_closed_and_others_get_everything(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    # Small kernel buffers, so the stalled client's backlog reaches vtrio's outbox after a few
    # dozen kB instead of after many MB.
    settings = settings_for(
        mongodb_url, db_name, tmp_path, send_queue_size=50, send_buffer_size=32_768
    )
    payload = "x" * 2_000
    total = 400
    async with open_app(settings) as app:
        key = await new_key(app)
        received: dict[int, list[int]] = {n: [] for n in range(99)}
        progress = trio.lowlevel.ParkingLot()
        stalled = await RawClient.connect(app.url, key, receive_buffer=4096)
        async with trio.open_nursery() as nursery:

            async def reader(n: int, ready: trio.Event) -> None:
                async with connect(app.url, key) as websocket:
                    ready.set()
                    while len(received[n]) < total:
                        for message in await receive_messages(websocket, 1, timeout=60):
                            received[n].append(message["data"]["n"])
                        progress.unpark_all()

            for n in range(99):
                ready = trio.Event()
                nursery.start_soon(reader, n, ready)
                await ready.wait()
            await wait_for_clients(app, 100)
            with trio.fail_after(60):
                for n in range(total):
                    publish(app, "update", {"n": n, "payload": payload})
                    # The readers share this process's one thread with the server: let them
                    # keep within half an outbox of the writer (the stalled one cannot).
                    while min(map(len, received.values())) < n - 25:
                        await progress.park()
            # Every write went out while the stalled client read nothing at all: the writer
            # never waited for it. Now it reads, and finds the close code after its backlog.
            assert await stalled.close_code() == CloseCode.TOO_SLOW
        stalled.close()
        assert all(ids == list(range(total)) for ids in received.values())


async def test_no_key_wrong_key_and_revoked_key_are_closed_with_4000(app: App) -> None:
    key = await new_key(app)
    for bad in (None, "vt_wrong", "not even the format"):
        async with connect(app.url, bad) as websocket:
            publish(app, "insert", {"id": "secret"})
            assert await closed_with(websocket) == CloseCode.UNAUTHENTICATED
    async with connect(app.url, None, query=f"?token={key}") as websocket:
        await wait_for_clients(app, 1)  # a browser's token parameter works too
    key_id = (await virtool.list_keys(app.db, "alice"))[0]["id"]
    async with connect(app.url, key) as websocket:
        await wait_for_clients(app, 1)
        await virtool.revoke_key(app.db, key_id)
        assert await closed_with(websocket, timeout=10) == CloseCode.UNAUTHENTICATED
    async with connect(app.url, key) as websocket:  # the deleted key no longer opens anything
        assert await closed_with(websocket) == CloseCode.UNAUTHENTICATED


async def test_other_paths_get_404(app: App) -> None:
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(app.url.replace("/ws", "/other")):
            pass
    assert rejected.value.status_code == 404


async def test_beyond_max_connections_handshakes_get_503(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    settings = settings_for(mongodb_url, db_name, tmp_path, max_connections=2)
    async with open_app(settings) as app:
        key = await new_key(app)
        async with connect(app.url, key), connect(app.url, key):
            await wait_for_clients(app, 2)
            with pytest.raises(ConnectionRejected) as rejected:
                async with connect(app.url, key):
                    pass
            assert rejected.value.status_code == 503


async def test_broken_clients_do_not_disturb_the_others(app: App) -> None:
    key = await new_key(app)
    async with connect(app.url, key, query="?batch=0") as healthy:
        vanishing = await RawClient.connect(app.url, key)
        await wait_for_clients(app, 2)
        publish(app, "insert", {"id": "before"})
        vanishing.reset()  # killed mid-stream
        garbage = await RawClient.connect(app.url, key)
        await garbage.sock.send(b"\xff\xff\xff\xff not a websocket frame")
        assert await garbage.close_code() == 1002
        async with connect(app.url, key) as oversized:
            await oversized.send_message("x" * (app.settings.max_message_size + 1))
            assert await closed_with(oversized) == 1009
        for n in range(3):
            await app.db.samples.insert_one(mine(f"after-{n}"))
        ids = [(await receive_json(healthy))["data"]["id"] for _ in range(4)]
        assert ids == ["before", "after-0", "after-1", "after-2"]
        garbage.close()


async def test_an_exception_in_one_handler_closes_only_that_connection() -> None:
    hub, stopping = Hub({}), Stopping(5)

    async def anyone(key: str | None) -> Identity:
        return Identity("u", "u", admin=False, groups=frozenset(), key_id="k")

    def on_message(connection: Connection, message: str | bytes) -> None:
        if message == "boom":
            raise RuntimeError("a bug in handling one message")

    async with (
        hub.running(stopping),
        serve_listener(
            host="127.0.0.1",
            port=0,
            hub=hub,
            stopping=stopping,
            authenticate=anyone,
            on_message=on_message,
        ) as url,
        connect(url, "k", query="?batch=0") as healthy,
        connect(url, "k") as doomed,
    ):
        await doomed.send_message("boom")
        assert await closed_with(doomed) == CloseCode.INTERNAL_ERROR
        hub.publish([Change("notes", "insert", "still served", after={"_id": "still served"})])
        assert (await receive_json(healthy))["data"]["id"] == "still served"


async def test_silent_peer_is_closed_by_the_heartbeat(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    settings = settings_for(mongodb_url, db_name, tmp_path, heartbeat_interval=0.2)
    async with open_app(settings) as app:
        silent = await RawClient.connect(app.url, await new_key(app))  # never answers a ping
        await wait_for_clients(app, 1)
        with trio.fail_after(5):
            while app.hub.connections:
                await trio.sleep(0.05)
        silent.close()


async def test_shutdown_closes_200_clients_with_1001(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    settings = settings_for(mongodb_url, db_name, tmp_path)
    codes: list[int] = []
    async with trio.open_nursery() as clients:
        async with open_app(settings) as app:
            key = await new_key(app)

            async def client(ready: trio.Event) -> None:
                async with connect(app.url, key) as websocket:
                    ready.set()
                    codes.append(await closed_with(websocket, timeout=30))

            for _ in range(200):
                ready = trio.Event()
                clients.start_soon(client, ready)
                await ready.wait()
            await wait_for_clients(app, 200)
            started = trio.current_time()
        stopped_in = trio.current_time() - started
    assert codes == [CloseCode.GOING_AWAY] * 200
    assert stopped_in < settings.shutdown_timeout

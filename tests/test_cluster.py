"""Several vtrio instances on one replica set: every change reaches every instance's clients,
once, in commit order, with positions a client may resume from on any instance.

Real ``python -m vtrio`` processes (tests/cluster.py), real sockets, the session's mongod (or,
for the oplog and restart tests, a mongod of the test's own). What every client should have
received is derived independently of vtrio: from a change stream of the test's own and the
README's visibility rule (``cluster.expected_for``).

1. every write (RPC on each instance, or pymongo directly) reaches every instance's clients once;
2. concurrent writers on three instances: one order for every client, the last message equal to
   MongoDB's document, and each request's own change before its response;
3. resuming on another instance (from its memory or MongoDB's oplog), positions that cannot be
   served (4003), and a client closed as too slow (4002) resuming from its close reason;
4. a position the oplog no longer covers (a mongod of the test's own, 1 MB oplog): 4003;
5. read access gained and lost through another instance: inserts and deletes;
6. a job running on one instance cancelled through the other;
7. a revoked key closed on both instances (the latency is printed);
8. 1,000 clients on two instances: one change-stream cursor per instance;
9. chaos: 200 clients reset at random and resuming anywhere while writers write;
10. mongod killed and restarted under a running instance;

and what those ran into: a stream interrupted (killOp, or a quiet getMore timing out), instances
started at once on a new database, and what a coalesced update's response shows.
"""

from __future__ import annotations

import json
import random
import re
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC
from functools import partial
from pathlib import Path
from typing import Any

import pymongo
import pytest
import trio
from bson import Timestamp
from pymongo.database import Database as PymongoDatabase

from tests.cluster import (
    Follower,
    Instance,
    LiveClient,
    User,
    admin,
    alive,
    change_stream_cursors,
    children,
    committed,
    computing,
    expected_for,
    first_difference,
    instances,
    live_client,
    local_tcp_ports,
    own_mongod,
    position_of,
    strictly_increasing,
    summary,
    timestamp_of,
    wire,
)
from tests.processes import run_vtrio
from vtrio.virtool import hash_key

ADMIN = User("root", admin=True)


def write_directly(mongodb_url: str, db_name: str, fn: Callable[[PymongoDatabase], Any]) -> str:
    """Blocking: run ``fn(db)`` as another program would (pymongo, no vtrio); the position of
    its last write."""
    with pymongo.MongoClient(mongodb_url) as client, client.start_session() as session:
        fn_db = client[db_name]
        fn(_Bound(fn_db, session))
        assert session.operation_time is not None
        return position_of(session.operation_time)


class _Bound:
    """A database whose collections' writes go through one session (so that its operation
    time is the last write's)."""

    def __init__(self, db: PymongoDatabase, session: Any) -> None:
        self._db, self._session = db, session

    def __getattr__(self, name: str) -> Any:
        return _BoundCollection(self._db[name], self._session)


class _BoundCollection:
    def __init__(self, collection: Any, session: Any) -> None:
        self._collection, self._session = collection, session

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._collection, name)
        return lambda *args, **kwargs: method(*args, session=self._session, **kwargs)


async def direct(mongodb_url: str, db_name: str, fn: Callable[[Any], Any]) -> str:
    return await trio.to_thread.run_sync(write_directly, mongodb_url, db_name, fn)


def inserts(*documents: dict[str, Any]) -> Callable[[Any], Any]:
    """Inserts into ``samples``, one command each, for :func:`direct`."""
    return lambda db: [db.samples.insert_one(document) for document in documents]


def updates(*changes: tuple[Any, dict[str, Any]]) -> Callable[[Any], Any]:
    """``$set`` updates of ``samples`` (by ``_id``, or by a filter), one command each."""

    def update(db: Any) -> None:
        for which, fields in changes:
            query = which if isinstance(which, dict) else {"_id": which}
            db.samples.update_one(query, {"$set": fields})

    return update


def sample(sample_id: str, owner: str, **fields: Any) -> dict[str, Any]:
    """A sample as another program might insert it."""
    return {
        "_id": sample_id,
        "name": sample_id,
        "user": owner,
        "group": None,
        "group_read": False,
        "group_write": False,
        "all_read": False,
        "all_write": False,
        "host": "",
        "isolate": "",
        "reads": "r.fq",
        "quality": None,
        **fields,
    }


def samples_of(client: LiveClient) -> list[dict[str, Any]]:
    return [m for m in client.messages if m["interface"] == "samples"]


# --- 1. every write reaches every instance ------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
async def test_writes_reach_the_clients_of_every_instance_once(
    mongodb_url: str, db_name: str, tmp_path: Path, count: int
) -> None:
    async with admin(mongodb_url, db_name) as users:
        key = await users.key(ADMIN)
    async with (
        instances(mongodb_url, db_name, tmp_path, count) as cluster,
        AsyncExitStack() as stack,
    ):
        clients = [await stack.enter_async_context(live_client(i.url, key)) for i in cluster]
        infos = [await client.call("system.info") for client in clients]
        assert len({info["instance"] for info in infos}) == count  # distinct instances
        start = min(info["position"] for info in infos)

        # A sample created through each instance's RPC, then one written by another program.
        created = []
        for n, client in enumerate(clients):
            params = {"name": f"via-{n}", "reads": "r.fq"}
            created.append(await client.call("samples.create", params))
        elsewhere = inserts(sample("direct", "someone", host="h0"))
        then = updates(("direct", {"host": "h1"}))
        last = await direct(mongodb_url, db_name, lambda db: (elsewhere(db), then(db)))
        changes = await committed(mongodb_url, db_name, start, last)
        want = expected_for(ADMIN, changes)
        assert [m["operation"] for m in want] == ["insert"] * (count + 1) + ["update"]
        for client, info in zip(clients, infos, strict=True):
            await client.wait_position(last)
            got = samples_of(client)
            assert got == want, f"{info['instance']}: {first_difference(got, want)}"
        # What the RPC answered is what every client was sent.
        assert [m["data"] for m in want[:count]] == created
        assert want[-1]["data"]["host"] == "h1"
        for client in clients:
            info = await client.call("system.info")
            assert info["position"] >= last
            assert info["changes"]["live"] is True


# --- 2. concurrent writers on different instances: one order for everyone ----------------------


def last_oplog_position(mongodb_url: str, db_name: str, collection: str) -> str:
    """Blocking: the position of the newest write to ``collection`` in the oplog."""
    with pymongo.MongoClient(mongodb_url) as client:
        entry = client.local["oplog.rs"].find_one(
            {"ns": f"{db_name}.{collection}"}, sort=[("$natural", -1)]
        )
    assert entry is not None
    return position_of(entry["ts"])


def stored_sample(mongodb_url: str, db_name: str, sample_id: str) -> dict[str, Any]:
    with pymongo.MongoClient(mongodb_url) as client:
        found = client[db_name].samples.find_one({"_id": sample_id})
    assert found is not None
    return found


@dataclass
class Answer:
    """One samples.update of a contended sample, as its caller saw it."""

    host: str  # the value it set
    answered: str  # the host of the sample in the response
    own_sent: bool  # its own change had reached its connection before the response
    answered_sent: bool  # the state the response shows had reached its connection before it


async def contend(
    writers: list[LiveClient], sample_id: str, burst: int, per_burst: int, in_flight: int
) -> list[Answer]:
    """Each writer sets the sample's ``host`` ``per_burst`` times, to values of its own, with
    ``in_flight`` requests in flight at once; all of them at the same time."""
    answers: list[Answer] = []

    async def update(writer: LiveClient, host: str, slots: trio.Semaphore) -> None:
        try:
            result = await writer.call("samples.update", {"id": sample_id, "host": host})
            assert result["id"] == sample_id
            sent = {m["data"].get("host") for m in samples_of(writer) if m["operation"] == "update"}
            answers.append(Answer(host, result["host"], host in sent, result["host"] in sent))
        finally:
            slots.release()

    async def write(index: int, writer: LiveClient) -> None:
        slots = trio.Semaphore(in_flight)
        async with trio.open_nursery() as requests:
            for n in range(per_burst):
                await slots.acquire()
                requests.start_soon(update, writer, f"w{index}-b{burst}-{n}", slots)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for index, writer in enumerate(writers):
                nursery.start_soon(write, index, writer)
    return answers


@asynccontextmanager
async def writers_and_watchers(
    cluster: list[Instance], writer_key: str, watcher_key: str
) -> AsyncIterator[tuple[list[LiveClient], list[LiveClient]]]:
    """A writer's and a watcher's connection to each instance."""
    async with AsyncExitStack() as stack:
        writers, watchers = [], []
        for instance in cluster:
            writers.append(await stack.enter_async_context(live_client(instance.url, writer_key)))
            watchers.append(await stack.enter_async_context(live_client(instance.url, watcher_key)))
        yield writers, watchers


async def test_concurrent_writers_on_three_instances_leave_every_client_in_one_order(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    alice = User("alice")
    async with admin(mongodb_url, db_name) as users:
        root_key, alice_key = await users.key(ADMIN), await users.key(alice)
    bursts, per_burst, in_flight = 4, 24, 16
    async with (
        instances(mongodb_url, db_name, tmp_path, 3) as cluster,
        writers_and_watchers(cluster, alice_key, root_key) as (writers, watchers),
    ):
        start = (await writers[0].call("system.info"))["position"]
        one = await writers[0].call("samples.create", {"name": "contended", "reads": "r.fq"})
        answers: list[Answer] = []
        for burst in range(bursts):
            answers += await contend(writers, one["id"], burst, per_burst, in_flight)
            stored = await trio.to_thread.run_sync(stored_sample, mongodb_url, db_name, one["id"])
            last = await trio.to_thread.run_sync(
                last_oplog_position, mongodb_url, db_name, "samples"
            )
            for observer in writers + watchers:
                await observer.wait_position(last)
                seen = [m for m in samples_of(observer) if m["position"] <= last]
                assert seen[-1]["position"] == last
                assert seen[-1]["data"] == wire(stored), f"burst {burst}: {summary(seen[-3:])}"

        changes = await committed(mongodb_url, db_name, start, last)
        updates = [c for c in changes if c.operation == "update"]
        assert len(updates) == bursts * per_burst * len(writers) == len(answers)
        assert sorted(c.after["host"] for c in updates if c.after) == sorted(
            a.host for a in answers
        )  # every update applied once, none lost, none repeated
        for user, group in ((alice, writers), (ADMIN, watchers)):
            want = expected_for(user, changes)
            for observer in group:
                got = samples_of(observer)
                assert strictly_increasing([m["position"] for m in got]), "positions disordered"
                assert got == want, first_difference(got, want)
        # The write fence (README, vtrio/framework/_collection.py): a request's own change
        # reaches its connection before its response does.
        overtaken = [a for a in answers if not a.own_sent]
        assert overtaken == [], f"{len(overtaken)} responses overtook their own change"


# --- 3. resuming on another instance --------------------------------------------------------


def big_sample(n: int, prefix: str) -> dict[str, Any]:
    return sample(f"{prefix}{n}", "someone", isolate="i" * 1000)


async def test_a_client_resumes_on_another_instance_with_exactly_what_it_missed(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    async with admin(mongodb_url, db_name) as users:
        key = await users.key(ADMIN)
    each = [[], ["--history-size", "5"]]  # B remembers 5 changes: the rest come from MongoDB
    async with instances(mongodb_url, db_name, tmp_path, 2, each=each) as (a, b):
        async with live_client(a.url, key) as first:
            await direct(
                mongodb_url, db_name, inserts(*(sample(f"r{n}", "someone") for n in range(5)))
            )
            await first.wait_messages(5)
            seen = list(first.messages)
        assert [m["data"]["id"] for m in seen] == [f"r{n}" for n in range(5)]
        since = seen[-1]["position"]

        missed = await direct(
            mongodb_url, db_name, updates(*((f"r{n % 5}", {"host": f"m{n}"}) for n in range(20)))
        )
        want = expected_for(ADMIN, await committed(mongodb_url, db_name, since, missed))
        assert [m["data"]["host"] for m in want] == [f"m{n}" for n in range(20)]
        newest = missed
        for instance, where in ((b, "MongoDB's oplog"), (a, "memory")):
            began = trio.current_time()
            async with live_client(instance.url, key, since=since) as resumed:
                await resumed.wait_position(newest)
                took = trio.current_time() - began
                assert resumed.messages == want, first_difference(resumed.messages, want)
                # ... and then the live ones, with no gap or repeat at the seam.
                host = f"live on {instance.name}"
                newest = await direct(mongodb_url, db_name, updates(("r0", {"host": host})))
                await resumed.wait_position(newest)
                assert len(resumed.messages) == len(want) + 1
                assert resumed.messages[-1]["data"]["host"] == host
                assert resumed.messages[-1]["position"] == newest
                assert strictly_increasing([m["position"] for m in resumed.messages])
                want = list(resumed.messages)  # the next resume, from the same position, too
            print(f"\nresume of {len(want) - 1} missed changes from {where}: {took * 1000:.0f} ms")


async def test_unusable_positions_are_told_to_reload(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    async with admin(mongodb_url, db_name) as users:
        key = await users.key(ADMIN)
    async with instances(mongodb_url, db_name, tmp_path, 2) as (a, b):
        position = (await _info(a.url, key))["position"]
        future = position_of(Timestamp(int(position[:8], 16) + 3600, 1))
        cases = {
            "garbage": "garbage",
            "too short": position[:-1],
            "not hex": "g" * 22,
            "upper case": position.upper() if position.upper() != position else "A" * 22,
            "future": future,
        }
        closes: dict[str, tuple[int, str, float]] = {}

        async def resume(name: str, since: str, url: str) -> None:
            began = trio.current_time()
            async with live_client(url, key, since=since) as client:
                try:
                    code = await client.wait_closed(20)
                except AssertionError as exc:
                    raise AssertionError(f"since={since} ({name}): not closed") from exc
                closes[name] = (code, client.close_reason or "", trio.current_time() - began)
                assert client.messages == [], f"{name}: {summary(client.messages)}"

        async with trio.open_nursery() as nursery:
            for index, (name, since) in enumerate(cases.items()):
                nursery.start_soon(resume, name, since, (a, b)[index % 2].url)
        for name, (code, reason, _) in closes.items():
            assert code == 4003, f"{name}: {code} {reason}"
            assert "reload" in reason
        print(
            "\nclosed with 4003 after: "
            + ", ".join(f"{name} {took:.2f} s" for name, (_, _, took) in closes.items())
        )
        # A position from the future is given a moment (another instance's feed may be
        # ahead), but only a moment; the others are refused at once.
        assert 1.0 <= closes["future"][2] < 15
        assert all(took < 3 for name, (_, _, took) in closes.items() if name != "future")
        # And the instances still serve: a client resuming from a real position gets on, and
        # so does one from long before this database existed, as long as the oplog has never
        # been truncated (MongoDB then holds the whole history: see the next test for one
        # that has been).
        ancient = position_of(Timestamp(1, 1))
        async with (
            live_client(b.url, key, since=position) as recent_one,
            live_client(a.url, key, since=ancient) as ancient_one,
        ):
            done = await direct(mongodb_url, db_name, inserts(sample("after", "someone")))
            for client in (recent_one, ancient_one):
                await client.wait_position(done, timeout=30)
                assert [m["data"]["id"] for m in client.messages] == ["after"]


async def _info(url: str, key: str) -> dict[str, Any]:
    async with live_client(url, key) as client:
        info: dict[str, Any] = await client.call("system.info")
        return info


async def test_a_client_closed_as_too_slow_resumes_from_its_close_reason_losing_nothing(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    async with admin(mongodb_url, db_name) as users:
        key = await users.key(ADMIN)
    each = [["--send-queue-size", "20", "--send-buffer-size", "4096"]]
    async with instances(mongodb_url, db_name, tmp_path, 2, each=each) as (slow_one, other):
        start = (await _info(slow_one.url, key))["position"]
        follower = Follower(key, ADMIN, position=start)
        raw = await follower.connect(slow_one.url, receive_buffer=4096)
        try:
            # The follower reads nothing while 300 changes of ~1 KB are written, one by one.
            big = (big_sample(n, "slow") for n in range(300))
            last = await direct(mongodb_url, db_name, inserts(*big))
            with trio.fail_after(30):
                code = await follower.read(raw)
        finally:
            raw.close()
        assert code == 4002, follower.closes
        reason = follower.closes[-1][1]
        resume_from = re.search(r"\?since=([0-9a-f]{22})\b", reason)
        assert resume_from is not None, reason
        received_before = len(follower.messages)
        assert 0 < received_before < 300
        # The close reason names the last change it was sent in full: the one it has.
        assert resume_from.group(1) == follower.position
        follower.position = resume_from.group(1)  # as a client would: from the reason
        began = trio.current_time()
        raw = await follower.connect(other.url)
        try:
            with trio.fail_after(30):
                assert await follower.read(raw, until=lambda: follower.seen(last)) is None
        finally:
            raw.close()
        took = trio.current_time() - began
        want = expected_for(ADMIN, await committed(mongodb_url, db_name, start, last))
        assert len(want) == 300
        assert follower.messages == want, first_difference(follower.messages, want)
        print(
            f"\n4002 after {received_before} of 300 changes; the other "
            f"{300 - received_before} came on resuming elsewhere in {took * 1000:.0f} ms"
        )


# --- 4. a position the oplog no longer covers -----------------------------------------------


def roll_oplog_past(mongodb_url: str, db_name: str, position: str) -> tuple[int, float]:
    """Blocking: insert 400 KB documents into a collection vtrio does not watch until the
    oplog's first entry is past ``position``; how many it took, and how long."""
    mark = timestamp_of(position)
    began = time.monotonic()
    with pymongo.MongoClient(mongodb_url) as client:
        oplog = client.local["oplog.rs"]

        def first() -> Timestamp:
            entry = oplog.find_one({}, sort=[("$natural", 1)])
            assert entry is not None
            return entry["ts"]

        inserted = 0
        while first() <= mark:
            assert time.monotonic() - began < 60, "the oplog did not roll over in 60 s"
            client[db_name].ballast.insert_one({"blob": "x" * 400_000})
            inserted += 1
            time.sleep(0.05)
    return inserted, time.monotonic() - began


async def test_a_position_the_oplog_no_longer_covers_is_told_to_reload(tmp_path: Path) -> None:
    db_name = "rolled"
    async with own_mongod(tmp_path, oplog_mb=1, extra=["--syncdelay", "1"]) as mongod:
        url = mongod.url
        async with admin(url, db_name) as users:
            key = await users.key(ADMIN)
        # It remembers 2 changes: a client 4 behind is served from MongoDB's oplog.
        async with instances(url, db_name, tmp_path, 1, "--history-size", "2") as (a,):
            async with live_client(a.url, key) as client:
                last = await direct(
                    url, db_name, inserts(*(sample(f"s{n}", "x") for n in range(5)))
                )
                await client.wait_position(last)
            remembered = client.messages[0]["position"]
            # Before the oplog rolls over, the position is good.
            async with live_client(a.url, key, since=remembered) as resumed:
                await resumed.wait_position(last)
                assert [m["data"]["id"] for m in resumed.messages] == ["s1", "s2", "s3", "s4"]

            inserted, took = await trio.to_thread.run_sync(
                roll_oplog_past, url, db_name, remembered
            )
            print(f"\noplog rolled past the position: {inserted} x 400 KB in {took:.1f} s")
            async with live_client(a.url, key, since=remembered) as resumed:
                assert await resumed.wait_closed() == 4003
                assert resumed.messages == []
                assert "reload" in (resumed.close_reason or "")

            # An instance started since then has no memory of it either: 4003 there too; and
            # it serves a position the oplog still covers.
            async with instances(url, db_name, tmp_path, 1, prefix="later") as (b,):
                async with live_client(b.url, key, since=remembered) as resumed:
                    assert await resumed.wait_closed() == 4003
                # (A change's position, not system.info's: with an oplog this small, that one,
                # a quiet stream's high-water mark, may itself be older than the oplog by now.)
                covered = await direct(url, db_name, updates(("s0", {"host": "covered"})))
                after = ((f"s{n}", {"host": "after"}) for n in range(5))
                newest = await direct(url, db_name, updates(*after))
                async with live_client(b.url, key, since=covered) as resumed:
                    await resumed.wait_position(newest)
                    assert [m["data"]["id"] for m in resumed.messages] == [
                        f"s{n}" for n in range(5)
                    ]
                # The live feed itself survived the roll-over: nobody was told to reload.
                async with live_client(a.url, key) as client:
                    info = await client.call("system.info")
                    assert info["changes"]["live"] is True
            assert "history lost" not in a.process.output, a.process.output


# --- 5. access changes reach the clients of other instances ---------------------------------


async def test_gaining_and_losing_read_access_on_another_instance(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    alice = User("alice", groups=frozenset({"lab", "field"}))
    bob = User("bob")
    carol = User("carol", groups=frozenset({"lab"}))
    dave = User("dave", groups=frozenset({"field"}))
    people = (alice, bob, carol, dave)
    async with admin(mongodb_url, db_name) as users:
        keys = {user.name: await users.key(user) for user in people}
    async with (
        instances(mongodb_url, db_name, tmp_path, 2) as (a, b),
        live_client(a.url, keys["alice"]) as owner,
        live_client(b.url, keys["bob"]) as bob_on_b,
        live_client(b.url, keys["carol"]) as carol_on_b,
        live_client(b.url, keys["dave"]) as dave_on_b,
    ):
        clients = {"alice": owner, "bob": bob_on_b, "carol": carol_on_b, "dave": dave_on_b}
        start = (await owner.call("system.info"))["position"]
        made = await owner.call(
            "samples.create", {"name": "private", "reads": "r.fq", "group": "lab"}
        )
        s = made["id"]

        async def set_on_a(**fields: Any) -> None:  # alice, through instance A
            await owner.call("samples.update", {"id": s, **fields})

        async def set_directly(**fields: Any) -> None:  # another program
            await direct(mongodb_url, db_name, updates((s, fields)))

        await set_on_a(all_read=True)  # everyone gains it
        await set_on_a(all_read=False)  # ... and loses it
        await set_directly(group_read=True)  # the lab gains it
        await set_directly(host="seen by the lab")
        await set_on_a(group="field")  # the lab loses it, the field gains it
        await set_directly(group_read=False)  # the field loses it
        public = await owner.call(
            "samples.create", {"name": "public", "reads": "r.fq", "all_read": True}
        )
        last = await trio.to_thread.run_sync(last_oplog_position, mongodb_url, db_name, "samples")
        changes = await committed(mongodb_url, db_name, start, last)
        t = public["id"]
        by_hand = {
            "alice": [("insert", s)] + [("update", s)] * 6 + [("insert", t)],
            "bob": [("insert", s), ("delete", s), ("insert", t)],
            "carol": [
                ("insert", s),
                ("delete", s),
                ("insert", s),
                ("update", s),
                ("delete", s),
                ("insert", t),
            ],
            "dave": [("insert", s), ("delete", s), ("insert", s), ("delete", s), ("insert", t)],
        }
        for user in people:
            client = clients[user.name]
            await client.wait_position(last)
            got = samples_of(client)
            assert [
                (m["operation"], m["data"]["id"] if m["operation"] != "delete" else m["data"][0])
                for m in got
            ] == by_hand[user.name], (user.name, summary(got))
            want = expected_for(user, changes)
            assert got == want, f"{user.name}: {first_difference(got, want)}"
            for message in got:
                if message["operation"] == "delete":
                    assert message["data"] == [s]
                else:  # an insert for one who gains access carries the whole sample
                    assert message["data"]["name"] in ("private", "public")
                    assert "user" in message["data"] and "group" in message["data"]


# --- 6. a job cancelled through another instance than the one running it ---------------------


TINY_READ = b"@\nA\n+\nI\n"  # one-base reads: the slowest file to compute, byte for byte


def is_job(job_id: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    def matches(message: dict[str, Any]) -> bool:
        data = message["data"]
        return (
            message["interface"] == "jobs"
            and isinstance(data, dict)
            and data.get("id") == job_id
            and all(data.get(k) == v for k, v in fields.items())
        )

    return matches


async def test_a_job_running_on_one_instance_is_cancelled_through_another(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    alice = User("alice")
    async with admin(mongodb_url, db_name) as users:
        key = await users.key(alice)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "slow.fq").write_bytes(TINY_READ * ((48 << 20) // len(TINY_READ)))  # 48 MB
    async with (
        instances(mongodb_url, db_name, tmp_path, 2, "--jobs", "1") as cluster,
        live_client(cluster[0].url, key) as on_a,
        live_client(cluster[1].url, key) as on_b,
    ):
        sample_id = (await on_a.call("samples.create", {"name": "s", "reads": "slow.fq"}))["id"]
        job = await on_a.call("jobs.create", {"task": "sample_stats", "sample_id": sample_id})
        job_id = job["id"]
        await on_a.wait(
            lambda: any(
                is_job(job_id, state="running")(m) and 0 < m["data"]["progress"] < 1
                for m in on_a.messages
            ),
            timeout=60,
            what="the job's progress",
        )
        stored = await trio.to_thread.run_sync(
            lambda: pymongo.MongoClient(mongodb_url)[db_name].jobs.find_one({"_id": job_id})
        )
        [runner] = [i for i in cluster if i.name == stored["runner"]]
        [elsewhere] = [i for i in cluster if i is not runner]
        with trio.fail_after(30):
            while not (busy := [pid for pid in children(runner.pid) if computing(pid)]):
                await trio.sleep(0.01)
        client = on_a if elsewhere is cluster[0] else on_b

        began = trio.current_time()
        cancelled = await client.call("jobs.cancel", {"id": job_id})
        took = trio.current_time() - began
        print(f"\njobs.cancel through the other instance returned in {took * 1000:.0f} ms")
        assert cancelled["state"] == "cancelled", (
            f"jobs.cancel through {elsewhere.name} of a job {runner.name} ran returned after "
            f"{took:.1f} s with the job {cancelled['state']} (progress {cancelled['progress']}, "
            f"cancel_requested {cancelled.get('cancel_requested')})"
        )
        assert 0 < cancelled["progress"] < 1
        assert cancelled["cancel_requested"] is True
        [worker] = busy
        with trio.fail_after(5):  # killed (and reaped) by the runner before it said cancelled
            while worker in children(runner.pid):
                await trio.sleep(0.01)
        for watcher in (on_a, on_b):
            await watcher.wait(
                lambda w=watcher: any(is_job(job_id, state="cancelled")(m) for m in w.messages),
                what="the job cancelled",
            )
        job_now = await on_b.call("jobs.get", {"id": job_id})
        assert job_now["state"] == "cancelled"
        assert (await on_b.call("samples.get", {"id": sample_id}))["quality"] is None

        # The runner goes on: a job started through the other instance runs to the end.
        small = (await on_b.call("samples.create", {"name": "small", "reads": "r.fq"}))["id"]
        again = await on_b.call("jobs.create", {"task": "sample_stats", "sample_id": small})
        await on_b.wait(
            lambda: any(is_job(again["id"], state="complete")(m) for m in on_b.messages),
            timeout=60,
            what="the second job complete",
        )
        assert (await on_a.call("samples.get", {"id": small}))["quality"]["count"] == 1
        info = await on_a.call("system.info")
        assert info["jobs"]["cancelled"] == 1 and info["jobs"]["complete"] == 1
        assert info["jobs"]["running"] == info["jobs"]["waiting"] == 0


# --- 7. a revoked key's connections are closed on every instance ----------------------------


def timed_vtrio(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Blocking: run an admin command; its result, and when it exited (time.time())."""
    result = run_vtrio(args)
    return result, time.time()


async def test_a_revoked_key_is_closed_on_every_instance(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    common = [
        "--mongodb-url",
        mongodb_url,
        "--db-name",
        db_name,
        "--data-dir",
        str(tmp_path / "cli"),
    ]

    async def vtrio(*args: str) -> tuple[subprocess.CompletedProcess, float]:
        done, exited = await trio.to_thread.run_sync(timed_vtrio, [*args, *common])
        assert done.returncode == 0, done.stderr
        return done, exited

    await vtrio("users", "create", "alice")
    made: list[str] = []

    async def make_key() -> None:
        made.append((await vtrio("keys", "create", "alice"))[0].stdout.strip())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(make_key)
        nursery.start_soon(make_key)
    revoked_key, kept_key = made
    listed = [
        json.loads(line) for line in (await vtrio("keys", "list", "alice"))[0].stdout.splitlines()
    ]
    with pymongo.MongoClient(mongodb_url) as client:
        record = client[db_name].keys.find_one({"hash": hash_key(revoked_key)})
    assert record is not None and record["_id"] in {key["id"] for key in listed}
    revoked_id = record["_id"]

    async with (
        instances(mongodb_url, db_name, tmp_path, 2) as (a, b),
        live_client(a.url, revoked_key) as revoked_on_a,
        live_client(b.url, revoked_key) as revoked_on_b,
        live_client(a.url, kept_key) as kept_on_a,
        live_client(b.url, kept_key) as kept_on_b,
    ):
        for client in (revoked_on_a, revoked_on_b, kept_on_a, kept_on_b):
            await client.call("system.info")  # every one is open and answering
        _, exited = await vtrio("keys", "revoke", revoked_id)
        figures = {}
        for name, client in (("A", revoked_on_a), ("B", revoked_on_b)):
            assert await client.wait_closed(10) == 4000
            assert client.close_reason == "API key revoked"
            assert client.closed_at is not None
            figures[name] = client.closed_at - exited
        with pymongo.MongoClient(mongodb_url) as client:
            deleted = client.local["oplog.rs"].find_one(
                {"ns": f"{db_name}.keys", "op": "d", "o._id": revoked_id}
            )
        assert deleted is not None
        committed_at = deleted["wall"].replace(tzinfo=UTC).timestamp()
        print(
            "\nrevocation: close after the command's exit: "
            + ", ".join(f"{n} {s * 1000:+.0f} ms" for n, s in figures.items())
            + "; after the delete's commit: "
            + ", ".join(
                f"{n} {(c.closed_at or 0) - committed_at:.3f} s"
                for n, c in (("A", revoked_on_a), ("B", revoked_on_b))
            )
        )
        assert all(latency < 5 for latency in figures.values()), figures
        # The other key of the same user is untouched, on both instances.
        for client in (kept_on_a, kept_on_b):
            assert (await client.call("system.info"))["instance"] in (a.name, b.name)
            assert client.close_code is None
        # And the revoked key opens nothing any more.
        for instance in (a, b):
            async with live_client(instance.url, revoked_key) as again:
                assert await again.wait_closed(10) == 4000


# --- 8. one change stream per instance, whatever the number of clients ----------------------


async def test_a_thousand_clients_on_two_instances_hold_one_change_stream_each(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    people = [ADMIN, User("u1"), User("u2"), User("u3")]
    async with admin(mongodb_url, db_name) as users:
        keys = [await users.key(user) for user in people]
    # B remembers 10 changes: the clients that resume there from further back are served from
    # MongoDB, each through a stream of its own, which must be gone once they are live.
    each = [[], ["--history-size", "10"]]
    async with instances(mongodb_url, db_name, tmp_path, 2, each=each) as (a, b):
        old = (await _info(a.url, keys[0]))["position"]
        olds = (sample(f"old{n}", "someone", all_read=True) for n in range(50))
        await direct(mongodb_url, db_name, inserts(*olds))
        followers: list[Follower] = []
        resumed: list[Follower] = []
        raws: list[Any] = []
        limit = trio.CapacityLimiter(50)

        async def connect(index: int) -> None:
            user_index = index % len(people)
            resumes = index < 100
            follower = Follower(
                keys[user_index], people[user_index], position=old if resumes else None
            )
            async with limit:
                raw = await follower.connect((b if resumes or index % 2 else a).url)
            followers.append(follower)
            raws.append((follower, raw))
            if resumes:
                resumed.append(follower)

        began = trio.current_time()
        try:
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for index in range(1000):
                        nursery.start_soon(connect, index)
            connected = trio.current_time() - began
            # Every one of them is live: the next change reaches all 1,000.
            everyone = sample("for-everyone", "someone", all_read=True)
            last = await direct(mongodb_url, db_name, inserts(everyone))
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for follower, raw in raws:
                        nursery.start_soon(follower.read, raw, partial(follower.seen, last))
            reached = trio.current_time() - began - connected
            for follower in followers:
                ids = [m["data"]["id"] for m in follower.messages]
                if follower in resumed:
                    assert ids == [f"old{n}" for n in range(50)] + ["for-everyone"]
                else:
                    assert ids == ["for-everyone"]
            assert len(followers) == 1000 and len(resumed) == 100
            cursors = await trio.to_thread.run_sync(change_stream_cursors, mongodb_url, db_name)
            ports = {i.name: local_tcp_ports(i.pid) for i in (a, b)}
            owners = []
            for cursor in cursors:
                port = int(cursor.get("client", ":0").rsplit(":", 1)[1])
                owners.append([name for name, held in ports.items() if port in held])
            print(
                f"\n1,000 clients connected in {connected:.1f} s; all had the next change (and "
                f"the 100 resumed ones the 50 before it, from MongoDB) {reached * 1000:.0f} ms "
                f"after it; change-stream cursors: {len(cursors)} "
                f"({', '.join(c.get('type', '?') for c in cursors)})"
            )
            assert sorted(owners) == sorted([[a.name], [b.name]]), (owners, cursors)
        finally:
            for _, raw in raws:
                raw.close()


# --- 9. chaos: clients vanish at random and resume anywhere, while writers write -------------


async def test_chaos_every_client_ends_with_exactly_the_committed_sequence(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 32)
    print(f"\nchaos seed {seed}")
    rng = random.Random(seed)
    alice = User("alice", groups=frozenset({"lab"}))
    bob = User("bob", groups=frozenset({"lab"}))
    eve = User("eve")
    people = [ADMIN, alice, bob, eve]
    async with admin(mongodb_url, db_name) as users:
        keys = {user.name: await users.key(user) for user in people}
    writing_for, clients = 12.0, 200
    async with (
        instances(mongodb_url, db_name, tmp_path, 2) as cluster,
        live_client(cluster[0].url, keys["alice"]) as writer_a,
        live_client(cluster[1].url, keys["alice"]) as writer_b,
    ):
        made = [
            await writer_a.call(
                "samples.create", {"name": "public", "reads": "r.fq", "all_read": True}
            ),
            await writer_a.call(
                "samples.create",
                {"name": "lab", "reads": "r.fq", "group": "lab", "group_read": True},
            ),
            await writer_b.call("samples.create", {"name": "private", "reads": "r.fq"}),
            await writer_b.call(
                "samples.create", {"name": "flipping", "reads": "r.fq", "group": "lab"}
            ),
        ]
        ids = [m["id"] for m in made]
        start = (await writer_a.call("system.info"))["position"]
        followers = [
            Follower(keys[people[n % 4].name], people[n % 4], position=start)
            for n in range(clients)
        ]
        writing = trio.Event()
        stop_writing = trio.Event()
        counts = {"rpc": 0, "direct": 0}
        latencies: list[float] = []

        async def rpc_writer(writer: LiveClient, name: str) -> None:
            n = 0
            while not stop_writing.is_set():
                n += 1
                if n % 10 == 0:  # the flipping one: bob and eve gain and lose it
                    fields: dict[str, Any] = {"all_read": n % 20 == 0, "group_read": n % 30 == 0}
                    await writer.call("samples.update", {"id": ids[3], **fields})
                else:
                    sent = trio.current_time()
                    await writer.call(
                        "samples.update", {"id": rng.choice(ids), "host": f"{name}-{n}"}
                    )
                    latencies.append(trio.current_time() - sent)
                counts["rpc"] += 1
                await trio.sleep(0.01)

        def direct_writer(stop: threading.Event) -> None:
            with pymongo.MongoClient(mongodb_url) as client:
                samples = client[db_name].samples
                n = 0
                while not stop.is_set():
                    n += 1
                    samples.update_one({"_id": ids[n % 4]}, {"$set": {"host": f"direct-{n}"}})
                    counts["direct"] += 1
                    time.sleep(0.01)

        async def follow(follower: Follower, until: Callable[[], bool], done: trio.Event) -> None:
            """Connect anywhere, read a while, vanish (TCP reset); again, until told."""
            while True:
                raw = await follower.connect(rng.choice(cluster).url)
                try:
                    if done.is_set():
                        with trio.fail_after(60):
                            code = await follower.read(raw, until=until)
                        if code is None:
                            return
                    else:
                        with trio.move_on_after(rng.uniform(0.2, 2.5)) as lived:
                            code = await follower.read(raw, until=lambda: done.is_set() and until())
                        if lived.cancelled_caught:
                            raw.reset()
                            follower.resets += 1
                            continue
                        if code is None:
                            return
                    assert code in (1006, 4002), f"{follower.user.name}: closed {code}"
                finally:
                    raw.close()

        stop = threading.Event()
        finished = trio.Event()
        final: list[str] = []
        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            for follower in followers:
                nursery.start_soon(
                    follow, follower, lambda f=follower: bool(final) and f.seen(final[0]), finished
                )
            async with trio.open_nursery() as writers:
                writers.start_soon(rpc_writer, writer_a, "a")
                writers.start_soon(rpc_writer, writer_b, "b")
                writers.start_soon(partial(trio.to_thread.run_sync, direct_writer, stop))
                writing.set()
                await trio.sleep(writing_for)
                stop_writing.set()
                stop.set()
            # The last change, one everybody sees: every client must get to it.
            the_end = sample("the-end", "someone", all_read=True)
            final.append(await direct(mongodb_url, db_name, inserts(the_end)))
            finished.set()
        took = trio.current_time() - began

        changes = await committed(mongodb_url, db_name, start, final[0])
        wants = {user.name: expected_for(user, changes) for user in people}
        resets = sum(f.resets for f in followers)
        received = sum(len(f.messages) for f in followers)
        print(
            f"chaos: {counts['rpc']} RPC and {counts['direct']} direct writes "
            f"({len(changes)} changes) in {writing_for:.0f} s; {clients} clients, {resets} "
            f"resets, {sum(f.connections for f in followers)} connections, {received} messages; "
            f"{took:.1f} s in all; samples.update took {statistics.median(latencies) * 1000:.0f} "
            f"ms (median), {max(latencies) * 1000:.0f} ms at most"
        )
        assert resets >= clients  # every client vanished at least once, most several times
        for follower in followers:
            want = wants[follower.user.name]
            got = follower.messages
            assert got == want, f"{follower.user.name}: {first_difference(got, want)}"


# --- 10. mongod killed and restarted under a running instance -------------------------------


async def test_a_mongod_restart_loses_and_repeats_nothing(tmp_path: Path) -> None:
    db_name = "restarted"
    async with own_mongod(tmp_path, oplog_mb=64) as mongod:
        url = mongod.url
        async with admin(url, db_name) as users:
            key = await users.key(ADMIN)
        async with (
            instances(url, db_name, tmp_path, 1, "--mongodb-timeout", "5") as (a,),
            live_client(a.url, key) as client,
        ):
            start = (await client.call("system.info"))["position"]

            async def writes(label: str) -> str:
                """5 samples through vtrio's RPC, and 10 updates by another program."""
                for n in range(5):
                    await client.call("samples.create", {"name": f"{label}{n}", "reads": "r.fq"})
                hosts = (({"name": f"{label}{n % 5}"}, {"host": f"{label}-{n}"}) for n in range(10))
                return await direct(url, db_name, updates(*hosts))

            before = await writes("before")
            await client.wait_position(before)
            await mongod.kill()
            killed_at = trio.current_time()
            await trio.sleep(1)  # the instance notices: its stream fails, and is reopened
            assert alive(a), a.process.output
            await mongod.start()
            primary_at = trio.current_time()
            assert alive(a), a.process.output
            # The first write after the restart, by another program: how soon it is dispatched.
            first = await direct(url, db_name, inserts(sample("first-after", "someone")))
            await client.wait_position(first, timeout=30)
            recovered = trio.current_time() - primary_at
            after = await writes("after")
            await client.wait_position(after, timeout=30)
            assert client.close_code is None
            info = await client.call("system.info")
            assert info["changes"]["live"] is True

            print(
                f"\nmongod down {primary_at - killed_at:.1f} s; first write after it reached the "
                f"client {recovered * 1000:.0f} ms after mongod was primary again"
            )
            want = expected_for(ADMIN, await committed(url, db_name, start, after))
            assert len(want) == 31
            got = samples_of(client)
            positions = [m["position"] for m in got]
            repeated = len(positions) - len(set(positions))
            twice = [m for m in got if positions.count(m["position"]) > 1]
            assert repeated == 0, (
                f"{repeated} of {len(got)} messages were sent twice, at the same positions, "
                f"after the restart: {summary(twice[:3])}"
            )
            assert got == want, first_difference(got, want)
        assert "mongodb failed" not in a.process.output


# --- beyond the list: what the tests above ran into ---------------------------------------------


async def test_an_interrupted_change_stream_is_reopened_where_it_got_to(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    # The stream fails: an administrator kills its operation (killOp). The feed must reopen it
    # from the last change it had, repeating nothing; and a quiet moment longer than
    # --mongodb-timeout must not fail it (its getMore waits for news a second at a time).
    async with admin(mongodb_url, db_name) as users:
        key = await users.key(ADMIN)
    async with (
        instances(mongodb_url, db_name, tmp_path, 2, "--mongodb-timeout", "1") as cluster,
        live_client(cluster[0].url, key) as on_a,
        live_client(cluster[1].url, key) as on_b,
    ):
        clients = (on_a, on_b)
        start = (await on_a.call("system.info"))["position"]
        five = (sample(f"s{n}", "someone") for n in range(5))
        first = await direct(mongodb_url, db_name, inserts(*five))
        for client in clients:
            await client.wait_position(first)

        def kill_the_streams() -> int:
            operations = change_stream_cursors(mongodb_url, db_name)
            with pymongo.MongoClient(mongodb_url) as client:
                for operation in operations:
                    client.admin.command("killOp", op=operation["opid"])
            return len(operations)

        assert await trio.to_thread.run_sync(kill_the_streams) == 2
        for instance in cluster:
            await instance.process.wait_for_line("the change stream failed", timeout=10)
        killed = await direct(mongodb_url, db_name, updates(("s0", {"host": "after the kill"})))
        with trio.move_on_after(6):  # a quiet moment: 6 times the timeout
            await on_a.wait(lambda: False, 10)
        last = await direct(mongodb_url, db_name, updates(("s0", {"host": "after the quiet"})))
        want = expected_for(ADMIN, await committed(mongodb_url, db_name, start, last))
        assert len(want) == 7
        for instance, client in zip(cluster, clients, strict=True):
            await client.wait_position(last)
            got = samples_of(client)
            failed = [
                line.split(": ", 1)[-1][:160]
                for line in instance.process.lines
                if "change stream failed" in line
            ]
            assert got == want, (
                f"{instance.name}: {len(got)} messages for 7 changes, positions "
                f"{[m['position'] for m in got]}; the stream failed {len(failed)} times: "
                f"{failed}; {first_difference(got, want)}"
            )
            assert len(failed) == 1, f"the quiet moment failed the stream too: {failed}"
        assert killed < last


async def test_instances_started_at_once_on_a_new_database_all_start(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    # The way a deployment starts: several instances at the same moment, one uploads folder.
    # (A race: each round is another chance to lose it.)
    names = [f"{db_name}_{n}" for n in range(4)]
    try:
        for n, name in enumerate(names):
            base = tmp_path / f"round{n}"
            async with instances(mongodb_url, name, base, 4, at_once=True) as cluster:
                assert all(alive(instance) for instance in cluster)
            # ... and the folder is still the one MongoDB knows: a later instance starts too.
            async with instances(mongodb_url, name, base, 1, prefix="later") as (later,):
                assert alive(later)
    finally:
        with pymongo.MongoClient(mongodb_url) as client:
            for name in names:
                client.drop_database(name)


async def test_an_update_response_shows_no_state_its_connection_has_not_been_sent(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    # A client keeps its copy of a sample from the change messages, and from the samples the
    # responses return. A response must not show it a state that a change message it has
    # not been sent yet will then take back (the write fence's purpose, for what the response
    # shows: vtrio/framework/_collection.py).
    alice = User("alice")
    async with admin(mongodb_url, db_name) as users:
        alice_key = await users.key(alice)
    async with (
        instances(mongodb_url, db_name, tmp_path, 3) as cluster,
        writers_and_watchers(cluster, alice_key, alice_key) as (writers, _),
    ):
        one = await writers[0].call("samples.create", {"name": "contended", "reads": "r.fq"})
        answers: list[Answer] = []
        for burst in range(8):
            answers += await contend(writers, one["id"], burst, 24, 16)
        ahead = [a for a in answers if not a.answered_sent]
        assert ahead == [], (
            f"{len(ahead)} of {len(answers)} samples.update responses showed a state their "
            f"connection had not been sent: {ahead[:3]}"
        )

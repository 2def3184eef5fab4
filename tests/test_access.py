"""Who sees what: a user never receives, by any path, a sample (or a job of a sample) they may
not read — not through ``list``, ``get`` or any other method, nor through a change message."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.live import settings_for
from tests.rpc_client import RpcClient, is_change, rpc_client
from vtrio.framework import FORBIDDEN, NOT_FOUND
from vtrio.server import App, open_app
from vtrio.virtool import (
    COLLECTIONS,
    RIGHTS,
    Identity,
    can_read,
    can_write,
    readable_filter,
    writable_filter,
)

READS = b"@r\nACGT\n+\nIIII\n"


@pytest.fixture
async def app(mongodb_url: str, db_name: str, tmp_path: Path) -> AsyncIterator[App]:
    async with open_app(settings_for(mongodb_url, db_name, tmp_path)) as app:
        (tmp_path / "uploads" / "r.fq").write_bytes(READS)
        yield app


async def create(client: RpcClient, name: str, **fields: object) -> str:
    return (await client.call("samples.create", {"name": name, "reads": "r.fq", **fields}))["id"]


async def nothing_more_for(client: RpcClient, marker_writer: RpcClient, name: str) -> None:
    """Assert ``client`` received no change message besides those already taken: a sample
    everyone may read is created, and it is the next message ``client`` gets."""
    await create(marker_writer, name, all_read=True)
    change = await client.next_change()
    assert (change["operation"], change["data"].get("name")) == ("insert", name), change
    assert client.changes == []


async def test_a_private_sample_reaches_no_one_else_until_shared(app: App) -> None:
    async with (
        rpc_client(app, "alice") as alice,
        rpc_client(app, "bob") as bob,
        rpc_client(app, "root", admin=True) as admin,
    ):
        private = await create(alice, "private", host="secret host")
        await alice.call("samples.update", {"id": private, "isolate": "changed"})
        job = await alice.call("jobs.create", {"task": "sample_stats", "sample_id": private})
        await alice.change(is_change("jobs", "update", id=job["id"], state="complete"))

        # Bob: not by list, get, or any method that names it...
        listing = await bob.call("samples.list")
        assert (listing["items"], listing["total"]) == ([], 0)
        assert (await bob.call("samples.list", {"prefix": "priv"}))["total"] == 0
        for method, params in [
            ("samples.get", {"id": private}),
            ("samples.update", {"id": private, "host": "mine now"}),
            ("samples.delete", {"id": private}),
            ("jobs.create", {"task": "sample_stats", "sample_id": private}),
            ("jobs.get", {"id": job["id"]}),
            ("jobs.cancel", {"id": job["id"]}),
        ]:
            error = await bob.fails(method, params)
            assert error.code == NOT_FOUND, method
            assert "secret" not in error.message
        assert (await bob.call("jobs.list"))["total"] == 0
        assert (await bob.call("jobs.list", {"sample_id": private}))["items"] == []
        # ...nor by a change message: the sample's insert and updates, the job's states.
        await nothing_more_for(bob, admin, "marker-1")

        # An administrator sees everything.
        assert (await admin.call("samples.get", {"id": private}))["host"] == "secret host"
        assert (await admin.call("jobs.get", {"id": job["id"]}))["state"] == "complete"
        admin_saw = await admin.change(is_change("samples", "insert", id=private))
        assert admin_saw["data"]["host"] == "secret host"

        # Shared with everyone: to bob it is new (an insert), and he reads it every way.
        await alice.call("samples.update", {"id": private, "all_read": True})
        shared = await bob.change(is_change("samples", "insert", id=private))
        assert shared["data"]["all_read"] is True
        assert shared["data"]["host"] == "secret host"
        # Its jobs follow it: bob hears of the job, and may read it.
        job_shared = await bob.change(is_change("jobs", "insert", id=job["id"]))
        assert job_shared["data"]["access"]["all_read"] is True
        assert (await bob.call("samples.get", {"id": private}))["name"] == "private"
        assert private in [s["id"] for s in (await bob.call("samples.list"))["items"]]
        assert (await bob.call("jobs.get", {"id": job["id"]}))["state"] == "complete"
        # Read, not write.
        error = await bob.fails("samples.update", {"id": private, "host": "mine now"})
        assert error.code == FORBIDDEN

        # Unshared again: to bob it is gone (a delete, carrying only the ids), and he is not
        # told of later changes.
        await alice.call("samples.update", {"id": private, "all_read": False})
        assert (await bob.change(is_change("samples", "delete")))["data"] == [private]
        assert (await bob.change(is_change("jobs", "delete")))["data"] == [job["id"]]
        await alice.call("samples.update", {"id": private, "host": "new secret"})
        assert (await bob.fails("samples.get", {"id": private})).code == NOT_FOUND
        await nothing_more_for(bob, admin, "marker-2")


async def test_group_rights(app: App) -> None:
    async with (
        rpc_client(app, "alice", groups=["lab"]) as alice,
        rpc_client(app, "carol", groups=["lab", "field"]) as carol,
        rpc_client(app, "dave", groups=["field"]) as dave,
    ):
        grouped = await create(alice, "grouped", group="lab")  # group set, no right yet
        assert (await carol.fails("samples.get", {"id": grouped})).code == NOT_FOUND

        await alice.call("samples.update", {"id": grouped, "group_read": True})
        assert (await carol.change(is_change("samples", "insert", id=grouped)))["data"]
        assert (await carol.call("samples.get", {"id": grouped}))["group"] == "lab"
        assert (await dave.fails("samples.get", {"id": grouped})).code == NOT_FOUND
        assert (await carol.fails("samples.update", {"id": grouped, "host": "x"})).code == 403

        await alice.call("samples.update", {"id": grouped, "group_write": True})
        assert (await carol.call("samples.update", {"id": grouped, "host": "x"}))["host"] == "x"
        # A group member with the write right still may not change the sharing.
        error = await carol.fails("samples.update", {"id": grouped, "group": "field"})
        assert error.code == FORBIDDEN
        await nothing_more_for(dave, alice, "marker")


async def test_deleting_tells_only_those_who_could_read(app: App) -> None:
    async with (
        rpc_client(app, "alice", groups=["lab"]) as alice,
        rpc_client(app, "carol", groups=["lab"]) as carol,
        rpc_client(app, "bob") as bob,
    ):
        grouped = await create(alice, "grouped", group="lab", group_read=True)
        private = await create(alice, "private")
        await alice.call("samples.delete", {"id": grouped})
        await alice.call("samples.delete", {"id": private})
        marker = await create(alice, "marker", all_read=True)

        assert await changes_until(alice, marker) == [
            ("insert", grouped), ("insert", private), ("delete", [grouped]),
            ("delete", [private]), ("insert", marker),
        ]  # fmt: skip
        assert await changes_until(carol, marker) == [
            ("insert", grouped), ("delete", [grouped]), ("insert", marker),
        ]  # fmt: skip
        assert await changes_until(bob, marker) == [("insert", marker)]


async def changes_until(client: RpcClient, last_id: str) -> list[tuple[str, object]]:
    """``(operation, id or ids)`` of every change message up to the one about ``last_id``."""
    seen: list[tuple[str, object]] = []
    while not seen or seen[-1][1] != last_id:
        change = await client.next_change()
        data = change["data"]
        seen.append((change["operation"], data["id"] if isinstance(data, dict) else data))
    return seen


async def test_the_filters_are_the_rule(app: App) -> None:
    """The MongoDB filters that answer list calls decide exactly as the rule that answers get
    calls and change messages: checked on every combination of owner, group and rights, and on
    documents of shapes another program may have written."""
    documents = [
        {"_id": index, "user": user, "group": group, **dict(zip(RIGHTS, rights, strict=True))}
        for index, (user, group, rights) in enumerate(
            itertools.product(
                ["bob", "alice"], [None, "lab", "field"], itertools.product([False, True], repeat=4)
            )
        )
    ]
    malformed = [
        {"user": ["bob"], "all_read": True},  # an array where a string belongs
        {"user": 7, "all_read": True},
        {"user": "alice", "group": ["lab"], "group_read": True},
        {"user": "bob", "all_read": "yes"},  # a right that is not true or false
        {"group": "lab", "group_read": True},  # no owner at all
    ]
    documents += [{"_id": len(documents) + n, **doc} for n, doc in enumerate(malformed)]
    await app.db.rules.insert_many(documents)
    identities = [
        Identity("bob", "bob", False, frozenset({"lab"}), "k1"),
        Identity("carol", "carol", False, frozenset(), "k2"),
        Identity("root", "root", True, frozenset(), "k3"),
    ]
    samples, jobs = COLLECTIONS["samples"], COLLECTIONS["jobs"]
    for identity in identities:
        readable = {doc["_id"] for doc in await app.db.rules.find(readable_filter(identity))}
        writable = {doc["_id"] for doc in await app.db.rules.find(writable_filter(identity))}
        assert readable == {doc["_id"] for doc in documents if can_read(identity, doc)}
        assert writable == {doc["_id"] for doc in documents if can_write(identity, doc)}
        assert writable <= readable
        assert all(samples.sees(identity, doc) == can_read(identity, doc) for doc in documents)
        assert all(jobs.sees(identity, {"access": d}) == can_read(identity, d) for d in documents)
        # Unknown documents and jobs that carry no access fields: administrators only.
        assert samples.sees(identity, None) == jobs.sees(identity, {"state": "x"}) == identity.admin
    # Malformed documents are an administrator's only; the combinations cover both answers.
    assert not any(can_read(identities[0], doc) for doc in documents[-len(malformed) :])
    assert 0 < sum(can_read(identities[0], doc) for doc in documents) < len(documents)

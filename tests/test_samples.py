"""The ``samples.*`` methods over real connections: every method, every error, and reads files
that try to leave ``uploads/``."""

from __future__ import annotations

import gzip
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.live import settings_for
from tests.rpc_client import RpcClient, is_change, rpc_client
from vtrio.framework import CONFLICT, FORBIDDEN, INVALID_PARAMS, NOT_FOUND
from vtrio.server import App, open_app

FASTQ = b"@read1\nACGT\n+\nIIII\n"


@pytest.fixture
async def app(mongodb_url: str, db_name: str, tmp_path: Path) -> AsyncIterator[App]:
    (tmp_path / "data").mkdir()  # tmp_path itself holds files outside the data directory
    async with open_app(settings_for(mongodb_url, db_name, tmp_path / "data")) as app:
        yield app


@pytest.fixture
def uploads(app: App) -> Path:
    folder = app.settings.data_dir / "uploads"
    (folder / "reads.fq").write_bytes(FASTQ)
    return folder


@pytest.fixture
async def alice(app: App, uploads: Path) -> AsyncIterator[RpcClient]:
    async with rpc_client(app, "alice", groups=["lab"]) as client:
        yield client


async def create(client: RpcClient, name: str, **fields: object) -> dict:
    return await client.call("samples.create", {"name": name, "reads": "reads.fq", **fields})


# --- create and get ---------------------------------------------------------------------------


async def test_create_and_get(app: App, alice: RpcClient) -> None:
    before = datetime.now(UTC)
    sample = await create(alice, "  Sample 1 ", host="Vitis vinifera", isolate="A-7")

    assert set(sample) == {
        "id", "name", "host", "isolate", "reads", "user", "group", "created_at", "quality",
        "group_read", "group_write", "all_read", "all_write",
    }  # fmt: skip
    assert sample["name"] == "Sample 1"  # stripped
    assert (sample["host"], sample["isolate"], sample["reads"]) == (
        "Vitis vinifera",
        "A-7",
        "reads.fq",
    )
    assert (sample["user"], sample["group"], sample["quality"]) == ("alice", None, None)
    assert not any(
        sample[right] for right in ("group_read", "group_write", "all_read", "all_write")
    )
    created = datetime.fromisoformat(sample["created_at"])
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC)

    assert await alice.call("samples.get", {"id": sample["id"]}) == sample
    inserted = await alice.change(is_change("samples", "insert"))
    assert inserted["data"] == sample
    stored = await app.db.samples.find_one({"_id": sample["id"]})
    assert stored is not None and stored["name"] == "Sample 1"


async def test_create_with_sharing_and_group(alice: RpcClient) -> None:
    sample = await create(alice, "shared", group="lab", group_read=True, all_read=True)
    assert (sample["group"], sample["group_read"], sample["all_read"]) == ("lab", True, True)
    assert (sample["group_write"], sample["all_write"]) == (False, False)
    error = await alice.fails(
        "samples.create", {"name": "other", "reads": "reads.fq", "group": "not-mine"}
    )
    assert error.code == FORBIDDEN
    assert "not-mine" in error.message


async def test_names_are_unique_per_owner_and_tell_no_one_of_others_samples(
    app: App, alice: RpcClient
) -> None:
    await create(alice, "dup")
    error = await alice.fails("samples.create", {"name": " dup ", "reads": "reads.fq"})
    assert error.code == CONFLICT
    assert "'dup'" in error.message
    assert (await alice.call("samples.list"))["total"] == 1
    # Bob cannot learn that alice has a private sample named "dup": the name is free for him.
    shared = await create(alice, "shared", all_read=True, all_write=True)
    async with rpc_client(app, "bob") as bob:
        mine = await bob.call("samples.create", {"name": "dup", "reads": "reads.fq"})
        assert mine["user"] == "bob"
        # Nor by renaming a sample of hers he may change: names are the owner's to choose.
        error = await bob.fails("samples.update", {"id": shared["id"], "name": "dup"})
        assert error.code == FORBIDDEN
        assert "rename" in error.message


async def test_get_unknown(alice: RpcClient) -> None:
    error = await alice.fails("samples.get", {"id": "nope"})
    assert error.code == NOT_FOUND
    assert "nope" in error.message


# --- the reads file ---------------------------------------------------------------------------


async def test_reads_files_that_are_accepted(alice: RpcClient, uploads: Path) -> None:
    (uploads / "sub").mkdir()
    (uploads / "sub" / "nested.fastq").write_bytes(FASTQ)
    (uploads / "zipped.fq.gz").write_bytes(gzip.compress(FASTQ))
    (uploads / "alias.fq").symlink_to("sub/nested.fastq")  # a link that stays inside
    accepted = {
        "./sub//nested.fastq": "sub/nested.fastq",
        "zipped.fq.gz": "zipped.fq.gz",
        "alias.fq": "alias.fq",
    }
    for index, (name, stored) in enumerate(accepted.items()):
        sample = await alice.call("samples.create", {"name": f"s{index}", "reads": name})
        assert sample["reads"] == stored


async def test_reads_files_that_are_refused(
    app: App, alice: RpcClient, uploads: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.fq"  # a valid FASTQ file, but not in uploads/
    outside.write_bytes(FASTQ)
    (uploads / "escape.fq").symlink_to(outside)
    (uploads / "escape_dir").symlink_to(tmp_path)
    (uploads / "loop.fq").symlink_to("loop.fq")
    (uploads / "folder").mkdir()
    (uploads / "empty.fq").write_bytes(b"")
    (uploads / "notes.txt").write_text("these are not reads\n")
    (uploads / "notes.txt.gz").write_bytes(gzip.compress(b">fasta\nACGT\n"))
    (uploads / "broken.fq.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    refused = {
        "../outside.fq": "not a file name inside uploads/",
        "sub/../../outside.fq": "not a file name inside uploads/",
        str(outside): "not a file name inside uploads/",
        "/etc/passwd": "not a file name inside uploads/",
        "..\\outside.fq": "not a file name inside uploads/",
        "reads.fq\x00.txt": "not a file name inside uploads/",
        "escape.fq": "leads outside uploads/",
        "escape_dir/outside.fq": "leads outside uploads/",
        "loop.fq": "cannot be used",
        "missing.fq": "no file 'missing.fq' in uploads/: upload it first",
        "reads.fq/inner": "cannot be used: not a directory",
        "x" * 300: "cannot be used: file name too long",
        "folder": "not a regular file",
        ".": "not a regular file",
        "empty.fq": "is empty",
        "notes.txt": "is not FASTQ",
        "notes.txt.gz": "is not FASTQ",
        "broken.fq.gz": "is not a readable gzip file",
    }
    for name, reason in refused.items():
        error = await alice.fails("samples.create", {"name": "s", "reads": name})
        assert error.code == INVALID_PARAMS, name
        assert error.message.startswith("invalid params: reads: "), error.message
        assert reason in error.message, (name, error.message)
        assert error.data[0]["field"] == "reads"
    assert await app.db.samples.count_documents({}) == 0
    assert alice.changes == []


# --- list -------------------------------------------------------------------------------------


async def test_list_pages_and_filters(app: App, alice: RpcClient) -> None:
    names = ["beta-2", "alpha-1", "beta-1", "alpha-2", "gamma", "beta-3", "a.b"]
    for name in names:
        await create(alice, name)
    await app.db.samples.update_many({}, {"$set": {"quality": {"count": 1}}})

    first = await alice.call("samples.list", {"limit": 3})
    assert [s["name"] for s in first["items"]] == ["a.b", "alpha-1", "alpha-2"]
    assert first["total"] == 7
    assert isinstance(first["next"], str)  # an opaque cursor
    assert "quality" not in first["items"][0]  # the listing leaves the statistics out
    second = await alice.call("samples.list", {"limit": 3, "after": first["next"]})
    assert [s["name"] for s in second["items"]] == ["beta-1", "beta-2", "beta-3"]
    third = await alice.call("samples.list", {"limit": 3, "after": second["next"]})
    assert [s["name"] for s in third["items"]] == ["gamma"]
    assert third["next"] is None

    skipped = await alice.call("samples.list", {"skip": 5, "limit": 10})
    assert [s["name"] for s in skipped["items"]] == ["beta-3", "gamma"]

    beta = await alice.call("samples.list", {"prefix": "beta"})
    assert [s["name"] for s in beta["items"]] == ["beta-1", "beta-2", "beta-3"]
    assert beta["total"] == 3
    # The prefix is literal text, not a pattern.
    assert [s["name"] for s in (await alice.call("samples.list", {"prefix": "a."}))["items"]] == [
        "a.b"
    ]
    assert (await alice.call("samples.list", {"prefix": ".*"}))["total"] == 0

    error = await alice.fails("samples.list", {"limit": 1000})
    assert error.code == INVALID_PARAMS


# --- update -----------------------------------------------------------------------------------


async def test_update(alice: RpcClient) -> None:
    sample = await create(alice, "s1")
    await alice.change(is_change("samples", "insert"))

    updated = await alice.call(
        "samples.update", {"id": sample["id"], "host": "Malus domestica", "all_read": True}
    )
    assert updated["host"] == "Malus domestica"
    assert updated["all_read"] is True
    assert updated["name"] == "s1"
    change = await alice.change(is_change("samples", "update", id=sample["id"]))
    assert change["data"] == updated

    # An update with nothing to change changes nothing and returns the sample.
    assert await alice.call("samples.update", {"id": sample["id"]}) == updated

    await create(alice, "s2")
    conflict = await alice.fails("samples.update", {"id": sample["id"], "name": "s2"})
    assert conflict.code == CONFLICT
    missing = await alice.fails("samples.update", {"id": "nope", "host": "x"})
    assert missing.code == NOT_FOUND
    foreign = await alice.fails("samples.update", {"id": sample["id"], "group": "not-mine"})
    assert foreign.code == FORBIDDEN
    unknown = await alice.fails("samples.update", {"id": sample["id"], "reads": "other.fq"})
    assert unknown.code == INVALID_PARAMS
    assert (await alice.call("samples.get", {"id": sample["id"]}))["name"] == "s1"


async def test_writes_need_the_write_right(app: App, alice: RpcClient) -> None:
    readable = await create(alice, "readable", all_read=True)
    writable = await create(alice, "writable", all_read=True, all_write=True)
    async with rpc_client(app, "bob") as bob:
        error = await bob.fails("samples.update", {"id": readable["id"], "host": "x"})
        assert error.code == FORBIDDEN
        error = await bob.fails("samples.delete", {"id": readable["id"]})
        assert error.code == FORBIDDEN

        # With the write right, bob may change the sample but not who sees it.
        assert (await bob.call("samples.update", {"id": writable["id"], "host": "x"}))["host"]
        error = await bob.fails("samples.update", {"id": writable["id"], "all_read": False})
        assert error.code == FORBIDDEN
        assert "sharing" in error.message
    assert (await alice.call("samples.get", {"id": readable["id"]}))["host"] == ""


# --- delete -----------------------------------------------------------------------------------


async def test_delete(app: App, alice: RpcClient) -> None:
    sample = await create(alice, "doomed")
    assert await alice.call("samples.delete", {"id": sample["id"]}) == {"id": sample["id"]}
    change = await alice.change(is_change("samples", "delete"))
    assert change["data"] == [sample["id"]]
    assert (await alice.fails("samples.get", {"id": sample["id"]})).code == NOT_FOUND
    assert (await alice.fails("samples.delete", {"id": sample["id"]})).code == NOT_FOUND
    # The name is free again.
    assert (await create(alice, "doomed"))["id"] != sample["id"]
    assert await app.db.samples.count_documents({}) == 1


async def test_reads_are_checked_through_the_real_folder(alice: RpcClient, uploads: Path) -> None:
    """A folder symlinked *into* uploads/ from elsewhere is outside it, whatever the path says."""
    elsewhere = uploads.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "r.fq").write_bytes(FASTQ)
    os.symlink(elsewhere, uploads / "inbox")
    error = await alice.fails("samples.create", {"name": "s", "reads": "inbox/r.fq"})
    assert "leads outside uploads/" in error.message

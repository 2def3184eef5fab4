"""The embedded mongod: a real child process, started and stopped by ``run_mongod``."""

from __future__ import annotations

from pathlib import Path

import pymongo
import pytest
import trio

from tests.processes import kill, mongods_using
from vtrio.mongod import MongodError, run_mongod


@pytest.fixture(autouse=True)
def no_stray_mongod(tmp_path: Path):
    yield
    for pid in mongods_using(tmp_path):
        kill(pid)


def test_session_mongod_is_a_writable_replica_set(mongodb_url: str, db_name: str) -> None:
    with pymongo.MongoClient(mongodb_url) as client:
        assert client.admin.command("hello")["setName"] == "rs0"
        client[db_name].things.insert_one({"a": 1})
        assert client[db_name].things.count_documents({}) == 1


async def test_restart_on_a_new_port_keeps_data_and_becomes_primary(tmp_path: Path) -> None:
    urls = []
    for attempt in range(2):
        async with run_mongod(tmp_path) as url:
            urls.append(url)
            client: pymongo.MongoClient = pymongo.MongoClient(url)
            try:
                things = client.vtrio.things
                if attempt == 0:
                    await trio.to_thread.run_sync(things.insert_one, {"_id": "kept"})
                else:
                    assert await trio.to_thread.run_sync(things.find_one, {"_id": "kept"})
            finally:
                client.close()
        assert mongods_using(tmp_path) == []
    assert urls[0] != urls[1]  # each start took a free port of its own


async def test_a_second_mongod_on_the_same_data_is_refused(tmp_path: Path) -> None:
    async with run_mongod(tmp_path):
        with pytest.raises(MongodError, match="in use by another mongod"):
            async with run_mongod(tmp_path):
                pass
        assert len(mongods_using(tmp_path)) == 1


async def test_cancelling_the_block_stops_mongod(tmp_path: Path) -> None:
    with trio.CancelScope() as scope:
        async with run_mongod(tmp_path):
            assert len(mongods_using(tmp_path)) == 1
            scope.cancel()
            await trio.sleep_forever()
    assert mongods_using(tmp_path) == []


async def test_a_mongod_that_cannot_start_says_why(tmp_path: Path) -> None:
    not_mongod = tmp_path / "mongod"
    not_mongod.write_text("#!/bin/sh\nexit 3\n")
    not_mongod.chmod(0o755)
    with pytest.raises(MongodError, match="exited with code 3"):
        async with run_mongod(tmp_path, binary=not_mongod):
            pass

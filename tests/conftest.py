"""Fixtures shared by every test: one real mongod for the whole session.

pytest-trio's async fixtures are function-scoped, so the session's mongod runs in a thread of
its own under a separate ``trio.run``, through the same ``run_mongod`` the server uses; the
session's end stops it and joins the thread, leaving no process behind.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest
import trio

from vtrio.framework import run_mongod


class SessionMongod:
    """A mongod running in a background trio thread until ``stop`` is called."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._started: queue.Queue[tuple[str, trio.lowlevel.TrioToken] | BaseException] = (
            queue.Queue()
        )
        self._stop_requested: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        started = self._started.get(timeout=90)
        if isinstance(started, BaseException):
            raise started
        self.url, self._token = started

    async def _main(self) -> None:
        stop = trio.Event()
        self._stop_requested = stop
        try:
            async with run_mongod(self._data_dir) as url:
                self._started.put((url, trio.lowlevel.current_trio_token()))
                await stop.wait()
        except BaseException as exc:
            self._started.put(exc)
            raise

    def stop(self) -> None:
        assert self._stop_requested is not None
        trio.from_thread.run_sync(self._stop_requested.set, trio_token=self._token)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the session's mongod did not stop"


@pytest.fixture(scope="session")
def mongodb_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's real mongod (a single-node replica set on 127.0.0.1)."""
    mongod = SessionMongod(tmp_path_factory.mktemp("mongod"))
    try:
        yield mongod.url
    finally:
        mongod.stop()


_db_names = itertools.count()


@pytest.fixture
def db_name(mongodb_url: str) -> Iterator[str]:
    """A database of the test's own, dropped after it."""
    name = f"vtrio_test_{next(_db_names)}"
    yield name
    with pymongo.MongoClient(mongodb_url) as client:
        client.drop_database(name)

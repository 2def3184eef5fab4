"""The embedded mongod: a real grandchild process, run under its keeper by ``run_mongod``.

Every test runs real processes (vtrio, the keeper, mongod) and waits for what it checks by
polling under a deadline, never by sleeping and hoping.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

import pymongo
import pytest
import trio

from tests.processes import VtrioProcess, kill, mongods_using, vtrio_process
from vtrio.framework import MongodError, run_mongod, running_mongod
from vtrio.framework._mongod import _KEEPER, STOP_TIMEOUT

T = TypeVar("T")

# Time for a mongod to go once it has been told to stop: its stop timeout, and some to spare.
GONE_WITHIN = STOP_TIMEOUT + 2


@pytest.fixture(autouse=True)
def no_stray_mongod(tmp_path: Path):
    yield
    for pid in mongods_using(tmp_path):
        kill(pid)


def server_args(data_dir: Path) -> list[str]:
    return ["--port", "0", "--data-dir", str(data_dir), "--shutdown-timeout", "5"]


# --- looking at processes -----------------------------------------------------------------------


def state_of(pid: int) -> str | None:
    """The one-letter state of a process (``Z``: exited, not reaped), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def gone(pid: int) -> bool:
    """Exited: reaped, or a zombie (here PID 1 does not reap the orphans it inherits)."""
    return state_of(pid) in {None, "Z"}


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def keeper_of(mongod: int) -> int:
    """The keeper above ``mongod``; fails (rather than signal some other process) if none."""
    keeper = parent_of(mongod)
    argv = Path(f"/proc/{keeper}/cmdline").read_bytes().split(b"\0")
    assert os.fsencode(_KEEPER) in argv, f"mongod's parent is not a keeper: {argv}"
    return keeper


def wait_for(check: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``check`` until it returns something true, for ``timeout`` seconds at most."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.01)
    return result


async def eventually(check: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``check`` until it returns something true, for ``timeout`` seconds at most."""
    try:
        with trio.fail_after(timeout):
            while not (result := check()):
                await trio.sleep(0.01)
    except trio.TooSlowError:
        raise AssertionError(f"not {what} within {timeout} s") from None
    return result


def ping(url: str) -> None:
    client: pymongo.MongoClient = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    with client:
        assert client.admin.command("ping")["ok"] == 1


@asynccontextmanager
async def vtrio_in_a_group_of_its_own(args: Sequence[str]) -> AsyncIterator[VtrioProcess]:
    """Like ``vtrio_process``, but vtrio leads a process group, as a shell's foreground job
    does: a Ctrl-C can then be sent to the whole group without reaching the tests."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VTRIO_")}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vtrio", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment,
        process_group=0,
    )
    child = VtrioProcess(process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(child.collect_output)
        try:
            yield child
        finally:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
            nursery.cancel_scope.cancel()


# --- starting, stopping, and what the block sees -----------------------------------------------


def test_session_mongod_is_a_writable_replica_set(mongodb_url: str, db_name: str) -> None:
    client: pymongo.MongoClient = pymongo.MongoClient(mongodb_url)
    with client:
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


async def test_mongod_exiting_cancels_the_block_and_says_why(tmp_path: Path) -> None:
    with pytest.raises(MongodError, match="mongod exited with code -9"):  # not in a group
        async with run_mongod(tmp_path):
            [mongod] = mongods_using(tmp_path)
            kill(mongod)
            with trio.fail_after(GONE_WITHIN):
                await trio.sleep_forever()  # until the keeper's exit cancels the block


async def test_an_exception_from_the_block_comes_out_as_it_is(tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="the block's own"):
        async with run_mongod(tmp_path):
            raise LookupError("the block's own")
    assert mongods_using(tmp_path) == []


# --- nothing outlives vtrio ---------------------------------------------------------------------


async def test_kill_9_of_vtrio_stops_its_mongod_and_the_next_start_is_ready(
    tmp_path: Path,
) -> None:
    async with vtrio_process(server_args(tmp_path)) as first:
        await first.wait_ready()
        [mongod] = mongods_using(tmp_path)
        first.process.kill()  # SIGKILL: vtrio has no say in what happens next
        assert await first.wait(5) == -signal.SIGKILL
    await eventually(lambda: gone(mongod), GONE_WITHIN, "mongod stopped by its keeper")
    assert mongods_using(tmp_path) == []

    async with vtrio_process(server_args(tmp_path)) as second:
        with second.explained():
            await second.wait_ready()
            assert len(mongods_using(tmp_path)) == 1
            assert "stray" not in second.output  # the keeper left nothing to clean up
        second.signal(signal.SIGTERM)
        assert await second.wait(GONE_WITHIN) == 0, second.output
    assert mongods_using(tmp_path) == []


async def test_a_stray_mongod_is_stopped_and_the_start_goes_on(tmp_path: Path) -> None:
    async with vtrio_process(server_args(tmp_path)) as first:
        await first.wait_ready()
        [mongod] = mongods_using(tmp_path)
        keeper = keeper_of(mongod)
        kill(keeper)  # first, so that it cannot stop mongod when vtrio goes
        await eventually(lambda: gone(keeper), 5, "the keeper killed")
        first.process.kill()
        await first.wait(5)
    assert mongods_using(tmp_path) == [mongod]  # it survived both ...
    assert parent_of(mongod) != keeper  # ... re-parented: a stray

    async with vtrio_process(server_args(tmp_path)) as second:
        with second.explained():
            await second.wait_ready()
            assert f"stopping mongod (pid {mongod}), left running" in second.output
            assert gone(mongod)
            [new_mongod] = mongods_using(tmp_path)
            assert new_mongod != mongod
        second.signal(signal.SIGTERM)
        assert await second.wait(GONE_WITHIN) == 0, second.output
    assert mongods_using(tmp_path) == []


async def test_a_mongod_whose_keeper_lost_its_vtrio_is_a_stray(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with vtrio_process(server_args(tmp_path)) as first:
        await first.wait_ready()
        [mongod] = mongods_using(tmp_path)
        keeper = keeper_of(mongod)
        # A stopped keeper can neither stop mongod nor exit when vtrio goes: it stays alive,
        # mongod's parent, but serves no one.
        os.kill(keeper, signal.SIGSTOP)
        try:
            await eventually(lambda: state_of(keeper) == "T", 5, "the keeper stopped")
            first.process.kill()
            await first.wait(5)
            assert mongods_using(tmp_path) == [mongod] and parent_of(mongod) == keeper

            with caplog.at_level(logging.INFO, logger="vtrio.framework._mongod"):
                async with run_mongod(tmp_path) as url:
                    await trio.to_thread.run_sync(ping, url)
                    assert gone(mongod)  # it has exited (its stopped parent cannot reap it)
                    assert len(mongods_using(tmp_path)) == 1
            assert f"stopping mongod (pid {mongod})" in caplog.text
        finally:
            os.kill(keeper, signal.SIGCONT)
    # Resumed, it finds its pipe closed and its child exited, and exits as mongod did.
    await eventually(lambda: gone(keeper), 5, "the resumed keeper gone")


# --- what is, and is not, a mongod in use -------------------------------------------------------


async def test_a_data_dir_that_a_live_vtrio_runs_is_refused_naming_it(tmp_path: Path) -> None:
    async with vtrio_process(server_args(tmp_path)) as server:
        await server.wait_ready()
        [mongod] = mongods_using(tmp_path)
        running = running_mongod(tmp_path)
        assert running is not None and running.pid == mongod  # admin commands would use it

        in_use = rf"in use by another mongod \(pid {mongod}, run by process {server.process.pid}\)"
        with pytest.raises(MongodError, match=in_use):
            async with run_mongod(tmp_path):
                pass
        assert mongods_using(tmp_path) == [mongod]  # untouched
        await trio.to_thread.run_sync(ping, running.url)

        server.signal(signal.SIGTERM)
        assert await server.wait(GONE_WITHIN) == 0, server.output
    assert mongods_using(tmp_path) == []
    assert running_mongod(tmp_path) is None


@pytest.fixture
def zombie_named_mongod(tmp_path: Path) -> Iterator[int]:
    """The pid of a child of the tests named ``mongod`` that has exited and is not reaped."""
    program = tmp_path / "bin" / "mongod"
    program.parent.mkdir()
    true = shutil.which("true")
    assert true is not None
    program.symlink_to(true)  # a process's name is that of the file it was started from
    child = subprocess.Popen([program])
    try:
        wait_for(lambda: state_of(child.pid) == "Z", 5, "a zombie")
        assert Path(f"/proc/{child.pid}/comm").read_text() == "mongod\n"
        yield child.pid
    finally:
        child.wait()


async def test_a_zombie_named_in_the_lock_file_is_not_a_live_mongod(
    tmp_path: Path, zombie_named_mongod: int
) -> None:
    (tmp_path / "mongodb").mkdir()
    (tmp_path / "mongodb" / "mongod.lock").write_text(f"{zombie_named_mongod}\n")
    async with run_mongod(tmp_path) as url:
        await trio.to_thread.run_sync(ping, url)
    assert state_of(zombie_named_mongod) == "Z"  # left alone


# --- signals ------------------------------------------------------------------------------------


async def test_ctrl_c_of_the_foreground_group_stops_vtrio_and_then_mongod(tmp_path: Path) -> None:
    async with vtrio_in_a_group_of_its_own(server_args(tmp_path)) as server:
        await server.wait_ready()
        [mongod] = mongods_using(tmp_path)
        os.killpg(server.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        with server.explained():
            assert await server.wait(GONE_WITHIN) == 0
            assert "mongodb: stopped" in server.output  # stopped by vtrio, last, not by the ^C
    assert gone(mongod)
    assert mongods_using(tmp_path) == []


async def test_the_keeper_ignores_sigint_and_stops_mongod_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    # SIGINT comes first, and would kill a keeper that did not ignore it (code -2, mongod left
    # running); the SIGTERM then stops mongod cleanly, and the keeper exits as mongod did.
    with pytest.raises(MongodError, match="mongod exited with code 0"):
        async with run_mongod(tmp_path):
            [mongod] = mongods_using(tmp_path)
            keeper = keeper_of(mongod)
            os.kill(keeper, signal.SIGINT)
            os.kill(keeper, signal.SIGTERM)
            with trio.fail_after(GONE_WITHIN):
                await trio.sleep_forever()  # until the keeper's exit cancels the block
    assert gone(mongod)


# --- the keeper on its own ------------------------------------------------------------------------


def keeper(*command: str | Path, stop_timeout: float = 5.0) -> list[str]:
    return [sys.executable, "-I", "-S", str(_KEEPER), str(os.getpid()), str(stop_timeout)] + [
        str(word) for word in command
    ]


@pytest.mark.parametrize(
    ("script", "returncode"),
    [("exit 3", 3), ("kill -SEGV $$", -signal.SIGSEGV), ("kill -KILL $$", -signal.SIGKILL)],
)
async def test_the_keeper_exits_as_its_child_did(script: str, returncode: int) -> None:
    async with trio.open_nursery() as nursery:
        # Its stdin kept open: at end-of-file it would stop the child before the script ran.
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                keeper("/bin/sh", "-c", script),
                stdin=subprocess.PIPE,
                check=False,
            )
        )
        with trio.fail_after(5):
            assert await process.wait() == returncode
        assert process.stdin is not None
        await process.stdin.aclose()


async def test_the_keeper_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = f"trap '' TERM; : > {ready}; exec sleep 60"
    stubborn = keeper("/bin/sh", "-c", script, stop_timeout=0.5)
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, stubborn, stdin=subprocess.PIPE, check=False)
        )
        await eventually(ready.exists, 5, "the child ignoring SIGTERM")
        assert process.stdin is not None
        stopping = time.perf_counter()
        await process.stdin.aclose()  # end-of-file: stop the child
        with trio.fail_after(5):
            assert await process.wait() == -signal.SIGKILL
        assert time.perf_counter() - stopping >= 0.5  # it had its stop timeout first

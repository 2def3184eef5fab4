"""``python -m vtrio`` as a user runs it: a real child process with its embedded mongod."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pymongo
import pytest
import trio

from tests.live import RawClient, connect
from tests.processes import kill, mongods_using, run_vtrio, vtrio_process

GRACE = 5.0


@pytest.fixture(autouse=True)
def no_stray_mongod(tmp_path: Path):
    """Whatever a test asserts, no mongod it caused outlives it."""
    yield
    for pid in mongods_using(tmp_path):
        kill(pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_args(data_dir: Path, *extra: str) -> list[str]:
    return ["--port", "0", "--data-dir", str(data_dir), "--shutdown-timeout", str(GRACE), *extra]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_embedded_server_keeps_data_across_restart_and_stops_cleanly(
    tmp_path: Path, signum: signal.Signals
) -> None:
    mongod_port = free_port()
    args = server_args(tmp_path, "--mongod-port", str(mongod_port))
    url = f"mongodb://127.0.0.1:{mongod_port}/?directConnection=true"

    async with vtrio_process(args) as server:
        assert (await server.wait_ready()).startswith("ws://127.0.0.1:")
        assert len(mongods_using(tmp_path)) == 1
        with pymongo.MongoClient(url) as client:
            client.vtrio.notes.insert_one({"_id": "kept", "text": "survives a restart"})
        server.signal(signum)
        assert await server.wait(GRACE + 2) == 0, server.output
    assert mongods_using(tmp_path) == []
    assert "mongodb: stopped" in server.output

    async with vtrio_process(args) as server:
        await server.wait_ready()
        with pymongo.MongoClient(url) as client:
            assert client.vtrio.notes.find_one({"_id": "kept"})["text"] == "survives a restart"
        server.signal(signum)
        assert await server.wait(GRACE + 2) == 0, server.output
    assert mongods_using(tmp_path) == []


async def test_second_sigint_stops_at_once(tmp_path: Path, mongodb_url: str, db_name: str) -> None:
    database = ["--mongodb-url", mongodb_url, "--db-name", db_name]
    args = server_args(tmp_path, *database, "--shutdown-timeout", "60")
    async with vtrio_process(args) as server:
        url = await server.wait_ready()
        key = await trio.to_thread.run_sync(new_key_for, database, tmp_path)
        # A client that never answers the close frame holds a graceful shutdown for 60 s ...
        stubborn = await RawClient.connect(url, key)
        server.signal(signal.SIGINT)
        assert await stubborn.close_code() == 1001  # told at once
        await server.wait_for_line("stopping gracefully")
        with trio.move_on_after(1):
            await server.process.wait()
        assert server.process.returncode is None  # ... and it is holding it
        server.signal(signal.SIGINT)  # ... until a second Ctrl-C
        assert await server.wait(10) == 0, server.output
        stubborn.close()


def new_key_for(database: list[str], data_dir: Path) -> str:
    common = [*database, "--data-dir", str(data_dir)]
    assert run_vtrio(["users", "create", "bob", *common]).returncode == 0
    return run_vtrio(["keys", "create", "bob", *common]).stdout.strip()


async def test_occupied_port_fails_naming_the_service(
    tmp_path: Path, mongodb_url: str, db_name: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--port", str(port), "--data-dir", str(tmp_path), "--mongodb-url", mongodb_url,
                "--db-name", db_name]  # fmt: skip
        async with vtrio_process(args) as server:
            assert await server.wait(60) == 1
    last = server.lines[-1]
    assert last.startswith("vtrio: listener failed to start:"), server.output
    assert "Traceback" not in server.output


async def test_embedded_mongod_stops_when_a_later_service_fails(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = ["--port", str(taken.getsockname()[1]), "--data-dir", str(tmp_path)]
        async with vtrio_process(args) as server:
            assert await server.wait(60) == 1
    assert "mongodb: stopped" in server.output
    assert mongods_using(tmp_path) == []


async def test_unreachable_mongodb_fails_naming_the_service(tmp_path: Path) -> None:
    url = f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=500"
    args = server_args(tmp_path, "--mongodb-url", url, "--mongodb-timeout", "1")
    async with vtrio_process(args) as server:
        assert await server.wait(30) == 1
    assert server.lines[-1].startswith("vtrio: database failed to start:"), server.output


async def test_data_dir_in_use_by_another_mongod_fails_clearly(tmp_path: Path) -> None:
    async with vtrio_process(server_args(tmp_path)) as first:
        await first.wait_ready()
        async with vtrio_process(server_args(tmp_path)) as second:
            assert await second.wait(30) == 1
        assert "in use by another mongod" in second.lines[-1], second.output
        first.signal(signal.SIGTERM)
        assert await first.wait(GRACE + 2) == 0, first.output
    assert mongods_using(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--port", "70000"], "--port"),
        (["--port", "http"], "--port"),
        (["--mongodb-url", "postgres://nope"], "--mongodb-url"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (["--handshake-timeout", "0"], "--handshake-timeout"),
    ],
)
def test_bad_settings_exit_2_with_one_line(tmp_path: Path, args: list[str], names: str) -> None:
    result = run_vtrio(["--data-dir", str(tmp_path), *args, "users", "create", "x"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"vtrio: error: {names}:")


def test_bad_setting_from_environment_names_the_variable(tmp_path: Path) -> None:
    result = run_vtrio(
        ["users", "create", "x"], env={"VTRIO_PORT": "-3", "VTRIO_DATA_DIR": str(tmp_path)}
    )
    assert result.returncode == 2
    assert result.stderr.startswith("vtrio: error: VTRIO_PORT:"), result.stderr


def test_unusable_data_dir_exits_2(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = run_vtrio(["--data-dir", str(not_a_dir)])
    assert result.returncode == 2
    assert result.stderr.startswith("vtrio: error: --data-dir:"), result.stderr


def test_flag_wins_over_environment(tmp_path: Path) -> None:
    result = run_vtrio(
        ["--port", "70000"], env={"VTRIO_PORT": "9950", "VTRIO_DATA_DIR": str(tmp_path)}
    )
    assert result.stderr.startswith("vtrio: error: --port:")


def test_help_documents_every_setting() -> None:
    import dataclasses

    from vtrio.config import Settings, env_of, flag_of

    result = run_vtrio(["--help"])
    assert result.returncode == 0
    for f in dataclasses.fields(Settings):
        assert flag_of(f.name) in result.stdout
        assert env_of(f.name) in result.stdout


def test_readme_documents_every_setting() -> None:
    import dataclasses

    from vtrio.config import Settings, env_of, flag_of

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"`{flag_of(f.name)}` | `{env_of(f.name)}`" in readme, f.name


async def test_admin_commands_work_with_and_without_the_embedded_server(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    # No server running: the command starts the embedded mongod for itself, and stops it.
    created = await trio.to_thread.run_sync(run_vtrio, ["users", "create", "alice", *data])
    assert created.returncode == 0, created.stderr
    assert mongods_using(tmp_path) == []

    async with vtrio_process(server_args(tmp_path)) as server:
        url = await server.wait_ready()
        # The server is running: the commands use its mongod.
        made = await trio.to_thread.run_sync(run_vtrio, ["keys", "create", "alice", *data])
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        assert made.stdout == key + "\n" and key.startswith("vt_")  # the key alone
        assert len(mongods_using(tmp_path)) == 1
        async with connect(url, key):
            pass  # the new key opens a connection to the running server
        server.signal(signal.SIGTERM)
        assert await server.wait(GRACE + 2) == 0

    listed = await trio.to_thread.run_sync(run_vtrio, ["keys", "list", "alice", *data])
    assert listed.returncode == 0, listed.stderr
    assert key not in listed.stdout and len(listed.stdout.splitlines()) == 1
    duplicate = await trio.to_thread.run_sync(run_vtrio, ["users", "create", "alice", *data])
    assert duplicate.returncode == 1
    assert duplicate.stderr.strip() == "vtrio: a user named 'alice' exists already"
    assert mongods_using(tmp_path) == []


async def test_a_service_dying_while_running_stops_the_server_naming_it(tmp_path: Path) -> None:
    # Writes in flight when MongoDB vanished wait out their operation timeout: keep it short.
    async with vtrio_process(server_args(tmp_path, "--mongodb-timeout", "2")) as server:
        await server.wait_ready()
        [mongod] = mongods_using(tmp_path)
        kill(mongod)
        with server.explained():
            assert await server.wait(20) == 1
    assert server.lines[-1].startswith("vtrio: mongodb failed: mongod exited with code -9"), (
        server.output
    )
    assert "listener: stopped" in server.output  # the rest of the tree was torn down in order
    assert "Traceback" not in server.output

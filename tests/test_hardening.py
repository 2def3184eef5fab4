"""What an attacker, a crash or a race does to vtrio, tried as each would: a FIFO swapped for a
reads file, mongod dying under load, half-open sockets, broken frames, odd documents."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection

from tests.http_servers import Reply, serve
from tests.live import RawClient, closed_with, connect, frame, new_key, settings_for
from tests.processes import VtrioProcess, mongods_using, run_vtrio, vtrio_process
from tests.rpc_client import rpc_client
from vtrio.framework import (
    INVALID_REQUEST,
    MAX_REQUEST_SIZE,
    PARSE_ERROR,
    SHUTTING_DOWN,
    CloseCode,
    ConnectionLimits,
)
from vtrio.server import App, open_app

READS = b"@r1\nACGT\n+\nIIII\n"


@pytest.fixture
async def app(mongodb_url: str, db_name: str, tmp_path: Path) -> AsyncIterator[App]:
    async with open_app(settings_for(mongodb_url, db_name, tmp_path)) as app:
        yield app


# ---- 1. a FIFO swapped in for a reads file ---------------------------------------------------


@contextmanager
def swapping(path: Path) -> Iterator[None]:
    """For the block, make ``path`` a regular FASTQ file and a FIFO by turns, as fast as a
    thread can rename them in (each rename atomic); then leave a regular file there."""
    regular, fifo = path.with_name("staged.regular"), path.with_name("staged.fifo")
    stop = threading.Event()

    def swap() -> None:
        to_fifo = True
        while not stop.is_set():
            if to_fifo:
                os.mkfifo(fifo)
                os.replace(fifo, path)
            else:
                regular.write_bytes(READS)
                os.replace(regular, path)
            to_fifo = not to_fifo

    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        regular.write_bytes(READS)
        os.replace(regular, path)


async def rpc(websocket: WebSocketConnection, method: str, params: dict[str, Any], n: int) -> dict:
    await websocket.send_message(
        json.dumps({"jsonrpc": "2.0", "id": n, "method": method, "params": params})
    )
    while True:
        frame = json.loads(await websocket.get_message())
        for message in frame if isinstance(frame, list) else [frame]:
            if message.get("id") == n and "jsonrpc" in message:
                return message


async def test_a_fifo_for_reads_is_refused_at_once_and_a_swap_race_never_hangs(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    os.mkfifo(uploads / "pipe.fq")  # nobody ever writes to it: opening it would block
    admin = ["--mongodb-url", mongodb_url, "--db-name", db_name, "--data-dir", str(tmp_path)]
    run_vtrio(["users", "create", "alice", *admin])
    key = run_vtrio(["keys", "create", "alice", *admin]).stdout.strip()
    args = ["--port", "0", "--shutdown-timeout", "3", *admin]
    async with vtrio_process(args) as server:
        url = await server.wait_ready()
        with server.explained():
            async with connect(url, key) as websocket:
                with trio.fail_after(5):
                    answer = await rpc(
                        websocket, "samples.create", {"name": "p", "reads": "pipe.fq"}, 0
                    )
                assert "not a regular file" in answer["error"]["message"]
                with swapping(uploads / "race.fq"), trio.fail_after(30):
                    answers = [
                        await rpc(
                            websocket, "samples.create", {"name": f"r{n}", "reads": "race.fq"}, n
                        )
                        for n in range(1, 121)
                    ]
            assert all(("result" in a) != ("error" in a) for a in answers)
            assert any("result" in a for a in answers)  # the race was real: some got through
            server.signal(signal.SIGINT)
            assert await server.wait(10) == 0


# ---- 3. mongod dying under the server ----------------------------------------------------------


async def test_mongod_dying_stops_the_server_within_the_grace_period_telling_clients(
    tmp_path: Path,
) -> None:
    with serve() as ncbi:
        ncbi.route("/efetch.fcgi", Reply(hold=True))  # a request that stays in flight
        admin = ["--data-dir", str(tmp_path)]
        args = ["--port", "0", "--shutdown-timeout", "3", "--mongodb-timeout", "10",
                "--ncbi-base-url", ncbi.url, *admin]  # fmt: skip
        async with vtrio_process(args) as server:
            url = await server.wait_ready()
            key = await _admin_key(server, tmp_path)
            with server.explained():
                async with connect(url, key) as websocket:
                    request = {"jsonrpc": "2.0", "id": 7, "method": "genbank.get",
                               "params": {"accession": "AB123456"}}  # fmt: skip
                    await websocket.send_message(json.dumps(request))
                    await ncbi.received(1)
                    [mongod] = mongods_using(tmp_path)
                    died = trio.current_time()
                    os.kill(mongod, signal.SIGKILL)
                    answer = json.loads(await _next_frame(websocket))
                    assert answer["id"] == 7 and answer["error"]["code"] == SHUTTING_DOWN
                    assert await closed_with(websocket) == CloseCode.INTERNAL_ERROR
                assert await server.wait(10) == 1
                assert trio.current_time() - died < 3 + 2  # the grace period, and exiting
                assert "mongodb failed: mongod exited" in server.lines[-1]
            ncbi.release()


async def _admin_key(server: VtrioProcess, data_dir: Path) -> str:
    admin = ["--data-dir", str(data_dir)]
    created = await trio.to_thread.run_sync(
        run_vtrio, ["users", "create", "root", "--admin", *admin]
    )
    assert created.returncode == 0, created.stderr
    keyed = await trio.to_thread.run_sync(run_vtrio, ["keys", "create", "root", *admin])
    return keyed.stdout.strip()


async def _next_frame(websocket: WebSocketConnection) -> str | bytes:
    with trio.fail_after(10):
        return await websocket.get_message()


# ---- 4. half-open connections -----------------------------------------------------------------


async def test_a_thousand_half_open_sockets_do_not_keep_a_real_client_out(app: App) -> None:
    port = int(app.url.rsplit(":", 1)[1].split("/")[0])
    key = await new_key(app)
    idle: list[trio.socket.SocketType] = []
    try:
        for n in range(1000):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))
            if n % 2:  # half a request, never finished
                await sock.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            idle.append(sock)
        with trio.fail_after(1):
            async with connect(app.url, key) as websocket:
                assert isinstance(await _system_info(websocket), dict)
    finally:
        for sock in idle:
            sock.close()


async def test_slowloris_with_a_small_connection_budget(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    settings = settings_for(mongodb_url, db_name, tmp_path, max_connections=40, max_handshakes=30)
    async with open_app(settings) as app:
        port = int(app.url.rsplit(":", 1)[1].split("/")[0])
        key = await new_key(app)
        idle = []
        for n in range(60):  # 30 half-sent requests, 30 silent sockets
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", port))
            if n % 2:
                await sock.send(b"GET /ws HTTP/1.1\r\n")
            idle.append(sock)
        try:
            with trio.fail_after(1):
                async with connect(app.url, key) as websocket:
                    assert isinstance(await _system_info(websocket), dict)
        finally:
            for sock in idle:
                sock.close()


async def _system_info(websocket: WebSocketConnection) -> Any:
    return (await rpc(websocket, "system.info", {}, 1))["result"]


# ---- 5. frames that break the protocol ------------------------------------------------------


BROKEN_FRAMES = {
    "unmasked client frame": (frame(0x1, b"hi", masked=False), 1002),
    "RSV1 set": (frame(0x1, b"hi", rsv=4), 1002),
    "RSV2 set": (frame(0x1, b"hi", rsv=2), 1002),
    "reserved data opcode": (frame(0x3, b"hi"), 1002),
    "reserved control opcode": (frame(0xB, b""), 1002),
    "invalid UTF-8": (frame(0x1, b"\xff\xfe"), 1007),
    "continuation without a start": (frame(0x0, b"x"), 1002),
    "control frame over 125 bytes": (frame(0x9, b"x" * 126), 1002),
    "fragmented control frame": (frame(0x9, b"x", fin=False), 1002),
    "new message inside a fragmented one": (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002),
    "close code out of range": (frame(0x8, struct.pack("!H", 999)), 1002),
    "reserved close code 1005": (frame(0x8, struct.pack("!H", 1005)), 1002),
    "close frame of one byte": (frame(0x8, b"\x03"), 1002),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_FRAMES))
async def test_a_protocol_violation_gets_the_close_frame_the_rfc_names(app: App, kind: str) -> None:
    data, code = BROKEN_FRAMES[kind]
    client = await RawClient.connect(app.url, await new_key(app))
    try:
        await client.sock.send(data)
        assert await client.close_code(timeout=10) == code
    finally:
        client.close()
    async with connect(app.url, await new_key(app)) as healthy:  # the server serves on
        assert isinstance(await _system_info(healthy), dict)


async def test_a_huge_frame_is_refused_unread_and_the_connection_serves_on(app: App) -> None:
    """Over the request limit, under the message limit, in one frame: refused from its header.
    Its payload is not valid UTF-8, so a server that decoded it would close with 1007."""
    huge = frame(0x1, b"\xff" * (MAX_REQUEST_SIZE + 1))
    # The header in two reads, the payload in many.
    await _refused_as_too_large(app, [huge[:1], huge[1:]], MAX_REQUEST_SIZE + 1)


async def test_the_request_size_limit_counts_bytes_in_a_fragmented_text_message(
    app: App,
) -> None:
    """Sent in fragments, a message is refused once whole; its size is its UTF-8 bytes, so
    four-byte characters cannot pass in four times the limit."""
    request = {"jsonrpc": "2.0", "id": 1, "method": "system.info", "params": {}}
    text = json.dumps({**request, "x": "\U0001f600" * (MAX_REQUEST_SIZE // 3)}, ensure_ascii=False)
    encoded = text.encode()
    assert len(text) < MAX_REQUEST_SIZE < len(encoded) < app.settings.max_message_size
    half = len(encoded) // 2  # a split inside a character: a fragment need not end on one
    fragments = [frame(0x1, encoded[:half], fin=False), frame(0x0, encoded[half:])]
    await _refused_as_too_large(app, fragments, len(encoded))


async def _refused_as_too_large(app: App, parts: list[bytes], size: int) -> None:
    """Send ``parts`` on a new connection, one after the other: the request they make is
    refused as ``size`` bytes, over the limit, and the connection serves on."""
    client = await RawClient.connect(app.url, await new_key(app))
    try:
        for part in parts:
            await _send_all(client.sock, part)
        [refusal] = await client.frames(1)
        assert refusal["id"] is None and refusal["error"]["code"] == INVALID_REQUEST
        assert f"not {size}" in refusal["error"]["message"]
        await _answers_system_info(client)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("payload", "count", "code"),
    [(b"\xff" * ((1 << 20) - 64), 22, INVALID_REQUEST), (b"x" * (250 << 10), 100, PARSE_ERROR)],
    ids=["too large", "not JSON"],
)
async def test_a_client_whose_messages_keep_being_refused_is_read_slower(
    app: App, payload: bytes, count: int, code: int
) -> None:
    """Past its burst of refused bytes, a client is read no faster than the refused rate, so
    its last refusal cannot come sooner than the rate allows (unpaced, this takes ~30 ms),
    while another client is answered meanwhile and the paced one is served on afterwards."""
    limits = ConnectionLimits()
    sent = count * len(payload)
    assert sent - len(payload) > limits.refused_burst + limits.refused_rate * 0.25
    attacker = await RawClient.connect(app.url, await new_key(app))
    answered_meanwhile: list[float] = []
    try:
        async with rpc_client(app, "victim") as victim, trio.open_nursery() as nursery:
            one = frame(0x1, payload)
            started = trio.current_time()

            async def call_meanwhile() -> None:
                while True:
                    await victim.call("system.info")
                    answered_meanwhile.append(trio.current_time())

            nursery.start_soon(call_meanwhile)
            nursery.start_soon(_send_all, attacker.sock, one * count)
            refusals = await attacker.frames(count)
            refused_all = trio.current_time()
            nursery.cancel_scope.cancel()
        assert [r["error"]["code"] for r in refusals] == [code] * count
        # The last refusal waits for all the others beyond the burst to be paid off.
        least = (sent - len(payload) - limits.refused_burst) / limits.refused_rate
        assert refused_all - started >= least
        assert any(started < at < refused_all - least / 2 for at in answered_meanwhile)
        await _answers_system_info(attacker)
    finally:
        attacker.close()


async def _answers_system_info(client: RawClient) -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": "system.info", "params": {}}
    await client.sock.send(frame(0x1, json.dumps(request).encode()))
    [answer] = await client.frames(1)
    assert answer["id"] == 1 and "version" in answer["result"]


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def test_the_message_size_limit_counts_bytes_not_characters(app: App) -> None:
    limit = app.settings.max_message_size
    four_byte_characters = "\U0001f600" * (limit // 3)  # fewer characters than the limit
    assert len(four_byte_characters) < limit < len(four_byte_characters.encode())
    async with connect(app.url, await new_key(app)) as websocket:
        await websocket.send_message(four_byte_characters)
        assert await closed_with(websocket) == CloseCode.MESSAGE_TOO_BIG


# ---- 8. documents of a shape vtrio does not expect ---------------------------------------------


async def test_a_job_without_access_is_an_administrators_only_never_an_error(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    other = app.db.client[app.db.name]
    await trio.to_thread.run_sync(
        lambda: other.jobs.insert_one(
            {"_id": "foreign", "task": "sample_stats", "state": "complete"}
        )
    )
    async with rpc_client(app, "alice") as alice, rpc_client(app, "root", admin=True) as root:
        for _ in range(2):
            error = await alice.fails("jobs.get", {"id": "foreign"})
            assert error.code == 404
        assert (await alice.call("jobs.list"))["total"] == 0
        assert (await root.call("jobs.get", {"id": "foreign"}))["state"] == "complete"
        assert (await root.call("jobs.list"))["total"] == 1
    assert caplog.text.count("'foreign' has unexpected access fields") == 1


# ---- 9. instances that would not share their files -------------------------------------------


async def test_a_second_instance_with_a_folder_of_its_own_refuses_to_start(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    common = ["--port", "0", "--mongodb-url", mongodb_url, "--db-name", db_name]
    async with vtrio_process([*common, "--data-dir", str(first)]) as a:
        await a.wait_ready()
        async with vtrio_process([*common, "--data-dir", str(second)]) as b:
            assert await b.wait(30) == 1
        assert "uploads failed to start: the uploads folder" in b.lines[-1], b.output
        assert "--uploads-dir" in b.lines[-1]
        shared = ["--uploads-dir", str(first / "uploads")]
        async with vtrio_process([*common, "--data-dir", str(second), *shared]) as c:
            await c.wait_ready()
            c.signal(signal.SIGTERM)
            assert await c.wait(10) == 0
        a.signal(signal.SIGTERM)
        assert await a.wait(10) == 0


async def test_cancelling_a_job_that_has_ended_says_so_plainly(app: App) -> None:
    await app.db.samples.insert_one({"_id": "s", "name": "s", "user": "alice"})
    await app.db.jobs.insert_one(
        {"_id": "j", "sample_id": "s", "state": "complete", "access": {"user": "alice"}}
    )
    async with rpc_client(app, "alice") as alice:
        error = await alice.fails("jobs.cancel", {"id": "j"})
    assert error.code == 409
    assert error.message == "job 'j' is complete already: it cannot be cancelled"


# ---- 10. JSON that is not JSON ----------------------------------------------------------------


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_not_json(app: App, constant: str) -> None:
    async with rpc_client(app, "alice") as alice:
        params = f'{{"skip": {constant}}}'
        await alice.send_text(
            f'{{"jsonrpc": "2.0", "id": 1, "method": "samples.list", "params": {params}}}'
        )
        response = await alice.response(None)
    assert response["error"]["code"] == PARSE_ERROR
    assert constant.lstrip("-") in response["error"]["message"]

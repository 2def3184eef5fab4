"""JSON-RPC 2.0 on ``/ws``: the protocol, its errors and bounds, and the methods of vtrio.api
(``system.info``, ``uploads.list``, ``genbank.get``), over real connections to the real app."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.http_servers import (
    SATELLITE_RECORD,
    TMV_RECORD,
    TMV_SEQUENCE,
    Reply,
    ScriptedServer,
    ncbi_efetch,
    serve,
)
from tests.live import settings_for
from tests.rpc_client import RpcClient, is_change, rpc_client
from vtrio import __version__
from vtrio.framework import (
    BUSY,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_BATCH,
    MAX_REQUEST_SIZE,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    PARSE_ERROR,
    UPSTREAM_FAILED,
)
from vtrio.server import App, open_app

EFETCH = "/entrez/eutils/efetch.fcgi"
MAX_IN_FLIGHT = 16  # RpcEndpoint's default


@pytest.fixture
def ncbi() -> Iterator[ScriptedServer]:
    with serve() as server:
        server.route(EFETCH, ncbi_efetch({"AB369276": TMV_RECORD, "NC_003620": SATELLITE_RECORD}))
        yield server


@pytest.fixture
async def app(
    mongodb_url: str, db_name: str, tmp_path: Path, ncbi: ScriptedServer
) -> AsyncIterator[App]:
    settings = settings_for(
        mongodb_url, db_name, tmp_path, ncbi_base_url=f"{ncbi.url}/entrez/eutils"
    )
    async with open_app(settings) as app:
        yield app


@pytest.fixture
async def client(app: App) -> AsyncIterator[RpcClient]:
    async with rpc_client(app) as client:
        yield client


async def still_answers(client: RpcClient) -> None:
    """The connection is open and serves requests."""
    assert (await client.call("system.info"))["version"] == __version__


# --- system.info, uploads.list ---------------------------------------------------------------


async def test_system_info(app: App, client: RpcClient) -> None:
    async with rpc_client(app, "bob"):
        info = await client.call("system.info")
    assert info["version"] == __version__
    assert 0 <= info["uptime"] < 60
    assert info["connections"] == 2
    assert info["jobs"] == {"waiting": 0, "running": 0, "complete": 0, "cancelled": 0, "error": 0}
    error = await client.fails("system.info", {"verbose": True})
    assert error.code == INVALID_PARAMS
    assert "verbose: unknown parameter" in error.message


async def test_uploads_list_shows_regular_files_only(
    app: App, client: RpcClient, tmp_path: Path
) -> None:
    uploads = tmp_path / "uploads"
    assert await client.call("uploads.list") == []
    (uploads / "b.fq").write_bytes(b"@r\nA\n+\nI\n")
    (uploads / "a.fq.gz").write_bytes(b"\x1f\x8b" + bytes(30))
    os.utime(uploads / "a.fq.gz", (1_700_000_000, 1_700_000_000))
    (uploads / "folder").mkdir()
    (uploads / "link.fq").symlink_to(uploads / "b.fq")

    files = await client.call("uploads.list")

    assert [(f["name"], f["size"]) for f in files] == [("a.fq.gz", 32), ("b.fq", 9)]
    assert files[0]["modified_at"] == "2023-11-14T22:13:20Z"
    assert datetime.fromisoformat(files[1]["modified_at"])


# --- genbank.get ------------------------------------------------------------------------------


async def test_genbank_get(client: RpcClient, ncbi: ScriptedServer) -> None:
    record = await client.call("genbank.get", {"accession": " ab369276 "})
    assert record["accession"] == "AB369276"
    assert record["accession_version"] == "AB369276.2"
    assert record["organism"] == "Tobacco mosaic virus"
    assert record["host"] == "Nicotiana tabacum cv. Xanthi"
    assert record["sequence"] == TMV_SEQUENCE
    assert ncbi.requests(EFETCH)[0].query["id"] == "AB369276"

    unknown = await client.fails("genbank.get", {"accession": "XY000001"})
    assert unknown.code == NOT_FOUND
    assert "XY000001" in unknown.message

    for accession in ("not an accession!", "", "A" * 33):
        invalid = await client.fails("genbank.get", {"accession": accession})
        assert invalid.code == INVALID_PARAMS
        assert "accession" in invalid.message
    assert len(ncbi.requests(EFETCH)) == 2  # invalid accessions never reach NCBI


async def test_genbank_get_when_ncbi_fails(client: RpcClient, ncbi: ScriptedServer) -> None:
    ncbi.route(EFETCH, Reply(body="<html>down for maintenance</html>"))
    error = await client.fails("genbank.get", {"accession": "AB369276"})
    assert error.code == UPSTREAM_FAILED
    assert "not a GenBank record" in error.message


# --- malformed frames and requests ------------------------------------------------------------


async def test_unparsable_frames(client: RpcClient) -> None:
    frames: list[str | bytes] = [
        "{not json",
        "",
        b"\xff\xfe{",  # a binary frame that is not UTF-8 JSON
        "[" * 200_000,  # deeper than the parser's recursion limit
        '{"jsonrpc": "2.0", "id": 1, "method": "\\ud800"}',  # a lone surrogate
    ]
    for frame in frames:
        await client.send_text(frame)
        response = await client.response(None)
        assert response["error"]["code"] == PARSE_ERROR, frame[:20]
        assert response["error"]["message"].startswith("not JSON")
        assert "result" not in response
    await still_answers(client)


@pytest.mark.parametrize(
    ("request_object", "answer_id"),
    [
        (5, None),
        ("system.info", None),
        ({}, None),
        ({"id": 1, "method": "system.info"}, 1),
        ({"jsonrpc": "1.0", "id": 2, "method": "system.info"}, 2),
        ({"jsonrpc": "2.0", "id": 3}, 3),
        ({"jsonrpc": "2.0", "id": 4, "method": ["system.info"]}, 4),
        ({"jsonrpc": "2.0", "id": True, "method": "system.info"}, None),
        ({"jsonrpc": "2.0", "id": {"x": 1}, "method": "system.info"}, None),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "system.info"}, None),
        ({"jsonrpc": "2.0", "id": 5, "method": "system.info", "params": 7}, 5),
        ({"jsonrpc": "2.0", "method": "system.info", "params": "x"}, None),  # bad notification
    ],
)
async def test_invalid_requests(client: RpcClient, request_object: object, answer_id: object):
    await client.send(request_object)
    response = await client.response(answer_id)
    assert response["jsonrpc"] == "2.0"
    assert response["error"]["code"] == INVALID_REQUEST
    assert response["error"]["message"].startswith("not a JSON-RPC 2.0 request")
    await still_answers(client)


async def test_ids_are_echoed(client: RpcClient) -> None:
    for request_id in ("abc", 0, -7, 2**62, None):
        await client.send({"jsonrpc": "2.0", "id": request_id, "method": "system.info"})
        response = await client.response(request_id)
        assert response["result"]["version"] == __version__


async def test_unknown_methods(client: RpcClient) -> None:
    error = await client.fails("samples.frobnicate")
    assert error.code == METHOD_NOT_FOUND
    assert "samples.frobnicate" in error.message
    error = await client.fails("x" * 100_000)
    assert error.code == METHOD_NOT_FOUND
    assert len(error.message) < 200  # the name is clipped, not echoed whole


async def test_invalid_params_name_the_field_and_what_was_expected(client: RpcClient) -> None:
    cases = [
        ("samples.get", {}, "id: required"),
        ("samples.get", {"id": 5}, "id: Input should be a valid string"),
        ("samples.get", {"id": ""}, "id: String should have at least 1 character"),
        ("samples.get", {"id": "a", "extra": 1}, "extra: unknown parameter"),
        ("samples.list", {"limit": "10"}, "limit: Input should be a valid integer"),
        ("samples.list", {"limit": True}, "limit: Input should be a valid integer"),
        ("samples.list", {"limit": 10.0}, "limit: Input should be a valid integer"),
        ("samples.list", {"limit": 101}, "limit: Input should be less than or equal to 100"),
        ("samples.list", {"skip": -1}, "skip: Input should be greater than or equal to 0"),
        ("samples.create", {"name": "s", "reads": "r.fq", "all_read": "yes"}, "all_read:"),
        ("jobs.create", {"task": "mine_bitcoin", "sample_id": "x"}, "task: Input should be"),
        ("samples.get", ["an", "array"], "params must be an object"),
    ]
    for method, params, expected in cases:
        error = await client.fails(method, params)
        assert error.code == INVALID_PARAMS, (method, params)
        assert error.message.startswith("invalid params: ")
        assert expected in error.message, (error.message, expected)
    error = await client.fails("samples.create", {"name": 1, "reads": 2, "host": 3})
    assert [problem["field"] for problem in error.data] == ["name", "reads", "host"]
    await still_answers(client)


async def test_huge_params_are_refused_and_change_nothing(app: App, client: RpcClient) -> None:
    # Under the 1 MiB frame limit, over the request limit: refused unread, so its id is unknown.
    await client.send_text(json.dumps(client.request_object("system.info", {"x": "x" * 900_000})))
    response = await client.response(None)
    assert response["error"]["code"] == INVALID_REQUEST
    assert f"at most {MAX_REQUEST_SIZE} bytes" in response["error"]["message"]
    huge = "x" * 200_000  # under both limits: read, and refused by its parameter's bound
    error = await client.fails("samples.create", {"name": huge, "reads": "r.fq"})
    assert error.code == INVALID_PARAMS
    assert "name: String should have at most 256 characters" in error.message
    assert len(error.message) < 500  # the value is not echoed
    error = await client.fails("samples.list", {"skip": 10**4000})
    assert error.code == INVALID_PARAMS
    many = {f"field{i}": i for i in range(10_000)}
    error = await client.fails("samples.get", {"id": "a", **many})
    assert error.code == INVALID_PARAMS
    assert "and 9990 more" in error.message
    await still_answers(client)
    assert await app.db.samples.count_documents({}) == 0
    assert client.changes == []


async def test_notifications_get_no_response(client: RpcClient) -> None:
    await client.send({"jsonrpc": "2.0", "method": "system.info"})
    await client.send({"jsonrpc": "2.0", "method": "no.such.method"})
    await client.send({"jsonrpc": "2.0", "method": "samples.get", "params": {"id": 5}})
    request = client.request_object("system.info")
    await client.send(request)
    # The next frame is the request's response: nothing came for the notifications.
    frame = json.loads(await client.websocket.get_message())
    assert frame["id"] == request["id"]


# --- batches ----------------------------------------------------------------------------------


async def test_a_batch_mixing_good_and_bad_requests(client: RpcClient) -> None:
    batch: list[Any] = [
        client.request_object("system.info"),
        client.request_object("no.such.method"),
        {"foo": 1},
        5,
        {"jsonrpc": "2.0", "method": "system.info"},  # a notification: no response
        client.request_object("samples.get", {"id": 1}),
        client.request_object("samples.get", {"id": "missing"}),
        client.request_object("uploads.list"),
    ]
    await client.send(batch)
    responses = await client.batch()
    assert [(r["id"], "result" in r, r.get("error", {}).get("code")) for r in responses] == [
        (batch[0]["id"], True, None),
        (batch[1]["id"], False, METHOD_NOT_FOUND),
        (None, False, INVALID_REQUEST),
        (None, False, INVALID_REQUEST),
        (batch[5]["id"], False, INVALID_PARAMS),
        (batch[6]["id"], False, NOT_FOUND),
        (batch[7]["id"], True, None),
    ]
    await still_answers(client)


async def test_empty_oversized_and_silent_batches(client: RpcClient) -> None:
    await client.send([])
    assert (await client.response(None))["error"]["code"] == INVALID_REQUEST
    await client.send([client.request_object("system.info") for _ in range(MAX_BATCH + 1)])
    error = (await client.response(None))["error"]
    assert error["code"] == INVALID_REQUEST
    assert str(MAX_BATCH) in error["message"]

    await client.send([{"jsonrpc": "2.0", "method": "system.info"}] * 3)  # notifications only
    request = client.request_object("system.info")
    await client.send(request)
    frame = json.loads(await client.websocket.get_message())
    assert frame["id"] == request["id"]  # nothing came for the batch of notifications

    full = [client.request_object("system.info") for _ in range(MAX_BATCH)]
    await client.send(full)
    responses = await client.batch()
    assert [r["id"] for r in responses] == [r["id"] for r in full]
    assert all("result" in r for r in responses)


# --- requests in flight -----------------------------------------------------------------------


async def test_requests_in_flight_are_bounded_and_cancelled_with_their_connection(
    app: App, ncbi: ScriptedServer
) -> None:
    ncbi.route(EFETCH, Reply(hold=True, body=TMV_RECORD))  # NCBI answers only when released
    async with rpc_client(app, "bob") as other, rpc_client(app) as client:
        held = [
            client.request_object("genbank.get", {"accession": "AB369276"})
            for _ in range(MAX_IN_FLIGHT)
        ]
        for request in held:
            await client.send(request)
        await ncbi.received(1, path=EFETCH)  # one is at NCBI, the others wait their turn

        busy = await client.fails("system.info")
        assert busy.code == BUSY
        assert str(MAX_IN_FLIGHT) in busy.message
        await client.send([client.request_object("system.info") for _ in range(3)])
        assert [r["error"]["code"] for r in await client.batch()] == [BUSY] * 3
        # The bound is per connection: the other one is served.
        assert (await other.call("system.info"))["connections"] == 2
        await client.websocket.aclose()

        # The held requests were cancelled, not completed (NCBI still holds its reply): the
        # connection's tasks are gone once the dispatcher no longer lists it.
        with trio.fail_after(5):
            while len(app.hub.connections) != 1:
                await trio.sleep(0.01)
        assert (await other.call("system.info"))["connections"] == 1
    ncbi.release()


async def test_a_batch_runs_within_the_free_slots(app: App, ncbi: ScriptedServer) -> None:
    ncbi.route(EFETCH, Reply(hold=True, body=TMV_RECORD))
    async with rpc_client(app) as client:
        for _ in range(MAX_IN_FLIGHT - 1):
            await client.send(client.request_object("genbank.get", {"accession": "AB369276"}))
        # One slot is free: the batch takes it and runs its requests one after the other.
        batch = [client.request_object("system.info") for _ in range(5)]
        await client.send(batch)
        responses = await client.batch()
        assert [r["id"] for r in responses] == [r["id"] for r in batch]
        assert all("result" in r for r in responses)
        ncbi.release()


async def test_a_response_never_overtakes_the_change_it_caused(app: App, client: RpcClient) -> None:
    await app.db.samples.insert_one({"_id": "s", "name": "s", "user": "alice"})
    await client.change(is_change("samples", "insert", id="s"))
    for n in range(20):
        request = client.request_object("samples.update", {"id": "s", "host": f"h{n}"})
        await client.send(request)
        assert (await client.response(request["id"]))["result"]["host"] == f"h{n}"
        # Frames are read in order: the change message came before the response.
        assert [c["data"]["host"] for c in client.changes] == [f"h{n}"]
        client.changes.clear()


async def test_a_frame_over_the_size_limit_closes_the_connection(client: RpcClient) -> None:
    """The one bad input that costs the connection: a frame too large to read (1009)."""
    await client.send_text("x" * (2**20 + 1))
    with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
        while True:
            await client.websocket.get_message()
    reason = closed.value.reason
    assert reason is not None and reason.code == 1009

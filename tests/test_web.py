"""Plain HTTP on the websocket's port: health, readiness, metrics and the static files, asked
for as a load balancer, Prometheus and a browser would, with httpx over loopback."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.live import RawClient, connect, settings_for
from tests.processes import run_vtrio, vtrio_process
from tests.rpc_client import rpc_client
from vtrio.server import App, open_app


@pytest.fixture
async def app(mongodb_url: str, db_name: str, tmp_path: Path) -> AsyncIterator[App]:
    async with open_app(settings_for(mongodb_url, db_name, tmp_path)) as app:
        yield app


def base_url(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://", 1).removesuffix("/ws")


@pytest.fixture
async def http(app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(app.url), timeout=10) as client:
        yield client


async def test_health_and_readiness(http: httpx.AsyncClient) -> None:
    health = await http.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = await http.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "mongodb": True, "changes": True, "accepting": True}
    assert ready.headers["content-type"] == "application/json"


async def test_metrics_count_what_happened(app: App, http: httpx.AsyncClient) -> None:
    async with rpc_client(app, "alice") as alice:
        await alice.call("system.info")
        await alice.fails("no.such.method")
        await app.db.samples.insert_one({"_id": "s", "name": "s", "user": "alice"})
        await alice.next_change()
    text = (await http.get("/metrics")).text
    lines = set(text.splitlines())
    assert 'vtrio_rpc_calls_total{method="system.info",outcome="ok"} 1.0' in lines
    assert 'vtrio_rpc_calls_total{method="unknown",outcome="-32601"} 1.0' in lines
    assert 'vtrio_rpc_duration_seconds_count{method="system.info"} 1.0' in lines
    assert "vtrio_connections 0.0" in lines  # alice has gone
    assert 'vtrio_connections_closed_total{code="1000"} 1.0' in lines
    assert 'vtrio_jobs{state="waiting"} 0.0' in lines
    assert any(line.startswith("vtrio_changes_total ") and float(line.split()[1]) >= 1
               for line in lines)  # fmt: skip
    assert any(line.startswith("vtrio_messages_delivered_total ") for line in lines)
    inserts = 'vtrio_mongodb_operation_duration_seconds_count{operation="insert_one"} '
    assert any(line.startswith(inserts) and float(line.split()[1]) >= 1 for line in lines)
    assert "vtrio_change_feed_live 1.0" in lines
    for histogram in ("mongodb_queue_seconds", "mongodb_job_calls", "write_fence_seconds"):
        assert any(line.startswith(f"vtrio_{histogram}_count ") and float(line.split()[1]) >= 1
                   for line in lines), histogram  # fmt: skip
    assert "# TYPE vtrio_rpc_duration_seconds histogram" in lines


async def test_the_dashboard_and_the_client_are_served_with_etags(http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<html" in page.text.lower()
    again = await http.get("/", headers={"If-None-Match": page.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")
    for path in ("/vtrio.js", "/dashboard.js"):
        script = await http.get(path)
        assert script.headers["content-type"] == "text/javascript; charset=utf-8", path
    assert (await http.get("/dashboard.css")).headers["content-type"].startswith("text/css")
    client = await http.get("/vtrio.js")
    head = await http.head("/vtrio.js")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(client.content)


@pytest.mark.parametrize(
    "path", ["/nope", "/../pyproject.toml", "/%2e%2e/pyproject.toml", "/dashboard/../README.md",
             "/static/vtrio.js", "//etc/passwd"],
)  # fmt: skip
async def test_nothing_else_is_served(http: httpx.AsyncClient, path: str) -> None:
    assert (await http.get(path)).status_code == 404


async def test_other_methods_and_broken_requests(app: App, http: httpx.AsyncClient) -> None:
    assert (await http.post("/health")).status_code == 405
    port = int(app.url.rsplit(":", 1)[1].split("/")[0])
    for request, status in [
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", b"431"),
    ]:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request)
                reply = await stream.receive_some()
        assert reply.split(b" ", 2)[1] == status, reply


async def test_a_stopping_server_is_not_ready_while_its_clients_drain(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    admin = ["--mongodb-url", mongodb_url, "--db-name", db_name, "--data-dir", str(tmp_path)]
    run_vtrio(["users", "create", "alice", *admin])
    key = run_vtrio(["keys", "create", "alice", *admin]).stdout.strip()
    async with vtrio_process(["--port", "0", "--shutdown-timeout", "5", *admin]) as server:
        url = await server.wait_ready()
        with server.explained():
            stubborn = await RawClient.connect(url, key)  # never answers the close frame
            async with httpx.AsyncClient(base_url=base_url(url), timeout=5) as http:
                assert (await http.get("/ready")).status_code == 200
                server.signal(signal.SIGTERM)
                assert await stubborn.close_code() == 1001
                ready = await http.get("/ready")
                assert (ready.status_code, ready.json()["accepting"]) == (503, False)
                assert (await http.get("/health")).status_code == 200
                with pytest.raises(Exception, match="503"):
                    async with connect(url, key):
                        pass
            assert await server.wait(10) == 0
            stubborn.close()

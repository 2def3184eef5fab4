"""The shared HTTP client, against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import trio
import trio.testing

from tests.http_servers import Reply, ScriptedServer, serve
from vtrio import __version__
from vtrio.framework._http import HttpClient, TotalTimeout, open_http_client


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with serve() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    async with open_http_client(connect_timeout=2, read_timeout=2, total_timeout=5) as client:
        yield client


# --- the client -----------------------------------------------------------------------------


async def test_user_agent_and_app_headers_reach_the_server(server: ScriptedServer) -> None:
    server.route("/hello", Reply(body="hi"))
    async with open_http_client(headers={"X-Vtrio-Instance": "test-1"}) as http:
        response = await http.get(f"{server.url}/hello", params={"q": "a b"})

    assert response.status_code == 200
    assert response.text == "hi"
    [request] = server.requests()
    assert request.headers["user-agent"] == f"vtrio/{__version__}"
    assert request.headers["x-vtrio-instance"] == "test-1"
    assert request.query == {"q": "a b"}
    assert http.headers["User-Agent"] == f"vtrio/{__version__}"


async def test_per_request_headers_add_to_the_client_headers(
    server: ScriptedServer, http: HttpClient
) -> None:
    server.route("/hello", Reply(body="hi"))
    await http.get(f"{server.url}/hello", headers={"Accept": "text/plain"})
    [request] = server.requests()
    assert request.headers["accept"] == "text/plain"
    assert request.headers["user-agent"] == f"vtrio/{__version__}"


async def test_statuses_are_answers_not_exceptions(
    server: ScriptedServer, http: HttpClient
) -> None:
    response = await http.get(f"{server.url}/nowhere")
    assert response.status_code == 404


@pytest.mark.parametrize(
    "settings",
    [
        {"connect_timeout": 0},
        {"read_timeout": -1},
        {"total_timeout": float("inf")},
        {"max_connections": 0},
    ],
)
async def test_bad_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be a positive"):
        async with open_http_client(**settings):  # type: ignore[arg-type]
            pass


async def test_the_client_is_closed_after_the_block(server: ScriptedServer) -> None:
    server.route("/hello", Reply(body="hi"))
    async with open_http_client() as http:
        await http.get(f"{server.url}/hello")
    with pytest.raises(RuntimeError):
        await http.get(f"{server.url}/hello")


async def test_connections_are_pooled_within_the_limit(server: ScriptedServer) -> None:
    # The first two requests are held until both have arrived; the other three queue for the
    # two connections, and every request rides one of them.
    server.route("/slow", Reply(hold=True, body="a"), Reply(hold=True, body="b"), Reply(body="c"))
    async with open_http_client(max_connections=2) as http, trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(http.get, f"{server.url}/slow")
        await server.received(2)
        server.release()

    requests = server.requests()
    assert len(requests) == 5
    assert len({r.client_port for r in requests}) <= 2


# --- timeouts and broken connections --------------------------------------------------------


async def test_read_timeout(server: ScriptedServer) -> None:
    server.route("/silent", Reply(hold=True, body="too late"))
    server.route("/ok", Reply(body="ok"))
    async with open_http_client(read_timeout=0.3, total_timeout=5) as http:
        started = trio.current_time()
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{server.url}/silent")
        assert 0.3 <= trio.current_time() - started < 2
        server.release()
        assert (await http.get(f"{server.url}/ok")).text == "ok"


async def test_total_timeout_holds_for_a_trickling_server(server: ScriptedServer) -> None:
    # One byte every 0.1 s: each read is well within the read timeout, the whole is not.
    server.route("/trickle", Reply(body=b"x" * 40, trickle=(1, 0.1)))
    server.route("/ok", Reply(body="ok"))
    async with open_http_client(read_timeout=1, total_timeout=0.5) as http:
        started = trio.current_time()
        with pytest.raises(TotalTimeout, match=r"total timeout of 0\.5 s") as caught:
            await http.get(f"{server.url}/trickle")
        elapsed = trio.current_time() - started
        assert 0.5 <= elapsed < 1.0
        assert isinstance(caught.value, httpx.TimeoutException)
        assert caught.value.request.url.path == "/trickle"
        assert (await http.get(f"{server.url}/ok")).text == "ok"


async def test_connection_reset(server: ScriptedServer, http: HttpClient) -> None:
    server.route("/reset", Reply(reset=True))
    server.route("/ok", Reply(body="ok"))
    # Depending on timing a reset reads as a broken connection or as a missing response.
    with pytest.raises((httpx.NetworkError, httpx.RemoteProtocolError)):
        await http.get(f"{server.url}/reset")
    assert (await http.get(f"{server.url}/ok")).text == "ok"


# --- cancellation ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_connections", [1, 2])
async def test_a_cancelled_request_leaves_the_client_usable(
    server: ScriptedServer, max_connections: int
) -> None:
    server.route("/held", Reply(hold=True, body="late"))
    server.route("/ok", Reply(body="ok"))
    async with open_http_client(max_connections=max_connections, total_timeout=3) as http:
        for round_ in range(1, 9):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(http.get, f"{server.url}/held")
                await server.received(round_, path="/held")  # the server holds the response
                nursery.cancel_scope.cancel()
            for _ in range(3):
                assert (await http.get(f"{server.url}/ok")).text == "ok"
        server.release()


async def test_cancelling_held_and_queued_requests_together(server: ScriptedServer) -> None:
    # With one connection, one request is held by the server and four wait for the connection
    # when they are all cancelled at once.
    server.route("/held", Reply(hold=True, body="late"))
    server.route("/ok", Reply(body="ok"))
    async with open_http_client(max_connections=1, total_timeout=3) as http:
        for round_ in range(1, 9):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(http.get, f"{server.url}/held")
                await server.received(round_, path="/held")
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(http.get, f"{server.url}/ok")
        server.release()
    assert len(server.requests("/held")) == 8  # only one request a round got its connection
    assert len(server.requests("/ok")) == 24


async def test_cancellations_at_random_moments_never_wedge_the_pool(
    server: ScriptedServer,
) -> None:
    # Concurrent requests on one connection, cut off by deadlines that expire while they wait
    # for the connection, connect, send or read, against a server that sometimes closes the
    # connection after answering. Against a bare httpx.AsyncClient (httpcore 1.0.9) this
    # wedges the pool within a few rounds: a request cancelled while queued is handed a new
    # connection that stays CONNECTING forever (httpcore #1093).
    rng = random.Random(1093)

    def answer(_request: object) -> Reply:
        time.sleep(rng.uniform(0, 0.002))
        return Reply(body="ok", headers={"Connection": "close"} if rng.random() < 0.5 else {})

    server.route("/x", answer)
    server.route("/ok", Reply(body="ok"))

    async def request_with_deadline(http: HttpClient, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await http.get(f"{server.url}/x")

    async with open_http_client(max_connections=1, total_timeout=2) as http:
        for _ in range(200):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(request_with_deadline, http, rng.uniform(0, 0.004))
            assert (await http.get(f"{server.url}/ok")).text == "ok"

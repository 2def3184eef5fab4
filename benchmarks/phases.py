"""The two load measurements the fan-out and slow-client benchmarks share.

- :func:`throughput`: the writer keeps calls in flight as fast as the server answers; the
  clients count the change messages they receive in 10 ms buckets, and the harness reads the
  server's (and the clients') CPU time at both ends of the window.
- :func:`latency`: the writer sends at a fixed rate; every client records, for every message,
  its receive time minus the send time the message carries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import trio

from benchmarks.procs import cpu_ns
from benchmarks.servers import ClientGroup, Server, WriterProcess, median, percentile

RAMP = 0.5
"""Seconds of load before a throughput window opens (queues and buffers reach steady state)."""
WINDOW_PER_CONNECTION = 8
"""Calls in flight per writer connection in max mode (vtrio answers at most 16 per connection)."""


@dataclass
class Throughput:
    deliveries_per_s: float
    server_cpu_per_delivery_s: float
    client_cpu_per_delivery_s: float
    writes_per_s: float
    errors: dict[str, int]
    others_cpu_per_delivery_s: float = 0.0
    """CPU per delivery of the ``others`` processes, over the same window."""
    close_codes: dict[str, int] | None = None
    """Clients closed by then (by close code): a figure from fewer clients than asked for."""
    messages_per_write: float = 0.0
    """Messages a client received per acknowledged write over the writer's whole run (1.00:
    every write reached every client; checked after the last ones arrived)."""


@dataclass
class Latency:
    p50_s: float
    p99_s: float
    samples: int
    expected: int
    writes: int


async def throughput(
    server: Server,
    clients: ClientGroup,
    writer: WriterProcess,
    ids: list[str],
    window: float,
    others: tuple[int, ...] = (),
) -> Throughput:
    result: dict[str, Any] = {}

    async def write() -> None:
        result.update(
            await writer.run(
                window + 60,
                mode="max",
                window=WINDOW_PER_CONNECTION,
                duration=RAMP + window,
                ids=ids,
            )
        )

    client_pids = [child.pid for child in clients.processes]
    before = await clients.stats()
    messages0, n_clients = before["messages"], max(1, before["open"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await trio.sleep(RAMP)
        t0, server0, clients0 = time.monotonic_ns(), cpu_ns(server.pid), _sum_cpu(client_pids)
        others0 = _sum_cpu(list(others))
        await trio.sleep(window)
        t1, server1, clients1 = time.monotonic_ns(), cpu_ns(server.pid), _sum_cpu(client_pids)
        others1 = _sum_cpu(list(others))
    await trio.sleep(0.3)  # the writer's last changes are on their way
    stats = await clients.stats(t0, t1)
    seconds = (t1 - t0) / 1e9
    deliveries = max(1, stats["window_messages"])
    elapsed = (result["t_end_ns"] - result["t_start_ns"]) / 1e9
    return Throughput(
        deliveries_per_s=stats["window_messages"] / seconds,
        server_cpu_per_delivery_s=((server1 or 0) - (server0 or 0)) / 1e9 / deliveries,
        client_cpu_per_delivery_s=(clients1 - clients0) / 1e9 / deliveries,
        writes_per_s=result["ok"] / elapsed if elapsed else 0.0,
        errors=result["errors"],
        others_cpu_per_delivery_s=(others1 - others0) / 1e9 / deliveries,
        close_codes=stats["close_codes"],
        messages_per_write=(stats["messages"] - messages0) / max(1, result["ok"]) / n_clients,
    )


@dataclass
class Drain:
    deliveries_per_s: float
    server_cpu_per_delivery_s: float
    others_cpu_per_delivery_s: float
    writes_per_s: float
    writes: int
    delivered: float  # of writes x clients
    last_delivery_after_s: float  # after the last write was acknowledged
    errors: dict[str, int]
    close_codes: dict[str, int]


async def drain(
    server: Server,
    clients: ClientGroup,
    writer: WriterProcess,
    ids: list[str],
    window: float,
    others: tuple[int, ...] = (),
    limit: float = 30.0,
) -> Drain:
    """The writer writes as fast as it is answered for ``window`` s; then wait (at most
    ``limit`` s) until every client has every change. Deliveries per second from the first
    write to the last delivery, and the servers' CPU over that time per delivery.

    Unlike :func:`throughput`, nothing assumes that deliveries keep up with the writes: a
    server whose writes are taken elsewhere (another instance) may fall behind and catch up
    after the writer stopped; that time counts.
    """
    before = await clients.stats()
    messages0, n = before["messages"], max(1, before["open"])
    server0, others0 = cpu_ns(server.pid) or 0, _sum_cpu(list(others))
    result = await writer.run(window + 60, mode="max", window=WINDOW_PER_CONNECTION,
                              duration=window, ids=ids)  # fmt: skip
    expected = result["ok"] * n
    deadline = trio.current_time() + limit
    while True:
        stats = await clients.stats()
        if stats["messages"] - messages0 >= expected or trio.current_time() >= deadline:
            break
        await trio.sleep(0.05)
    server1, others1 = cpu_ns(server.pid) or 0, _sum_cpu(list(others))
    received = stats["messages"] - messages0
    elapsed = max(1, stats["last_message_ns"] - result["t_start_ns"]) / 1e9
    deliveries = max(1, received)
    return Drain(
        deliveries_per_s=received / elapsed,
        server_cpu_per_delivery_s=(server1 - server0) / 1e9 / deliveries,
        others_cpu_per_delivery_s=(others1 - others0) / 1e9 / deliveries,
        writes_per_s=result["ok"] / max(1e-9, (result["t_end_ns"] - result["t_start_ns"]) / 1e9),
        writes=result["ok"],
        delivered=received / max(1, expected),
        last_delivery_after_s=max(0, stats["last_message_ns"] - result["t_end_ns"]) / 1e9,
        errors=result["errors"],
        close_codes=stats["close_codes"],
    )


async def latency(
    clients: ClientGroup, writer: WriterProcess, ids: list[str], rate: float, window: float,
    n_clients: int,
) -> Latency:  # fmt: skip
    await clients.record(True)
    result = await writer.run(window + 60, mode="rate", rate=rate, duration=window, ids=ids)
    await trio.sleep(0.5)  # the last messages are still on their way
    await clients.record(False)
    stats = await clients.stats()
    latencies = [value / 1e9 for value in stats["latencies"]]
    return Latency(
        p50_s=median(latencies),
        p99_s=percentile(latencies, 0.99),
        samples=len(latencies),
        expected=result["ok"] * n_clients,
        writes=result["ok"],
    )


async def warm_up(writer: WriterProcess, ids: list[str], seconds: float) -> int:
    """Writes as fast as answered for ``seconds``; how many were acknowledged."""
    result = await writer.run(seconds + 60, mode="max", window=WINDOW_PER_CONNECTION,
                              duration=seconds, ids=ids)  # fmt: skip
    return int(result["ok"])


def _sum_cpu(pids: list[int]) -> int:
    return sum(cpu_ns(pid) or 0 for pid in pids)

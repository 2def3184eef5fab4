"""Fan-out: change messages delivered per second, and write-to-delivery latency.

For 100 and for ``--clients`` connected clients (spread over ``--client-procs`` processes), a
writer process calls ``samples.update`` over JSON-RPC on 2 connections:

1. throughput: 8 calls in flight per connection, as fast as the server answers, for the window;
   figures: change messages delivered per second (summed over clients), server CPU time per
   delivered message (the figure that carries over to other machines), writes per second;
2. latency: ``--rate`` / N writes per second (a fixed delivery rate, default 5,000/s) for the
   window; every client records each message's
   receive time minus the send time it carries; figures: p50 and p99 over all deliveries.

Every write is a real one (two MongoDB round trips, then the dispatch), as a client would
cause. The clients' own CPU per delivery is reported too, to show they are not the bottleneck.
"""

from __future__ import annotations

from benchmarks import phases
from benchmarks.harness import Context
from benchmarks.servers import client_group, running_server, writer_process

TITLE = "fan-out throughput and latency"
NAME = "fanout"
SAMPLES = 10
WRITER_CONNECTIONS = 2


def sizes(ctx: Context) -> list[int]:
    return sorted({min(100, ctx.sizes.clients), ctx.sizes.clients})


async def run(ctx: Context) -> None:
    window = ctx.sizes.window
    for n in sizes(ctx):
        for side in ctx.sides():
            async with running_server(ctx, side) as server:
                ids = await server.create_samples(SAMPLES, ctx.fastq_files()[0].name)
                async with (
                    client_group(ctx, server, n) as clients,
                    writer_process(ctx, server, WRITER_CONNECTIONS) as writer,
                ):
                    await phases.warm_up(writer, ids, min(1.0, window))
                    result = await phases.throughput(server, clients, writer, ids, window)
                    lat = await phases.latency(clients, writer, ids, write_rate(ctx, n), window, n)
            record(ctx, side, n, result, lat)


def write_rate(ctx: Context, n: int) -> float:
    return ctx.options.rate / n


def record(ctx: Context, side: str, n: int, result: phases.Throughput, lat: phases.Latency) -> None:
    rate = write_rate(ctx, n)
    ctx.record(NAME, f"deliveries/s to {n} clients", side, result.deliveries_per_s, "/s", "higher")
    ctx.record(NAME, f"server CPU per delivery, {n} clients", side,
               result.server_cpu_per_delivery_s, "s")  # fmt: skip
    ctx.record(NAME, f"writes/s acknowledged, {n} clients", side, result.writes_per_s, "/s",
               "higher")  # fmt: skip
    ctx.record(NAME, f"client CPU per delivery, {n} clients", side,
               result.client_cpu_per_delivery_s, "s", "none")  # fmt: skip
    ctx.record(NAME, f"latency p50 at {rate:g} writes/s, {n} clients", side, lat.p50_s, "s")
    ctx.record(NAME, f"latency p99 at {rate:g} writes/s, {n} clients", side, lat.p99_s, "s")
    delivered = 100 * lat.samples / lat.expected if lat.expected else 0.0
    ctx.record(NAME, f"messages delivered at {rate:g} writes/s, {n} clients", side,
               min(delivered, 100.0), "%", "higher")  # fmt: skip
    ctx.log(
        f"{NAME}: {side} {n} clients: {result.deliveries_per_s:,.0f} deliveries/s "
        f"({result.server_cpu_per_delivery_s * 1e6:.1f} µs server CPU each, "
        f"{result.writes_per_s:,.0f} writes/s, errors {result.errors}); "
        f"latency p50 {lat.p50_s * 1e3:.1f} ms p99 {lat.p99_s * 1e3:.1f} ms"
    )

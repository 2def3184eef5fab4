"""Fan-out: change messages delivered per second, and write-to-delivery latency.

For 100 and for ``--clients`` connected clients (spread over ``--client-procs`` processes), a
writer process calls ``samples.update`` over JSON-RPC on 2 connections:

1. throughput: 8 calls in flight per connection, as fast as the server answers, for the window;
   figures: change messages delivered per second (summed over clients), server CPU time per
   delivered message (the figure that carries over to other machines), writes acknowledged per
   second, and messages received per acknowledged write and client over the writer's whole
   run (1.00: each write reached every client once, so deliveries/s = writes/s x clients);
2. latency: ``--rate`` / N writes per second (a fixed delivery rate, default 5,000/s) for the
   window; every client records each message's receive time minus the send time it carries;
   figures: p50 and p99 over all deliveries.

Every write is a real one, as a client would cause, and is acknowledged only once its change
has gone out: vtrio makes one ``findAndModify`` whose filter checks the caller's rights
(concurrent ones are coalesced into one bulk update, each caller's document then taken from
the change stream) and answers once its change stream has read the change and handed it to
every connection (the write fence); the baseline makes the same ``findAndModify`` and answers
after its in-process dispatch. So writes/s is bounded by the fan-out as well as by MongoDB. Each
change also reaches the writer's own 2 connections (both servers send every change to every
connection whose user may see it); deliveries count the N clients only. The clients' own CPU
per delivery is reported too, to show they are not the bottleneck.
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

        async def measure(side: str, n: int = n) -> None:
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

        # One after the other even in the smoke test: a vtrio started while another server writes
        # to the same mongod may stall its change stream for 10 s (see README, "Server issues").
        await ctx.each_side(measure, at_once_in_smoke=False)


def write_rate(ctx: Context, n: int) -> float:
    return ctx.options.rate / n


def record(ctx: Context, side: str, n: int, result: phases.Throughput, lat: phases.Latency) -> None:
    rate = write_rate(ctx, n)
    ctx.record(NAME, f"deliveries/s to {n} clients", side, result.deliveries_per_s, "/s", "higher")
    ctx.record(NAME, f"server CPU per delivery, {n} clients", side,
               result.server_cpu_per_delivery_s, "s")  # fmt: skip
    ctx.record(NAME, f"writes/s acknowledged, {n} clients", side, result.writes_per_s, "/s",
               "higher")  # fmt: skip
    ctx.record(NAME, f"messages per acknowledged write and client, {n} clients", side,
               result.messages_per_write, "", "none")  # fmt: skip
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
        f"{result.writes_per_s:,.0f} writes/s, errors {result.errors}, "
        f"{result.messages_per_write:.3f} messages per write and client); "
        f"latency p50 {lat.p50_s * 1e3:.1f} ms p99 {lat.p99_s * 1e3:.1f} ms"
    )

"""Cluster: two vtrio instances on one database, the change stream carrying every change.

vtrio only, for (a) and (c): the baseline has no multi-instance story (its changes are
dispatched in the process that made them, to that process's clients only). Two instances, A
and B, each a ``python -m vtrio`` with a data directory of its own, on one database of the
run's mongod, one uploads folder between them.

(a) **Write-to-delivery latency across instances.** min(100, ``--clients``) clients on A and as
    many on B; a writer calls ``samples.update`` through A at ``--rate`` / (2 x clients) writes
    per second (the same total deliveries per second as fan-out's latency test) for the window.
    Each client records, for each message, its receive time minus the send time it carries.
    Figures: p50 and p99 for the clients on A (the instance that took the write) and on B (the
    other one), and B's p99 minus A's (target: at most 10 ms). Both instances read the change
    from their own change stream; A also answers the write.

(b) **Fan-out with the change stream as the source**, against the baseline's in-process
    dispatch (the design vtrio replaced), at the same client count (``--clients``), in the same
    run. vtrio: the clients on A, the writer (8 calls in flight on each of 2 connections, as
    fast as answered, for the window) on B, so that A does nothing for a delivery but read it
    from its change stream and fan it out. Baseline: clients and writer on one server (it has no
    other source of changes). Nothing holds B's writers back for A's fan-out, so A may fall
    behind while they write and catch up after: the harness waits (at most 30 s) until every
    client has every change (:func:`benchmarks.phases.drain`). Figures: deliveries/s from the
    first write to the last delivery; CPU per delivery of the server the clients are on (the
    baseline's includes taking the writes: they cannot come from anywhere else) and of every
    server process (vtrio: A and B); writes/s acknowledged; how long after the last write's
    acknowledgement the last delivery came.

(c) **Resume.** ``--clients`` clients on A read live changes (a writer on B, ``--rate`` /
    clients writes/s for the window), each noting every position it receives; one more
    client on B does the same (the reference: it sees every change). Then, while the writer
    goes on through B at 50 writes/s: A is stopped (SIGINT, its clients get 1001), restarted
    (same port, data directory and database), and once it is ready the writer stops. Every
    client then reconnects to A at once with ``?since=`` its last position. Figures: the time
    from the reconnect to every client holding the final position (the reference's last), and
    to every handshake being done; how many changes each client missed while A was down; and
    the check: each client's count of changes and the CRC-32 of its positions in order equal the
    reference's, and no position came twice or out of order.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import trio

from benchmarks import phases
from benchmarks.harness import Context
from benchmarks.report import BASELINE, VTRIO
from benchmarks.servers import (
    Cluster,
    Server,
    client_group,
    median,
    percentile,
    running_cluster,
    running_server,
    writer_process,
)

TITLE = "two vtrio instances on one database"
NAME = "cluster"
SAMPLES = 10
WRITER_CONNECTIONS = 2
DOWN_RATE = 50.0
"""Writes per second through B while A is stopped and restarted."""
NO_MULTI_INSTANCE = "no multi-instance story"
STOP_DEADLINE = 30.0
CATCH_UP_LIMIT = 120.0


async def run(ctx: Context) -> None:
    first, _ = ctx.sides()
    if first == BASELINE:
        await _baseline_fanout(ctx)
    async with running_cluster(ctx, 2) as cluster:
        a, _ = cluster.servers
        ids = await a.create_samples(SAMPLES, ctx.fastq_files()[0].name)
        await _latency(ctx, cluster, ids)
        await _vtrio_fanout(ctx, cluster, ids)
        await _resume(ctx, cluster, ids)
    if first == VTRIO:
        await _baseline_fanout(ctx)


# --- (a) latency, same instance and the other one --------------------------------------------


async def _latency(ctx: Context, cluster: Cluster, ids: list[str]) -> None:
    a, b = cluster.servers
    n = min(100, ctx.sizes.clients)
    rate = ctx.options.rate / (2 * n)
    window = ctx.sizes.window
    async with (
        client_group(ctx, a, n) as on_a,
        client_group(ctx, b, n) as on_b,
        writer_process(ctx, a, WRITER_CONNECTIONS) as writer,
    ):
        await writer.run(60, mode="rate", rate=rate, duration=min(1.0, window), ids=ids)
        for group in (on_a, on_b):
            await group.record(True)
        result = await writer.run(window + 60, mode="rate", rate=rate, duration=window, ids=ids)
        await trio.sleep(0.5)  # the last messages are still on their way
        stats = []
        for group in (on_a, on_b):
            await group.record(False)
            stats.append(await group.stats())
    same, other = ([value / 1e9 for value in s["latencies"]] for s in stats)
    label = f"{rate:g} writes/s through A, {n} clients on each"
    figures = [
        (f"write-to-delivery p50, clients on A (took the write), {label}", median(same)),
        (f"write-to-delivery p99, clients on A (took the write), {label}", percentile(same, 0.99)),
        (f"write-to-delivery p50, clients on B (the other instance), {label}", median(other)),
        (f"write-to-delivery p99, clients on B (the other instance), {label}",
         percentile(other, 0.99)),
        ("cross-instance p99 minus same-instance p99 (target <= 10 ms)",
         percentile(other, 0.99) - percentile(same, 0.99)),
    ]  # fmt: skip
    for name, value in figures:
        _vtrio_only(ctx, name, value, "s")
    expected = result["ok"] * n
    for where, s in (("A", stats[0]), ("B", stats[1])):
        delivered = 100 * len(s["latencies"]) / expected if expected else 0.0
        _vtrio_only(ctx, f"messages delivered, clients on {where}", min(100.0, delivered), "%",
                    "higher")  # fmt: skip
    ctx.log(
        f"{NAME}: latency at {rate:g} writes/s through A: on A p50 {median(same) * 1e3:.1f} ms "
        f"p99 {percentile(same, 0.99) * 1e3:.1f} ms; on B p50 {median(other) * 1e3:.1f} ms "
        f"p99 {percentile(other, 0.99) * 1e3:.1f} ms ({result['ok']} writes, errors "
        f"{result['errors']})"
    )


# --- (b) fan-out from the change stream, and the baseline's in-process dispatch --------------


def _fanout_names(n: int) -> dict[str, str]:
    return {
        "deliveries": f"deliveries/s to {n} clients, first write to last delivery",
        "cpu": f"CPU per delivery, the server the {n} clients are on",
        "cpu_all": f"CPU per delivery, every server process ({n} clients)",
        "writes": f"writes/s acknowledged ({n} clients)",
        "after": "last delivery after the last write was acknowledged",
    }


async def _vtrio_fanout(ctx: Context, cluster: Cluster, ids: list[str]) -> None:
    a, b = cluster.servers
    n = ctx.sizes.clients
    async with (
        client_group(ctx, a, n) as clients,
        writer_process(ctx, b, WRITER_CONNECTIONS) as writer,
    ):
        await phases.drain(a, clients, writer, ids, min(0.5, ctx.sizes.window))  # warm up
        result = await phases.drain(a, clients, writer, ids, ctx.sizes.window, (b.pid,))
    _record_fanout(ctx, VTRIO, n, result)


async def _baseline_fanout(ctx: Context) -> None:
    n = ctx.sizes.clients
    async with running_server(ctx, BASELINE) as server:
        ids = await server.create_samples(SAMPLES, ctx.fastq_files()[0].name)
        async with (
            client_group(ctx, server, n) as clients,
            writer_process(ctx, server, WRITER_CONNECTIONS) as writer,
        ):
            await phases.drain(server, clients, writer, ids, min(0.5, ctx.sizes.window))
            result = await phases.drain(server, clients, writer, ids, ctx.sizes.window)
    _record_fanout(ctx, BASELINE, n, result)


def _record_fanout(ctx: Context, side: str, n: int, result: phases.Drain) -> None:
    names = _fanout_names(n)
    cpu_all = result.server_cpu_per_delivery_s + result.others_cpu_per_delivery_s
    ctx.record(NAME, names["deliveries"], side, result.deliveries_per_s, "/s", "higher")
    ctx.record(NAME, names["cpu"], side, result.server_cpu_per_delivery_s, "s")
    ctx.record(NAME, names["cpu_all"], side, cpu_all, "s")
    ctx.record(NAME, names["writes"], side, result.writes_per_s, "/s", "higher")
    ctx.record(NAME, names["after"], side, result.last_delivery_after_s, "s")
    ctx.log(
        f"{NAME}: {side} fan-out to {n} clients: {result.writes} writes "
        f"({result.writes_per_s:,.0f}/s, errors {result.errors}), "
        f"{result.delivered:.1%} delivered, the last {result.last_delivery_after_s:.2f} s after "
        f"the last write; {result.deliveries_per_s:,.0f} deliveries/s; "
        f"{result.server_cpu_per_delivery_s * 1e6:.1f} µs CPU each on the clients' server "
        f"({cpu_all * 1e6:.1f} µs all servers); clients closed {result.close_codes}"
    )
    if result.delivered < 0.999:
        raise RuntimeError(f"{side}: {result.delivered:.1%} of the changes were delivered")


# --- (c) resume after a restart ----------------------------------------------------------------


async def _resume(ctx: Context, cluster: Cluster, ids: list[str]) -> None:
    a, b = cluster.servers
    n = ctx.sizes.clients
    window = ctx.sizes.window
    async with (
        client_group(ctx, a, n, track=True) as on_a,
        client_group(ctx, b, 1, processes=1, track=True) as reference,
        writer_process(ctx, b, WRITER_CONNECTIONS) as writer,
    ):
        live = await writer.run(
            window + 60, mode="rate", rate=max(1.0, ctx.options.rate / n), duration=window,
            ids=ids,
        )  # fmt: skip
        await trio.sleep(0.3)
        before = (await on_a.stats())["tracked"]
        if any(count == 0 for count, *_ in before):
            raise RuntimeError("a client on A received no change before A was stopped")

        down: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:

            async def write_while_down() -> None:
                down.update(await writer.run(STOP_DEADLINE + 120, mode="rate", rate=DOWN_RATE,
                                             duration=STOP_DEADLINE + 60, ids=ids))  # fmt: skip

            nursery.start_soon(write_while_down)
            await trio.sleep(0.3)
            stop_s = await _stop(a)
            closed = await on_a.wait_closed(5)
            restarted = time.monotonic()
            a = await cluster.restart(0)
            restart_s = time.monotonic() - restarted
            await writer.stop()
        await trio.sleep(0.3)  # B's feed read every acknowledged write: its clients have them
        ref = (await reference.stats())["tracked"][0]
        final = ref[3]
        pending = (await on_a.stats())["tracked"]
        missed = ref[0] - median([count for count, *_ in pending])

        started_ns = time.monotonic_ns()
        connected = await on_a.reconnect(a.url, window=0, target=final)
        reached = await on_a.wait_position(final, CATCH_UP_LIMIT)
        after = await on_a.stats()
    writes = live["ok"] + down["ok"]
    catch_up_s = max(0, reached["last_reached_ns"] - started_ns) / 1e9
    connect_s = max(0, connected["done_ns"] - started_ns) / 1e9
    tracked = after["tracked"]
    exact = sum(1 for count, crc, violations, _ in tracked
                if count == ref[0] and crc == ref[1] and violations == 0)  # fmt: skip
    short = sum(max(0, ref[0] - count) for count, *_ in tracked)
    extra = sum(max(0, count - ref[0]) for count, *_ in tracked)
    violations = sum(v for _, _, v, _ in tracked)
    caught_up = reached["reached"] == reached["tracked"] and not connected["failed"]
    if caught_up:
        name = f"resume: {n} clients reconnect at once, until all hold the final position"
        _vtrio_only(ctx, name, catch_up_s, "s")
    _vtrio_only(ctx, f"resume: {n} clients reconnect at once, until all handshakes are done",
                connect_s, "s")  # fmt: skip
    _vtrio_only(ctx, "resume: changes each client missed while A was down", missed, "", "none")
    _vtrio_only(ctx, "resume: clients with every change once, in order", 100 * exact / n, "%",
                "higher")  # fmt: skip
    _vtrio_only(ctx, "resume: changes lost, repeated or out of order (all clients)",
                short + extra + violations, "")  # fmt: skip
    _vtrio_only(ctx, "resume: A's SIGINT to exit, with its clients connected", stop_s, "s")
    _vtrio_only(ctx, "resume: A's restart to ready", restart_s, "s")
    ctx.log(
        f"{NAME}: resume: {writes} writes ({ref[0]} changes at the reference), each client on A "
        f"missed {missed:g}; A stopped in {stop_s:.2f} s (close codes {closed['close_codes']}), "
        f"ready again after {restart_s:.2f} s; {connected['connected']}/{n} reconnected "
        f"({connected['failed']} failed {connected['errors']}) in {connect_s:.2f} s; "
        f"{reached['reached']}/{reached['tracked']} at the final position after "
        f"{catch_up_s:.2f} s; {exact}/{n} exact, {short} missing, {extra} extra, "
        f"{violations} out of order"
    )
    if not caught_up:
        raise RuntimeError(
            f"resume: {reached['reached']} of {reached['tracked']} clients reached the final "
            f"position within {CATCH_UP_LIMIT:g} s ({connected['failed']} reconnections "
            f"failed: {connected['errors']})"
        )


async def _stop(server: Server) -> float:
    """SIGINT, then the time until the process exited (killed after the deadline)."""
    signalled = time.monotonic()
    server.child.signal(signal.SIGINT)
    with trio.move_on_after(STOP_DEADLINE):
        await server.child.wait()
    if server.child.alive:
        server.child.kill_group()
        await server.child.wait()
        return STOP_DEADLINE
    assert server.child.exited_at is not None
    return server.child.exited_at - signalled


def _vtrio_only(ctx: Context, name: str, value: float, unit: str, better: Any = "lower") -> None:
    ctx.record(NAME, name, VTRIO, value, unit, better)
    ctx.recorder.not_applicable(NAME, name, BASELINE, NO_MULTI_INSTANCE, unit)

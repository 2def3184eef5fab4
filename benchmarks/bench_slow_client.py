"""Slow client: does one client that stops reading hurt the others, or the server's memory?

For each server, with min(100, ``--clients``) reading clients and the writer of the fan-out
benchmark: throughput and fixed-rate latency are measured once (reference), then one more
client connects in a process of its own (with a 4 KiB receive buffer), completes its handshake
and never reads again; after 2 s of full load (its buffers are full by then) both are measured
again, while the server's RSS is sampled every 50 ms.

Figures: the others' deliveries/s and p99 latency with the slow client, each relative to the
reference of the same run (1.00 = unaffected; compare with the run-to-run spread), and how
much the server's RSS grew while the slow client was connected.

vtrio keeps its last ``--history-size`` changes in memory for clients that resume: it grows
until that many have been written, whoever reads. So that the RSS figure shows what the slow
client costs and not the history filling up, vtrio runs here with ``--history-size 1000``
(each change's documents and encoded messages, ~1-2 KiB: the default 10,000 would be 10-20 MiB)
and the warm-up writes at least that many changes before anything is measured.

What to expect: vtrio queues at most ``--send-queue-size`` messages per client and closes a
client that falls behind (4002); the baseline awaits ``send_str`` for each client in turn, so
once the slow client's socket buffers are full its dispatch loop waits on that client (until
aiohttp's heartbeat gives up on it, 5 s + 2.5 s).
"""

from __future__ import annotations

import psutil
import trio

from benchmarks import phases
from benchmarks.bench_fanout import SAMPLES, WRITER_CONNECTIONS, write_rate
from benchmarks.harness import Context
from benchmarks.report import VTRIO
from benchmarks.servers import client_group, running_server, writer_process

TITLE = "one client stops reading"
NAME = "slow_client"
SAMPLE_INTERVAL = 0.05
HISTORY = 1000
PREFILL = 2.0
"""Seconds of full load after the slow client connects, before measuring: enough to fill its
receive window (4 KiB, set by the client) and the server's socket buffer for it (0.5 s in the
smoke test, which checks that it runs, not what it measures)."""


async def run(ctx: Context) -> None:
    n = min(100, ctx.sizes.clients)
    window = ctx.sizes.window
    rate = write_rate(ctx, n)

    async def measure(side: str) -> None:
        extra = ["--history-size", str(HISTORY)] if side == VTRIO else []
        async with running_server(ctx, side, extra=extra) as server:
            ids = await server.create_samples(SAMPLES, ctx.fastq_files()[0].name)
            process = psutil.Process(server.pid)
            async with (
                client_group(ctx, server, n) as clients,
                writer_process(ctx, server, WRITER_CONNECTIONS) as writer,
            ):
                written = await phases.warm_up(writer, ids, min(1.0, window))
                with trio.move_on_after(30):
                    # Until the history is full (it grows no more); the smoke test skips that.
                    while written < (0 if ctx.options.smoke else HISTORY * 1.1):
                        written += await phases.warm_up(writer, ids, min(1.0, window))
                reference = await phases.throughput(server, clients, writer, ids, window)
                reference_latency = await phases.latency(clients, writer, ids, rate, window, n)
                rss_before = process.memory_info().rss
                peaks = [rss_before]
                async with (
                    client_group(ctx, server, 1, processes=1, slow=True),
                    trio.open_nursery() as nursery,
                ):
                    nursery.start_soon(_sample_rss, process, peaks)
                    # Load until the slow client's buffers are full and the server must act.
                    await phases.warm_up(writer, ids, 0.5 if ctx.options.smoke else PREFILL)
                    slowed = await phases.throughput(server, clients, writer, ids, window)
                    slowed_latency = await phases.latency(clients, writer, ids, rate, window, n)
                    nursery.cancel_scope.cancel()
                peak = max(peaks)
        relative = _ratio(slowed.deliveries_per_s, reference.deliveries_per_s)
        p99_ratio = _ratio(slowed_latency.p99_s, reference_latency.p99_s)
        ctx.record(NAME, f"others' deliveries/s with a slow client, relative ({n} clients)",
                   side, relative, "x", "higher")  # fmt: skip
        ctx.record(NAME, f"others' deliveries/s with a slow client ({n} clients)", side,
                   slowed.deliveries_per_s, "/s", "higher")  # fmt: skip
        ctx.record(NAME, f"others' p99 latency with a slow client, relative ({rate:g} writes/s)",
                   side, p99_ratio, "x")  # fmt: skip
        ctx.record(NAME, f"others' p99 latency with a slow client ({rate:g} writes/s)", side,
                   slowed_latency.p99_s, "s")  # fmt: skip
        ctx.record(NAME, "server RSS growth with a slow client", side,
                   max(0, peak - rss_before), "bytes")  # fmt: skip
        ctx.log(
            f"{NAME}: {side}: throughput x{relative:.2f} "
            f"({reference.deliveries_per_s:,.0f} -> {slowed.deliveries_per_s:,.0f}/s), "
            f"p99 x{p99_ratio:.2f} ({reference_latency.p99_s * 1e3:.1f} -> "
            f"{slowed_latency.p99_s * 1e3:.1f} ms), RSS +{(peak - rss_before) / 2**20:.1f} MiB"
        )

    # One after the other even in the smoke test (see bench_fanout).
    await ctx.each_side(measure, at_once_in_smoke=False)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


async def _sample_rss(process: psutil.Process, peaks: list[int]) -> None:
    while True:
        peaks.append(process.memory_info().rss)
        await trio.sleep(SAMPLE_INTERVAL)

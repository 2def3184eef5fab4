"""Memory: the server's resident memory per idle websocket connection, up to 10,000 of them.

For each server: its RSS once ready (plus a settle), then with ``--clients`` idle authenticated
connections open (after a settle, so that handshake buffers are freed), then with
``--connections`` (default 10,000) open, each step's growth divided by the number of
connections. The connections are opened by ``--client-procs`` load processes or more (at most
2,500 each), 64 handshakes in progress at once per process, each process with its open-file
limit raised to the hard limit; each server raises its own (vtrio at start, logged).

Both servers run the same Python, so the figure compares what each design keeps per
connection: vtrio's Connection (wsproto's state, an outbox, one reading task) against aiohttp's
WebSocketResponse and its handler task. vtrio refuses connections beyond ``--max-connections``
(10,000 by default) with 503; here it is started with room for the benchmark's own control
connection too. The baseline has no such limit. If a server cannot hold the larger count, the
figure says how many it held.
"""

from __future__ import annotations

import math
from contextlib import AsyncExitStack

import psutil
import trio

from benchmarks.harness import Context
from benchmarks.report import VTRIO
from benchmarks.servers import client_group, running_server

TITLE = "server RSS per idle connection"
NAME = "memory"
SETTLE = 1.0
PER_PROCESS = 2500


def steps(ctx: Context) -> list[int]:
    return sorted({min(ctx.sizes.clients, ctx.sizes.connections), ctx.sizes.connections})


async def run(ctx: Context) -> None:
    counts = steps(ctx)
    largest = counts[-1]
    settle = 0.3 if ctx.options.smoke else SETTLE

    async def measure(side: str) -> None:
        extra = ["--max-connections", str(largest + 100)] if side == VTRIO else []
        async with running_server(ctx, side, extra=extra) as server, AsyncExitStack() as stack:
            process = psutil.Process(server.pid)
            await trio.sleep(settle)
            before = process.memory_info().rss
            opened = 0
            for count in counts:
                more = count - opened
                procs = max(ctx.options.client_procs, math.ceil(more / PER_PROCESS))
                started = trio.current_time()
                try:
                    await stack.enter_async_context(
                        client_group(ctx, server, more, processes=procs)
                    )
                except Exception as exc:
                    reason = f"held {opened} of {count}: {exc}"[:200]
                    ctx.recorder.skip(NAME, _name(count), side, reason, "bytes")
                    ctx.log(f"{NAME}: {side}: cannot open {count} connections: {exc}")
                    break
                seconds = trio.current_time() - started
                opened = count
                await trio.sleep(settle)
                rss = process.memory_info().rss
                per_connection = (rss - before) / count
                ctx.record(NAME, _name(count), side, per_connection, "bytes")
                ctx.record(NAME, f"server RSS with {count} connections", side, rss, "bytes")
                ctx.record(NAME, f"connections opened per second, up to {count}", side,
                           more / seconds, "/s", "higher")  # fmt: skip
                ctx.log(
                    f"{NAME}: {side}: {count} connections: {per_connection / 1024:.1f} KiB each, "
                    f"RSS {rss / 2**20:.0f} MiB ({more} opened in {seconds:.1f} s)"
                )

    await ctx.each_side(measure)


def _name(count: int) -> str:
    return f"RSS per idle connection ({count} connections)"

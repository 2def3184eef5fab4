"""Memory: the server's resident memory per idle websocket connection.

For each server: its RSS once ready (plus a short settle), then with ``--clients`` idle
authenticated connections open (after a settle, so handshake buffers are freed), divided by
the number of connections. Both servers run the same Python, so the figure compares what each
design keeps per connection (trio-websocket + a sender task + an outbox, against aiohttp's
WebSocketResponse + its handler task).
"""

from __future__ import annotations

import psutil
import trio

from benchmarks.harness import Context
from benchmarks.servers import client_group, running_server

TITLE = "server RSS per idle connection"
NAME = "memory"
SETTLE = 1.0


async def run(ctx: Context) -> None:
    n = ctx.sizes.clients
    for side in ctx.sides():
        async with running_server(ctx, side) as server:
            process = psutil.Process(server.pid)
            await trio.sleep(SETTLE)
            before = process.memory_info().rss
            async with client_group(ctx, server, n):
                await trio.sleep(SETTLE)
                after = process.memory_info().rss
            per_connection = (after - before) / n
            ctx.record(NAME, f"RSS per idle connection ({n} connections)", side,
                       per_connection, "bytes")  # fmt: skip
            ctx.record(NAME, f"server RSS with {n} connections", side, after, "bytes")
            ctx.log(f"{NAME}: {side}: {per_connection / 1024:.1f} KiB per connection")

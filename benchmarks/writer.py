"""The write stream: a process issuing ``samples.update`` calls over JSON-RPC, driven by JSON lines.

``python -m benchmarks.writer``; commands on stdin, one answer per line on stdout:

- ``{"cmd": "connect", "url", "key", "connections": c}``: open ``c`` RPC connections.
- ``{"cmd": "run", "mode": "max", "window": w, "duration": s, "ids": [...]}``: keep ``w`` calls
  in flight on each connection for ``s`` seconds (or until the connections close).
- ``{"cmd": "run", "mode": "rate", "rate": r, "duration": s, "ids": [...]}``: start one call
  every ``1/r`` s, round-robin over the connections, whatever the answers take.
- ``{"cmd": "stop"}``: end the ``run`` in progress now (its calls in flight are awaited, then
  it answers as usual); no answer of its own.
- ``{"cmd": "close"}``: close the connections and exit.

Every call sets ``host`` to ``bench-ts-<time.monotonic_ns()>``, the instant it was sent: the
dispatched change message carries it to every client, which computes the delivery latency.
The answer to ``run`` counts calls sent, answered, failed (by error code), and their round-trip
times (p50, p99).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

import trio

from benchmarks.rawws import ABNORMAL, RpcClient


class Writer:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.rpcs: list[RpcClient] = []
        self.stopped = trio.Event()

    async def connect(self, url: str, key: str, connections: int) -> dict[str, Any]:
        for _ in range(connections):
            rpc = await RpcClient.connect(url, key)
            self.rpcs.append(rpc)
            self.nursery.start_soon(rpc.run)
        return {"connected": len(self.rpcs)}

    async def run(self, command: dict[str, Any]) -> dict[str, Any]:
        ids = command["ids"]
        duration = float(command["duration"])
        next_id = itertools.cycle(ids).__next__
        sent = ok = 0
        errors: Counter[str] = Counter()
        rtts: list[int] = []
        closed = self.stopped  # a stop command ends the run like a lost connection

        async def update(rpc: RpcClient) -> None:
            nonlocal sent, ok
            started = time.monotonic_ns()
            sent += 1
            response = await rpc.call_raw(
                "samples.update", {"id": next_id(), "host": f"bench-ts-{started}"}
            )
            if "error" in response:
                code = response["error"].get("code")
                errors[str(code)] += 1
                if code == ABNORMAL:
                    closed.set()
            else:
                ok += 1
                rtts.append(time.monotonic_ns() - started)

        start = time.monotonic_ns()
        deadline = trio.current_time() + duration
        async with trio.open_nursery() as nursery:
            if command["mode"] == "max":

                async def lane(rpc: RpcClient) -> None:
                    while trio.current_time() < deadline and not closed.is_set():
                        await update(rpc)

                for rpc in self.rpcs:
                    for _ in range(int(command["window"])):
                        nursery.start_soon(lane, rpc)
            else:
                interval = 1.0 / float(command["rate"])
                begin = trio.current_time()
                for index in itertools.count():
                    at = begin + index * interval
                    if at >= deadline or closed.is_set():
                        break
                    await trio.sleep_until(at)
                    nursery.start_soon(update, self.rpcs[index % len(self.rpcs)])
        rtts.sort()
        return {
            "sent": sent,
            "ok": ok,
            "errors": dict(errors),
            "t_start_ns": start,
            "t_end_ns": time.monotonic_ns(),
            "rtt_p50_ns": statistics.median(rtts) if rtts else None,
            "rtt_p99_ns": rtts[int(len(rtts) * 0.99)] if rtts else None,
        }

    async def close(self) -> None:
        async with trio.open_nursery() as nursery:
            for rpc in self.rpcs:
                nursery.start_soon(rpc.ws.close)


async def main() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buffer = b""

    def answer(value: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    async def run(command: dict[str, Any], done: trio.Event) -> None:
        try:
            answer(await writer.run(command))
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        writer = Writer(nursery)
        running = trio.Event()
        running.set()  # no run in progress
        while True:
            while b"\n" not in buffer:
                chunk = await stdin.receive_some(1 << 16)
                if not chunk:
                    nursery.cancel_scope.cancel()
                    return
                buffer += chunk
            line, _, buffer = buffer.partition(b"\n")
            command = json.loads(line)
            if command["cmd"] == "stop":
                writer.stopped.set()
                continue
            await running.wait()  # one command at a time; only a stop overtakes a run
            if command["cmd"] == "run":
                running, writer.stopped = trio.Event(), trio.Event()
                nursery.start_soon(run, command, running)
            elif command["cmd"] == "connect":
                answer(await writer.connect(
                    command["url"], command["key"], command.get("connections", 1)
                ))  # fmt: skip
            elif command["cmd"] == "close":
                await writer.close()
                answer({"ok": True})
                nursery.cancel_scope.cancel()
                return
            else:
                answer({"error": f"unknown command {command['cmd']!r}"})


if __name__ == "__main__":
    trio.run(main)

"""vtrio's side of the cancellation benchmark, run in a process of its own.

``python -m benchmarks.cancel_probe CASE --runs N --work-seconds W --cancel-after C [--url U]``
prints one JSON line: ``{"runs": [{"return_s": ..., "stop_s": ...}, ...]}``.

- ``return_s``: from ``cancel()`` to the cancelled caller running again;
- ``stop_s``: from ``cancel()`` to the work's last heartbeat (CPU work), or to the slow
  server seeing the connection closed (HTTP). Work nothing stops ends by itself at ``W``.

Cases: ``thread-wait``, ``thread-abandon``, ``thread-cooperative`` (the work calls
``trio.from_thread.check_cancelled()`` between beats), ``process-trio-parallel``,
``process-pool`` (``benchmarks.process_pool``: the ``ProcessPoolExecutor`` design that
trio-parallel replaces), ``http``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import trio

from benchmarks import work
from benchmarks.process_pool import open_process_pool
from vtrio.framework import open_executors, open_http_client

CASES = (
    "thread-wait",
    "thread-abandon",
    "thread-cooperative",
    "process-trio-parallel",
    "process-pool",
    "http",
)


async def measure(call: Callable[[], Awaitable[Any]], cancel_after: float) -> tuple[int, int]:
    """Start ``call``, cancel it after ``cancel_after`` s; return (cancel_ns, returned_ns)."""
    returned = 0
    scope = trio.CancelScope()

    async def caller() -> None:
        nonlocal returned
        with scope:
            await call()
        returned = time.monotonic_ns()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.sleep(cancel_after)
        cancelled = time.monotonic_ns()
        scope.cancel()
    return cancelled, returned


async def wait_until_stopped(heartbeat: str, limit_s: float) -> int:
    """The work's last beat, once no beat came for 100 ms (or at the limit)."""
    deadline = trio.current_time() + limit_s
    last, still_since = work.last_beat(heartbeat), trio.current_time()
    while trio.current_time() < deadline:
        await trio.sleep(0.01)
        beat = work.last_beat(heartbeat)
        if beat != last:
            last, still_since = beat, trio.current_time()
        elif trio.current_time() - still_since >= 0.1:
            break
    return last


async def cpu_case(case: str, args: argparse.Namespace, folder: Path) -> list[dict[str, float]]:
    heartbeat = str(folder / "heartbeat")
    runs = []
    async with open_executors(threads=4, processes=1) as executors, AsyncExitStack() as stack:
        run_in_process: Callable[..., Awaitable[Any]] = executors.run_in_process
        if case == "process-pool":
            run_in_process = (await stack.enter_async_context(open_process_pool(1))).run
        for _ in range(args.runs):
            work.new_heartbeat(heartbeat)
            if case.startswith("process"):
                await run_in_process(work.noop)  # the worker exists before timing

            def start() -> Awaitable[Any]:
                if case == "thread-wait":
                    return executors.run_in_thread(work.busy, heartbeat, args.work_seconds)
                if case == "thread-abandon":
                    return executors.run_in_thread(
                        work.busy, heartbeat, args.work_seconds, abandon_on_cancel=True
                    )
                if case == "thread-cooperative":
                    return executors.run_in_thread(
                        work.busy, heartbeat, args.work_seconds,
                        trio.from_thread.check_cancelled,
                    )  # fmt: skip
                return run_in_process(work.busy, heartbeat, args.work_seconds)

            cancelled, returned = await measure(start, args.cancel_after)
            last = await wait_until_stopped(heartbeat, args.work_seconds + 2)
            runs.append(
                {
                    "return_s": (returned - cancelled) / 1e9,
                    "stop_s": max(0, last - cancelled) / 1e9,
                }
            )
    return runs


async def http_case(args: argparse.Namespace) -> list[dict[str, float]]:
    runs = []
    async with open_http_client(total_timeout=60) as http:
        for _ in range(args.runs):
            ident = secrets.token_hex(4)
            cancelled, returned = await measure(
                partial(http.get, f"{args.url}/slow?id={ident}"), args.cancel_after
            )
            closed = None
            with trio.move_on_after(5):
                while closed is None:
                    await trio.sleep(0.05)
                    answer = await http.get(f"{args.url}/closed?id={ident}")
                    closed = answer.json()["closed_ns"]
            runs.append(
                {
                    "return_s": (returned - cancelled) / 1e9,
                    "stop_s": max(0, closed - cancelled) / 1e9 if closed else float("nan"),
                }
            )
    return runs


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        if args.case == "http":
            runs = await http_case(args)
        else:
            runs = await cpu_case(args.case, args, Path(folder))
    sys.stdout.write(json.dumps({"runs": runs}) + "\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cancel_probe")
    parser.add_argument("case", choices=CASES)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work-seconds", type=float, default=3.0)
    parser.add_argument("--cancel-after", type=float, default=0.3)
    parser.add_argument("--url", default="")
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse())

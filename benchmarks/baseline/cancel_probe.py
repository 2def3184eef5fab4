"""The baseline's side of the cancellation benchmark (asyncio), run in a process of its own.

``python -m benchmarks.baseline.cancel_probe CASE --runs N --work-seconds W --cancel-after C``
prints ``{"runs": [{"return_s": ..., "stop_s": ...}, ...]}``, measured exactly as
``benchmarks.cancel_probe`` measures vtrio's side.

Cases: ``thread`` (``loop.run_in_executor`` on a ``ThreadPoolExecutor``), ``process`` (on a
``ProcessPoolExecutor``), ``http`` (``aiohttp.ClientSession.get`` and reading the body).
Cancellation is ``task.cancel()`` on the caller's task.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import work

CASES = ("thread", "process", "http")


async def measure(call: Callable[[], Awaitable[Any]], cancel_after: float) -> tuple[int, int]:
    returned = 0

    async def caller() -> None:
        nonlocal returned
        try:
            await call()
        except asyncio.CancelledError:
            returned = time.monotonic_ns()
            raise

    task = asyncio.create_task(caller())
    await asyncio.sleep(cancel_after)
    cancelled = time.monotonic_ns()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return cancelled, returned


async def wait_until_stopped(heartbeat: str, limit_s: float) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    last, still_since = work.last_beat(heartbeat), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.01)
        beat = work.last_beat(heartbeat)
        if beat != last:
            last, still_since = beat, loop.time()
        elif loop.time() - still_since >= 0.1:
            break
    return last


async def cpu_case(case: str, args: argparse.Namespace, folder: Path) -> list[dict[str, float]]:
    loop = asyncio.get_running_loop()
    heartbeat = str(folder / "heartbeat")
    executor: Executor = ThreadPoolExecutor(4) if case == "thread" else ProcessPoolExecutor(1)
    runs = []
    try:
        for _ in range(args.runs):
            work.new_heartbeat(heartbeat)
            await loop.run_in_executor(executor, work.noop)  # the worker exists before timing
            cancelled, returned = await measure(
                lambda: loop.run_in_executor(executor, work.busy, heartbeat, args.work_seconds),
                args.cancel_after,
            )
            last = await wait_until_stopped(heartbeat, args.work_seconds + 2)
            runs.append(
                {
                    "return_s": (returned - cancelled) / 1e9,
                    "stop_s": max(0, last - cancelled) / 1e9,
                }
            )
    finally:
        executor.shutdown(wait=True)
    return runs


async def http_case(args: argparse.Namespace) -> list[dict[str, float]]:
    runs = []
    async with aiohttp.ClientSession() as session:

        async def get(url: str) -> bytes:
            async with session.get(url) as response:
                return await response.read()

        for _ in range(args.runs):
            ident = secrets.token_hex(4)
            cancelled, returned = await measure(
                partial(get, f"{args.url}/slow?id={ident}"), args.cancel_after
            )
            closed = None
            for _ in range(100):
                await asyncio.sleep(0.05)
                async with session.get(f"{args.url}/closed?id={ident}") as answer:
                    closed = (await answer.json())["closed_ns"]
                if closed is not None:
                    break
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline.cancel_probe")
    parser.add_argument("case", choices=CASES)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work-seconds", type=float, default=3.0)
    parser.add_argument("--cancel-after", type=float, default=0.3)
    parser.add_argument("--url", default="")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))

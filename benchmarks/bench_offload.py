"""Offload overhead: what a MongoDB round trip costs through each server's database layer.

Three probes, each in a fresh process of its own, one after the other, on the run's mongod:

- vtrio: ``vtrio.db`` (pymongo in worker threads via ``trio.to_thread``), with a dispatch
  function that only counts;
- pymongo called directly from one thread: the floor;
- the baseline: its layer on ``pymongo.AsyncMongoClient``, dispatching to no connection.

Figures: seconds per ``find_one`` by id and per ``insert_one`` (with its dispatch), one call at
a time; what each adds to direct pymongo; and ``find_one`` calls per second with 32 concurrent
callers.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

import trio

from benchmarks.harness import Context
from benchmarks.report import BASELINE, VTRIO

TITLE = "MongoDB round trip through each layer"
NAME = "offload"
_names = itertools.count(1)


async def _probe(ctx: Context, module: str, *args: str) -> dict[str, Any]:
    db = f"bench_offload_{next(_names)}"
    ctx.databases.append(db)
    argv = [sys.executable, "-m", module, *args, "--url", ctx.mongodb_url, "--db", db,
            "--ops", str(ctx.sizes.offload_ops)]  # fmt: skip
    child = ctx.children.start(module.rsplit(".", 1)[-1], argv, pipes=True)
    await child.close_stdin()
    with trio.fail_after(120):
        line = await child.read_line()
        code = await child.wait()
    if code != 0:
        raise RuntimeError(f"{module} failed ({code}): {child.stderr_tail()}")
    result: dict[str, Any] = json.loads(line)
    return result


async def run(ctx: Context) -> None:
    direct = await _probe(ctx, "benchmarks.offload_probe", "pymongo")
    results: dict[str, dict[str, Any]] = {}
    for side in ctx.sides():
        if side == VTRIO:
            results[side] = await _probe(ctx, "benchmarks.offload_probe", "vtrio")
        else:
            results[side] = await _probe(ctx, "benchmarks.baseline.offload_probe")
    for operation in ("find_one", "insert_one"):
        key = f"{operation}_s"
        label = f"{operation} by id" if operation == "find_one" else "insert_one with dispatch"
        ctx.record(NAME, f"{label}, pymongo directly from one thread (reference)", VTRIO,
                   direct[key], "s", "none")  # fmt: skip
        for side in (VTRIO, BASELINE):
            ctx.record(NAME, f"{label}, one at a time", side, results[side][key], "s")
            ctx.record(NAME, f"{label}: added to direct pymongo", side,
                       results[side][key] - direct[key], "s")  # fmt: skip
    ctx.recorder.not_applicable(
        NAME, "find_one by id, pymongo directly from one thread (reference)", BASELINE,
        "same reference", "s",
    )  # fmt: skip
    ctx.recorder.not_applicable(
        NAME, "insert_one with dispatch, pymongo directly from one thread (reference)", BASELINE,
        "same reference", "s",
    )  # fmt: skip
    for side in (VTRIO, BASELINE):
        ctx.record(NAME, "find_one by id, 32 concurrent callers", side,
                   results[side]["find_one_concurrent_per_s"], "/s", "higher")  # fmt: skip
    ctx.log(
        f"{NAME}: find_one {direct['find_one_s'] * 1e6:.0f} µs direct, "
        f"{results[VTRIO]['find_one_s'] * 1e6:.0f} µs vtrio, "
        f"{results[BASELINE]['find_one_s'] * 1e6:.0f} µs baseline"
    )

"""Offload overhead: what a MongoDB round trip costs through each server's database layer.

Three probes, each in a fresh process of its own, one after the other, on the run's mongod:

- vtrio: ``vtrio.framework.open_database`` (pymongo on long-lived worker threads, concurrent
  calls of one shape coalesced), with its change feed and a subscriber that only counts;
- pymongo called directly from one thread: the floor;
- the baseline: its layer on ``pymongo.AsyncMongoClient``, dispatching to no connection.

Figures: seconds per ``find_one`` by id and per ``insert_one`` one call at a time; what each
layer adds to direct pymongo; and ``find_one`` calls per second with 32 concurrent callers.

``insert_one`` returns when its change has been dispatched, on each layer, and that is not the
same work: vtrio's returns once its change stream has read the insert and handed it to the
subscribers (the write fence: the insert, then a getMore round trip of the feed's thread, then
the event loop), the baseline's once it has serialised the change for its (no) connections in
process. Direct pymongo has no dispatch at all. With 32 concurrent callers, vtrio coalesces
finds by id into one ``find`` per batch (a design choice of vtrio's, not a handicap of the
baseline's, which sends each on its own).
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
INSERT = "insert_one until its change is dispatched (vtrio: the write fence)"


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
        label = f"{operation} by id" if operation == "find_one" else INSERT
        ctx.record(NAME, f"{operation}, pymongo directly from one thread (reference)", VTRIO,
                   direct[key], "s", "none")  # fmt: skip
        for side in (VTRIO, BASELINE):
            ctx.record(NAME, f"{label}, one at a time", side, results[side][key], "s")
            ctx.record(NAME, f"{label}: added to direct pymongo", side,
                       results[side][key] - direct[key], "s")  # fmt: skip
    for operation in ("find_one", "insert_one"):
        ctx.recorder.not_applicable(
            NAME, f"{operation}, pymongo directly from one thread (reference)", BASELINE,
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

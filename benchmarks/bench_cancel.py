"""Cancellation latency: how fast a cancelled caller gets control back, and when work stops.

Each case starts a piece of work, cancels the caller 0.3 s later and measures two times from
the cancel: until the caller runs again ("returns"), and until the work really stops
("stops": its last heartbeat, its connection closed, or its CPU use ending). Work that
nothing stops runs on to its natural end (``work_seconds``).

In-process cases run in probe processes of their own (``benchmarks.cancel_probe`` for vtrio,
``benchmarks.baseline.cancel_probe`` for the baseline, one per case, each call preceded by a
no-op through the same pool so that no worker start-up is timed):

==============================  =====================================  ======================
case                            vtrio                                  baseline
==============================  =====================================  ======================
run_in_thread (wait)            ``run_in_thread(fn)``                  ``run_in_executor``
run_in_thread (abandon)         ``..., abandon_on_cancel=True``        (thread pool)
run_in_thread (cooperative)     fn calls ``check_cancelled()``         (no equivalent)
run_in_process (trio-parallel)  ``run_in_process``                     ``run_in_executor``
run_in_process (process-pool)   ``benchmarks.process_pool``            (ProcessPoolExecutor)
HTTP request to a slow server   ``vtrio.http`` (httpx)                 aiohttp ClientSession
==============================  =====================================  ======================

The baseline has one thread and one process mechanism; its figures stand in both rows. The
process-pool row is not part of vtrio: it is the design trio-parallel replaces, a
``ProcessPoolExecutor`` driven from trio (its future awaited in a thread that a cancelled caller
abandons), which returns at once but cannot stop a started job.

``jobs.cancel``: each server runs a ``sample_stats`` job on the benchmark's FASTQ file; once
it reports progress, ``jobs.cancel`` is called over JSON-RPC. "returns" is the call's round
trip; "stops" is when the CPU time of the server's worker processes stops growing (sampled
every 5 ms through ``/proc/PID/task/*/schedstat``, which counts nanoseconds).
"""

from __future__ import annotations

import json
import math
import sys
import time

import psutil
import trio

from benchmarks.harness import Context
from benchmarks.procs import cpu_ns
from benchmarks.report import BASELINE, VTRIO
from benchmarks.servers import median, running_server

TITLE = "cancellation latency"
NAME = "cancel"
CANCEL_AFTER = 0.3

# (row, vtrio probe case, baseline probe case or None)
ROWS = (
    ("run_in_thread (wait)", "thread-wait", "thread"),
    ("run_in_thread (abandon)", "thread-abandon", "thread"),
    ("run_in_thread (cooperative)", "thread-cooperative", None),
    ("run_in_process (trio-parallel)", "process-trio-parallel", "process"),
    ("run_in_process (process-pool)", "process-pool", "process"),
    ("HTTP request to a slow server", "http", "http"),
)


async def _probe(ctx: Context, side: str, case: str, url: str) -> list[dict[str, float]]:
    module = "benchmarks.cancel_probe" if side == VTRIO else "benchmarks.baseline.cancel_probe"
    args = [
        case,
        "--runs", str(ctx.sizes.cancel_runs),
        "--work-seconds", str(ctx.sizes.work_seconds),
        "--cancel-after", str(CANCEL_AFTER),
        "--url", url,
    ]  # fmt: skip
    child = ctx.children.start(f"probe-{side}-{case}", [sys.executable, "-m", module, *args],
                               pipes=True)  # fmt: skip
    await child.close_stdin()
    limit = 30 + ctx.sizes.cancel_runs * (ctx.sizes.work_seconds + 3)
    with trio.fail_after(limit):
        line = await child.read_line()
        code = await child.wait()
    if code != 0:
        raise RuntimeError(f"probe {side} {case} failed ({code}): {child.stderr_tail()}")
    runs: list[dict[str, float]] = json.loads(line)["runs"]
    return runs


async def run(ctx: Context) -> None:
    slow = ctx.children.python("slowhttp", "benchmarks.slowhttp", pipes=True)
    try:
        with trio.fail_after(30):
            port = int((await slow.read_line()).split()[1])
        url = f"http://127.0.0.1:{port}"
        results: dict[tuple[str, str], list[dict[str, float]]] = {}

        async def probe(side: str, case: str) -> None:
            results[side, case] = await _probe(ctx, side, case, url)

        wanted = [(VTRIO, vtrio_case) for _, vtrio_case, _ in ROWS]
        wanted += [(BASELINE, case) for case in dict.fromkeys(c for _, _, c in ROWS if c)]
        order = ctx.sides()
        wanted.sort(key=lambda item: order.index(item[0]))
        if ctx.options.smoke:
            # The smoke test checks that every case runs and reports, not its timing: the
            # probes run at once there, to keep it short.
            async with trio.open_nursery() as nursery:
                for side, case in wanted:
                    nursery.start_soon(probe, side, case)
        else:
            for side, case in wanted:
                await probe(side, case)
        for side in order:
            for row, vtrio_case, baseline_case in ROWS:
                if side == VTRIO:
                    _record(ctx, row, side, results[VTRIO, vtrio_case])
                elif baseline_case is None:
                    for figure in (f"{row}: caller regains control", f"{row}: work stops"):
                        ctx.recorder.not_applicable(NAME, figure, BASELINE, "no equivalent", "s")
                else:
                    _record(ctx, row, side, results[BASELINE, baseline_case])
    finally:
        slow.kill_group()
    if ctx.options.smoke:
        async with trio.open_nursery() as nursery:
            for side in ctx.sides():
                nursery.start_soon(_jobs_cancel, ctx, side)
    else:
        for side in ctx.sides():
            await _jobs_cancel(ctx, side)


def _record(ctx: Context, row: str, side: str, runs: list[dict[str, float]]) -> None:
    returns = median([r["return_s"] for r in runs])
    stops = median([r["stop_s"] for r in runs if not math.isnan(r["stop_s"])])
    ctx.record(NAME, f"{row}: caller regains control", side, returns, "s")
    ctx.record(NAME, f"{row}: work stops", side, stops, "s")
    ctx.log(f"{NAME}: {side} {row}: returns {returns * 1e3:.2f} ms, stops {stops * 1e3:.1f} ms")


async def _jobs_cancel(ctx: Context, side: str) -> None:
    row = "jobs.cancel on a running job"
    async with running_server(ctx, side, processes=2, jobs=2) as server:
        sample_id = (await server.create_samples(1, ctx.fastq_files()[0].name))[0]
        async with server.rpc() as rpc:
            job = await rpc.call("jobs.create", {"task": "sample_stats", "sample_id": sample_id})
            with trio.fail_after(60):
                while True:
                    state = await rpc.call("jobs.get", {"id": job["id"]})
                    if state["state"] == "running" and state.get("progress", 0) > 0:
                        break
                    if state["state"] not in ("waiting", "running"):
                        raise RuntimeError(f"the job ended before it could be cancelled: {state}")
                    await trio.sleep(0.05)
            workers = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
            samples: list[tuple[int, int]] = []
            done = trio.Event()
            returned = 0

            async def cancel() -> None:
                nonlocal returned
                answer = await rpc.call_raw("jobs.cancel", {"id": job["id"]})
                returned = time.monotonic_ns()
                if "error" in answer:
                    raise RuntimeError(f"jobs.cancel failed: {answer['error']}")
                done.set()

            last: dict[int, int] = {}
            cancelled = time.monotonic_ns()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel)
                # Sample for a while after the cancel; a killed worker keeps its last value.
                deadline = trio.current_time() + max(1.5, CANCEL_AFTER * 4)
                while trio.current_time() < deadline or not done.is_set():
                    for pid in workers:
                        value = cpu_ns(pid)
                        if value is not None:
                            last[pid] = value
                    samples.append((time.monotonic_ns(), sum(last.values())))
                    await trio.sleep(0.005)
            final = samples[-1][1]
            # Stopped: the first instant after which at most 2 ms more CPU was used.
            stopped = next(t for t, total in samples if total >= final - 2_000_000)
    ctx.record(NAME, f"{row}: caller regains control", side, (returned - cancelled) / 1e9, "s")
    ctx.record(NAME, f"{row}: work stops", side, max(0, stopped - cancelled) / 1e9, "s")
    ctx.log(
        f"{NAME}: {side} {row}: returns {(returned - cancelled) / 1e6:.1f} ms, "
        f"stops {max(0, stopped - cancelled) / 1e6:.1f} ms"
    )

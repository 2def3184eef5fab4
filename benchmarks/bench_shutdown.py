"""Shutdown under load: SIGINT while the server is busy, and what is left afterwards.

For each server (2 worker processes, 4 jobs at once):

1. ``--clients`` websocket clients connect (spread over the client processes);
2. a writer keeps 100 ``samples.update`` calls in flight (10 connections x 10), so about 100
   MongoDB operations are in flight at any time;
3. 4 ``sample_stats`` jobs are started on a FASTQ file sized so that each needs ~10 s of CPU
   (calibrated on this machine), and the harness waits until all 4 report progress;
4. SIGINT. The harness waits for the process to exit (through a pidfd), for at most 30 s
   (then it is killed and counted as not exited).

Figures: seconds from SIGINT to the process's exit; the share of clients that received a close
frame with code 1001 (the rest saw another code, or a dropped connection: 1006); seconds until
the last client was closed; processes of the server's process group (its pool workers) still
alive 0.5 s after it exited; threads still running in the server if it had not exited by the
deadline; and jobs found back in ``waiting`` afterwards (vtrio puts running jobs back to run
again after a restart).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import psutil
import pymongo
import trio

from benchmarks.harness import Context
from benchmarks.procs import processes_in_group, thread_count
from benchmarks.servers import (
    Server,
    WriterProcess,
    client_group,
    running_server,
    writer_process,
)

TITLE = "shutdown under load"
NAME = "shutdown"
JOBS = 4
WRITER_CONNECTIONS = 10
WRITES_IN_FLIGHT_PER_CONNECTION = 10
DEADLINE = 30.0


async def run(ctx: Context) -> None:
    n = ctx.sizes.clients
    reads = ctx.fastq_files()[0].name

    async def measure(side: str) -> None:
        async with running_server(ctx, side, processes=2, jobs=JOBS) as server:
            ids = await server.create_samples(10, reads)
            job_samples = await server.create_samples(JOBS, reads)
            async with (
                client_group(ctx, server, n) as clients,
                writer_process(ctx, server, WRITER_CONNECTIONS) as writer,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(_write, writer, ids)
                job_ids = await _start_jobs(server, job_samples)
                await trio.sleep(0.5)
                process = psutil.Process(server.pid)
                workers = len(process.children(recursive=True))

                signalled = time.monotonic()
                signalled_ns = time.monotonic_ns()
                server.child.signal(signal.SIGINT)
                threads_left = 0
                with trio.move_on_after(DEADLINE):
                    await server.child.wait()
                if server.child.alive:
                    threads_left = max(0, (thread_count(server.pid) or 1) - 1)
                    server.child.kill_group()
                    await server.child.wait()
                    exit_s = DEADLINE
                else:
                    assert server.child.exited_at is not None
                    exit_s = server.child.exited_at - signalled
                await trio.sleep(0.5)
                processes_left = len(processes_in_group(server.pid))
                closed = await clients.wait_closed(5)
                nursery.cancel_scope.cancel()
        job_states = await _job_states(ctx, server.db_name, job_ids)
        jobs_waiting = job_states.get("waiting", 0)
        got_1001 = closed["close_codes"].get("1001", 0)
        last_close_s = max(0, closed["last_close_ns"] - signalled_ns) / 1e9
        ctx.record(NAME, "SIGINT to process exit", side, exit_s, "s")
        ctx.record(NAME, "clients closed with 1001", side, 100 * got_1001 / n, "%", "higher")
        ctx.record(NAME, "SIGINT to last client closed", side, last_close_s, "s")
        ctx.record(NAME, "processes left behind", side, processes_left, "", "lower")
        ctx.record(NAME, "threads left running at the deadline", side, threads_left, "", "lower")
        ctx.record(NAME, f"jobs back in 'waiting' (of {JOBS})", side, jobs_waiting, "", "none")
        ctx.log(
            f"{NAME}: {side}: exit after {exit_s:.2f} s; {got_1001}/{n} clients got 1001 "
            f"(codes {closed['close_codes']}); last close {last_close_s:.2f} s; {workers} "
            f"workers before, {processes_left} processes and {threads_left} threads left; "
            f"jobs afterwards: {job_states}"
        )

    await ctx.each_side(measure)


async def _write(writer: WriterProcess, ids: list[str]) -> None:
    """100 calls in flight until the server goes away (the answer is not needed)."""
    await writer.run(
        DEADLINE + 60, mode="max", window=WRITES_IN_FLIGHT_PER_CONNECTION,
        duration=DEADLINE + 30, ids=ids,
    )  # fmt: skip


async def _start_jobs(server: Server, samples: list[str]) -> list[str]:
    async with server.rpc() as rpc:
        jobs = [
            (await rpc.call("jobs.create", {"task": "sample_stats", "sample_id": sample}))["id"]
            for sample in samples
        ]
        with trio.fail_after(60):
            while True:
                states = [await rpc.call("jobs.get", {"id": job}) for job in jobs]
                if all(s["state"] == "running" and s.get("progress", 0) > 0 for s in states):
                    return jobs
                ended = [s for s in states if s["state"] not in ("waiting", "running")]
                if ended:
                    raise RuntimeError(f"a job ended before the shutdown: {ended[0]}")
                await trio.sleep(0.1)


async def _job_states(ctx: Context, db_name: str, job_ids: list[str]) -> dict[str, int]:
    def count() -> dict[str, int]:
        client: pymongo.MongoClient[dict[str, Any]]
        with pymongo.MongoClient(ctx.mongodb_url, serverSelectionTimeoutMS=5000) as client:
            states: dict[str, int] = {}
            found: Any = client[db_name].jobs.find({"_id": {"$in": job_ids}}, {"state": True})
            for state in (job["state"] for job in found):
                states[state] = states.get(state, 0) + 1
            return states

    return await trio.to_thread.run_sync(count)

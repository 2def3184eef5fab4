"""Profile: where one ``samples.update`` spends the server's CPU, from frame to response.

vtrio only (a breakdown, not a race). The fan-out's load at min(100, ``--clients``) clients:
the writer keeps 8 calls in flight on each of 2 connections while ``py-spy record`` samples
the server for the window (``--nonblocking``: the process is never paused; 250 Hz; threads
asleep are not sampled), and schedstat gives each thread's exact CPU time over the same window.

Figures, per acknowledged write: the server's CPU; each thread group's (the trio thread, the
MongoDB worker threads, the change-stream thread) exactly; and each group's split by py-spy's
samples among the parts of a write: reading the frame (wsproto), JSON, pydantic, the JSON-RPC
dispatch, Virtool's method and access rules, the MongoDB layer's hand-off, pymongo and BSON,
the change's fan-out (hub) and the socket writes, trio's scheduler and epoll. A stack is
charged to its innermost frame that names a part (json called by the fan-out is JSON). The
fan-out of one write to every client is part of the write: the write fence answers a write
once its change has gone out. The log also lists the trio thread's innermost frames.

Reading it: a thread that is runnable but waiting for a core is sampled where it stands,
which after a wake-up is epoll's ``get_events``: on a saturated machine that part is an upper
bound of epoll's cost, not a measure of it.

Needs ``py-spy`` (``vtrio[bench]``) and the right to read the server's memory (root, or
``kernel.yama.ptrace_scope`` 0); without either the benchmark is skipped, saying why.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from benchmarks import phases
from benchmarks.harness import Context, Skipped
from benchmarks.procs import thread_cpu_ns
from benchmarks.servers import client_group, running_server, writer_process
from vtrio.framework import FEED_NAME

TITLE = "where a samples.update spends the server's CPU (py-spy)"
NAME = "profile"
SAMPLES = 10
WRITER_CONNECTIONS = 2
RATE = 250
"""py-spy's samples per second: enough for ~1 µs per write over a few thousand writes."""

PARTS = (
    ("wsproto/", "reading frames (wsproto)"),
    ("pydantic", "params validation (pydantic)"),
    ("json/", "JSON encode and decode"),
    ("bson/", "BSON"),
    ("pymongo/", "pymongo"),
    ("vtrio/framework/_rpc.py", "JSON-RPC dispatch"),
    ("vtrio/virtool/", "Virtool method and access rules"),
    ("vtrio/framework/_hub.py", "fan-out to the clients (hub)"),
    ("vtrio/framework/_feed.py", "change stream (feed)"),
    ("vtrio/framework/_changes.py", "change stream (feed)"),
    ("vtrio/framework/_workers.py", "MongoDB layer (hand-off, coalescing)"),
    ("vtrio/framework/_collection.py", "MongoDB layer (hand-off, coalescing)"),
    ("vtrio/framework/_database.py", "MongoDB layer (hand-off, coalescing)"),
    ("vtrio/framework/_documents.py", "MongoDB layer (hand-off, coalescing)"),
    ("vtrio/framework/_connection.py", "connection: framing, socket reads and writes"),
    ("vtrio/framework/_wire.py", "connection: framing, socket reads and writes"),
    ("trio/_core/_io_epoll.py", "trio: epoll"),
    ("trio/_socket.py", "trio: socket calls"),
    ("trio/_highlevel_socket.py", "trio: socket calls"),
    ("trio/_core/_entry_queue.py", "thread hand-off (locks, queues)"),
    ("trio/_core/_run.py", "trio: scheduler (task switches, checkpoints)"),
    ("trio/", "trio: other"),
    ("threading.py", "thread hand-off (locks, queues)"),
    ("queue.py", "thread hand-off (locks, queues)"),
)
"""(a path fragment of a frame's file, the part it is charged to), innermost match first."""


def thread_group(name: str) -> str:
    if name.startswith("vtrio-db-"):
        return "MongoDB worker threads"
    if name == FEED_NAME:
        return "change-stream thread"
    if name == "MainThread":
        return "trio thread"
    return "other threads"


def part_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for fragment, part in PARTS:
            if fragment in frame:
                return part
    return "other"


@dataclass
class Profile:
    """py-spy's samples of the server, by thread."""

    samples: Counter[tuple[int, str]] = field(default_factory=Counter)
    """Samples by (thread id, part)."""
    names: dict[int, str] = field(default_factory=dict)
    """Thread names by id."""
    leaves: Counter[tuple[int, str]] = field(default_factory=Counter)
    """Samples by (thread id, innermost frame)."""

    @classmethod
    def parse(cls, raw: str) -> Profile:
        """From py-spy's ``--format raw --threads`` output."""
        profile = cls()
        for line in raw.splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack.startswith("thread (") or not count.isdigit():
                continue
            thread, *frames = stack.split(";")
            tid_text, _, name = thread.removeprefix("thread (").partition("): ")
            tid = int(tid_text, 0)
            profile.names[tid] = name.split(" (")[0]
            profile.samples[tid, part_of(frames)] += int(count)
            profile.leaves[tid, frames[-1] if frames else "?"] += int(count)
        return profile


async def run(ctx: Context) -> None:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise Skipped("py-spy is not installed (pip install 'vtrio[bench]')")
    n = min(100, ctx.sizes.clients)
    window = max(1, round(ctx.sizes.window))
    out = ctx.workdir / f"profile-{time.monotonic_ns()}.txt"
    async with running_server(ctx, "vtrio") as server:
        ids = await server.create_samples(SAMPLES, ctx.fastq_files()[0].name)
        async with (
            client_group(ctx, server, n),
            writer_process(ctx, server, WRITER_CONNECTIONS) as writer,
        ):
            await phases.warm_up(writer, ids, min(1.0, window))
            before = await _scrape(server.url)
            unprofiled = await phases.warm_up(writer, ids, window)
            latency = _latency(before, await _scrape(server.url), max(1, unprofiled))
            argv = [py_spy, "record", "--pid", str(server.pid), "--rate", str(RATE),
                    "--format", "raw", "--threads", "--nonblocking",
                    "--duration", str(window), "--output", str(out)]  # fmt: skip
            cpu0 = thread_cpu_ns(server.pid) or {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_record, argv)
                writes = await phases.warm_up(writer, ids, window)
            cpu1 = thread_cpu_ns(server.pid) or {}
    if not out.exists():
        raise Skipped("py-spy could not sample the server (is ptrace allowed?)")
    cpu = {tid: cpu1[tid] - cpu0.get(tid, 0) for tid in cpu1}
    report_latency(ctx, n, unprofiled / window, latency)
    report(ctx, n, max(1, writes), cpu, Profile.parse(out.read_text()))


LATENCY_PARTS = (
    ('vtrio_rpc_duration_seconds{method="samples.update"}', "samples.update, parsed to answered"),
    ('vtrio_mongodb_operation_duration_seconds{operation="find_one_and_update"}',
     "  its find_one_and_update, queue and fence included"),
    ("vtrio_mongodb_queue_seconds", "    waiting for a worker thread, per job"),
    ("vtrio_mongodb_job_seconds", "    the job in its thread (MongoDB round trips), per job"),
    ("vtrio_write_fence_seconds", "    waiting for the change stream to dispatch it"),
)  # fmt: skip
"""(a histogram, what its mean is) for the latency breakdown; the rest of the operation's
time is the hand-back from the worker thread to trio."""


async def _scrape(url: str) -> dict[str, float]:
    """Every ``_sum`` and ``_count`` of the server's /metrics, by name and labels."""
    base = url.replace("ws://", "http://", 1).rsplit("/", 1)[0]
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{base}/metrics")).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.partition("{")[0].endswith(("_sum", "_count")):
            values[name] = float(value)
    return values


def _latency(before: dict[str, float], after: dict[str, float], writes: int) -> dict[str, float]:
    """Mean seconds of each part over the window; and calls per worker-thread job."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    means = {}
    for histogram, part in LATENCY_PARTS:
        name, brace, labels = histogram.partition("{")
        count = delta(f"{name}_count{brace}{labels}")
        means[part] = delta(f"{name}_sum{brace}{labels}") / count if count else float("nan")
    jobs = delta("vtrio_mongodb_job_calls_count")
    means["calls per job"] = delta("vtrio_mongodb_job_calls_sum") / jobs if jobs else 0.0
    return means


def report_latency(ctx: Context, n: int, writes_per_s: float, means: dict[str, float]) -> None:
    lines = [f"{NAME}: latency, {n} clients, {writes_per_s:,.0f} writes/s, no profiler attached"
             f" (means):"]  # fmt: skip
    for part, seconds in means.items():
        if part == "calls per job":
            lines.append(f"  {seconds:8.1f}     {part}")
            continue
        _record_figure(ctx, f"latency: {part.strip()}", seconds * 1e6)
        lines.append(f"  {seconds * 1e3:8.2f} ms  {part}")
    ctx.log("\n".join(lines))


async def _record(argv: list[str]) -> None:
    await trio.run_process(argv, check=False, capture_stdout=True, capture_stderr=True)


def _record_figure(ctx: Context, name: str, microseconds: float) -> None:
    ctx.record(NAME, name, "vtrio", microseconds / 1e6, "s", "none")
    ctx.recorder.not_applicable(NAME, name, "baseline", "vtrio's breakdown", "s")


def report(ctx: Context, n: int, writes: int, cpu: dict[int, int], profile: Profile) -> None:
    """Each thread group's exact CPU per write (schedstat), split as py-spy's samples split."""
    group_cpu: Counter[str] = Counter()
    for tid, ns in cpu.items():
        name = profile.names.get(tid)
        group_cpu[thread_group(name) if name else "threads py-spy never saw busy"] += ns
    group_samples: Counter[str] = Counter()
    part_samples: Counter[tuple[str, str]] = Counter()
    for (tid, part), count in profile.samples.items():
        group = thread_group(profile.names[tid])
        group_samples[group] += count
        part_samples[group, part] += count
    total = sum(cpu.values()) / writes / 1e3
    _record_figure(ctx, f"server CPU per write, {n} clients", total)
    lines = [f"{NAME}: {writes} writes, {n} clients: {total:.0f} µs of server CPU per write"]
    for group, ns in group_cpu.most_common():
        us = ns / writes / 1e3
        _record_figure(ctx, f"{group}: CPU per write", us)
        lines.append(f"  {us:6.1f}  {group}")
        for (g, part), count in part_samples.most_common():
            if g == group:
                share = us * count / group_samples[group]
                _record_figure(ctx, f"{group}: {part}", share)
                lines.append(f"    {share:6.1f}  {part}")
    lines.append("  the trio thread's innermost frames, share of its samples:")
    trio_leaves = [(c, leaf) for (tid, leaf), c in profile.leaves.items()
                   if thread_group(profile.names[tid]) == "trio thread"]  # fmt: skip
    trio_total = max(1, sum(c for c, _ in trio_leaves))
    for count, leaf in sorted(trio_leaves, reverse=True)[:15]:
        lines.append(f"    {100 * count / trio_total:5.1f}%  {leaf}")
    ctx.log("\n".join(lines))

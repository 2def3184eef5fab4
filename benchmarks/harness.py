"""``python -m benchmarks``: run the benchmarks, vtrio and the baseline side by side.

One mongod serves the whole run (started here unless ``--mongodb-url`` names one). Each
benchmark starts the servers and load processes it needs and stops them when it ends; every
process the harness started is killed when the harness exits, however it exits (a Ctrl-C stops
the run: the figures measured so far are printed, nothing is saved, and the exit code is 130).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from benchmarks import fastqgen
from benchmarks.procs import Children, open_children
from benchmarks.report import (
    BASELINE,
    VTRIO,
    Recorder,
    Skipped,
    describe_machine,
    machine,
    save,
    table,
    to_json,
)

RESULTS = Path(__file__).resolve().parent / "results"

BENCHMARKS = (
    "shutdown", "cancel", "fanout", "slow_client", "fairness", "cluster", "offload", "memory",
    "profile",
)  # fmt: skip
"""Run order. Each name is a module ``benchmarks.bench_<name>`` with ``run(ctx)``."""


class Benchmark(Protocol):
    TITLE: str

    async def run(self, ctx: Context) -> None: ...


@dataclass(frozen=True)
class Sizes:
    """What a mode (full, --quick, --smoke) makes of each benchmark's sizes and durations."""

    repeat: int
    clients: int
    window: float  # seconds of each throughput / latency measurement
    job_seconds: float  # CPU seconds each shutdown job would need to complete
    cancel_runs: int  # measurements per cancellation case per repetition
    offload_ops: int  # operations per offload measurement
    work_seconds: float  # length of a cancellation case's work if nothing stops it
    connections: int  # the most idle connections the memory benchmark opens


FULL = Sizes(
    repeat=3, clients=1000, window=3.0, job_seconds=10, cancel_runs=2, offload_ops=1000,
    work_seconds=2.0, connections=10_000,
)  # fmt: skip
QUICK = Sizes(
    repeat=1, clients=1000, window=1.5, job_seconds=10, cancel_runs=2, offload_ops=300,
    work_seconds=1.0, connections=10_000,
)  # fmt: skip
SMOKE = Sizes(
    repeat=1, clients=20, window=0.5, job_seconds=1, cancel_runs=1, offload_ops=50,
    work_seconds=1.0, connections=100,
)  # fmt: skip


@dataclass
class Options:
    only: list[str]
    sizes: Sizes
    client_procs: int
    rate: float
    mongodb_url: str | None
    save: bool
    results: Path
    keep: bool
    smoke: bool
    quick: bool
    strict: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "only": self.only,
            "sizes": self.sizes.__dict__,
            "client_procs": self.client_procs,
            "rate": self.rate,
            "mode": "smoke" if self.smoke else "quick" if self.quick else "full",
        }


@dataclass
class Context:
    """What a benchmark gets: options, the recorder, the process registry, the shared mongod."""

    options: Options
    recorder: Recorder
    children: Children
    mongodb_url: str
    workdir: Path
    repetition: int = 0
    databases: list[str] = field(default_factory=list)
    _fastq: list[Path] = field(default_factory=list)
    _started: float = field(default_factory=time.monotonic)

    @property
    def sizes(self) -> Sizes:
        return self.options.sizes

    def sides(self) -> tuple[str, str]:
        """Both sides, in an order that alternates between repetitions (drift hits both)."""
        return (VTRIO, BASELINE) if self.repetition % 2 == 0 else (BASELINE, VTRIO)

    async def each_side(
        self, measure: Callable[[str], Awaitable[object]], *, at_once_in_smoke: bool = True
    ) -> None:
        """``await measure(side)`` for both sides, in :meth:`sides` order; in the smoke test,
        both at once (it checks that they run and report, not how fast: it must be short),
        unless ``at_once_in_smoke`` is false."""
        if not (self.options.smoke and at_once_in_smoke):
            for side in self.sides():
                await measure(side)
            return
        async with trio.open_nursery() as nursery:
            for side in self.sides():
                nursery.start_soon(measure, side)

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self._started
        print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    def fastq_files(self) -> list[Path]:
        """The FASTQ file(s) every server's uploads/ holds (made on first use)."""
        if not self._fastq:
            path = self.workdir / "reads.fastq"
            size = fastqgen.write(path, seconds=self.sizes.job_seconds)
            self.log(f"wrote {path.name}: {size / 2**20:.0f} MiB")
            self._fastq.append(path)
        return self._fastq

    def record(
        self, benchmark: str, name: str, side: str, value: float, unit: str, better: Any = "lower"
    ) -> None:
        self.recorder.add(benchmark, name, side, value, unit, better)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="vtrio against the design it replaces (aiohttp + pymongo's asyncio client), "
        "measured side by side; prints ratios (>1: vtrio better).",
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME",
        help=f"run only this benchmark (repeatable, or comma-separated): {', '.join(BENCHMARKS)}",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="shorter runs, one repetition")
    parser.add_argument(
        "--smoke", action="store_true",
        help="a tiny run of every benchmark; exit 0 only if each reported its figures",
    )  # fmt: skip
    parser.add_argument(
        "--allow-skips", action="store_true",
        help="with --smoke: a benchmark vtrio cannot run yet counts as a pass",
    )  # fmt: skip
    parser.add_argument("--clients", type=int, help="the large client count (default 1000)")
    parser.add_argument("--repeat", type=int, help="repetitions of each benchmark")
    parser.add_argument(
        "--client-procs", type=int, default=4, help="client load processes (default 4)"
    )
    parser.add_argument(
        "--rate", type=float, default=5000.0,
        help="deliveries/s of the fixed-rate latency measurement: the writer sends RATE/N "
        "writes/s to N clients (default 5000, a moderate load for both servers on 2 cores)",
    )  # fmt: skip
    parser.add_argument(
        "--connections", type=int,
        help="the most idle connections the memory benchmark holds (default 10000)",
    )  # fmt: skip
    parser.add_argument("--window", type=float, help="seconds per throughput/latency window")
    parser.add_argument("--mongodb-url", help="use this MongoDB instead of starting a mongod")
    parser.add_argument("--no-save", action="store_true", help="do not write results JSON")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for results JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)

    only = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}: choose from {BENCHMARKS}")
    base = SMOKE if args.smoke else QUICK if args.quick else FULL
    sizes = Sizes(
        repeat=args.repeat or base.repeat,
        clients=args.clients or base.clients,
        window=args.window or base.window,
        job_seconds=base.job_seconds,
        cancel_runs=base.cancel_runs,
        offload_ops=base.offload_ops,
        work_seconds=base.work_seconds,
        connections=args.connections or base.connections,
    )
    if sizes.clients < 1 or sizes.repeat < 1:
        parser.error("--clients and --repeat must be at least 1")
    return Options(
        only=only or list(BENCHMARKS),
        sizes=sizes,
        client_procs=2 if args.smoke else max(1, args.client_procs),
        rate=args.rate,
        mongodb_url=args.mongodb_url,
        save=not (args.no_save or args.smoke),
        results=args.results,
        keep=args.keep,
        smoke=args.smoke,
        quick=args.quick,
        strict=args.smoke and not args.allow_skips,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return trio.run(run, options)


async def run(options: Options) -> int:
    recorder = Recorder()
    started = time.monotonic()
    interrupted = False
    workdir = Path(tempfile.mkdtemp(prefix="vtrio-bench-"))
    print(f"benchmarks: {describe_machine(machine())}; work folder {workdir}", file=sys.stderr)
    async with trio.open_nursery() as root:
        scope = trio.CancelScope()

        async def watch_signals() -> None:
            nonlocal interrupted
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if not interrupted:
                        print(
                            f"\n{signal.Signals(signum).name}: stopping every process started...",
                            file=sys.stderr,
                        )
                    interrupted = True
                    scope.cancel()

        root.start_soon(watch_signals)
        with scope:
            async with (
                _mongodb(options, workdir) as url,
                open_children(workdir / "logs") as children,
            ):
                ctx = Context(options, recorder, children, url, workdir)
                try:
                    await _run_all(ctx)
                finally:
                    with trio.CancelScope(shield=True):
                        await _drop_databases(url, ctx.databases, options.mongodb_url is not None)
        root.cancel_scope.cancel()

    print(table(recorder))
    failed = _failures(options, recorder)
    if interrupted:
        print("interrupted: results not saved", file=sys.stderr)
    elif options.save:
        path = save(to_json(recorder, options.as_json(), started), options.results)
        print(f"results: {path}", file=sys.stderr)
    if options.keep or failed or recorder.errors:
        print(f"logs kept in {workdir / 'logs'}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        return 130
    if options.smoke:
        for message in failed:
            print(f"smoke: {message}", file=sys.stderr)
        return 1 if failed else 0
    return 1 if recorder.errors else 0


def _failures(options: Options, recorder: Recorder) -> list[str]:
    failed = []
    for name in options.only:
        if name in recorder.errors:
            failed.append(f"{name} failed: {recorder.errors[name][0]}")
        elif not recorder.reported(name):
            if name in recorder.skips and not options.strict:
                continue
            failed.append(f"{name} reported no figures {recorder.skips.get(name, '')}".strip())
        elif options.strict and any(f.skipped for f in recorder.benchmark_figures(name)):
            reasons = {r for f in recorder.benchmark_figures(name) for r in f.skipped.values()}
            failed.append(f"{name} skipped figures: {sorted(reasons)}")
    return failed


async def _run_all(ctx: Context) -> None:
    modules: dict[str, Benchmark] = {
        name: importlib.import_module(f"benchmarks.bench_{name}")  # type: ignore[misc]
        for name in ctx.options.only
    }
    for repetition in range(ctx.sizes.repeat):
        ctx.repetition = repetition
        for name, module in modules.items():
            ctx.log(f"{name} ({module.TITLE}), run {repetition + 1}/{ctx.sizes.repeat}")
            try:
                await module.run(ctx)
            except Skipped as skipped:
                ctx.recorder.skip_benchmark(name, str(skipped))
                ctx.log(f"{name}: skipped: {skipped}")
            except Exception as exc:  # one benchmark failing must not lose the others' figures
                ctx.recorder.error(name, f"{type(exc).__name__}: {exc}")
                log_file = ctx.workdir / "logs" / f"error-{name}-{repetition}.txt"
                log_file.write_text(traceback.format_exc())
                ctx.log(f"{name}: ERROR {type(exc).__name__}: {exc} (traceback in {log_file})")


@asynccontextmanager
async def _mongodb(options: Options, workdir: Path) -> AsyncIterator[str]:
    if options.mongodb_url:
        async with nullcontext(options.mongodb_url) as url:
            yield url
        return
    from vtrio.framework import run_mongod

    async with run_mongod(workdir / "mongod") as url:
        yield url


async def _drop_databases(url: str, names: list[str], external: bool) -> None:
    """On a MongoDB the harness did not start, drop the databases it made."""
    if not external or not names:
        return
    import pymongo

    def drop() -> None:
        client: pymongo.MongoClient[dict[str, Any]]
        with pymongo.MongoClient(url, serverSelectionTimeoutMS=5000) as client:
            for name in names:
                client.drop_database(name)

    with trio.move_on_after(30):
        await trio.to_thread.run_sync(drop, abandon_on_cancel=True)


Runner = Callable[[Context], Any]

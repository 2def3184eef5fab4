"""The benchmarks run and report, at a tiny size: they cannot rot. How fast is not checked here."""

from __future__ import annotations

from benchmarks.smoke import missing_dependencies, run_smoke


def test_every_benchmark_runs_and_reports(mongodb_url: str) -> None:
    assert not missing_dependencies(), "install vtrio[test]: the benchmarks need these"
    result = run_smoke(mongodb_url)
    assert result.returncode == 0, result.stdout + result.stderr

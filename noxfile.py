"""Sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s bench`` (``nox`` alone: tests and lint)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

SOURCES = ["vtrio", "tests", "benchmarks", "noxfile.py"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, against a real mongod the session starts and stops itself."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)
    session.run("mypy", "vtrio")


@nox.session
def bench(session: nox.Session) -> None:
    """Cancellation and throughput benchmarks, vtrio against the design it replaces.

    ``nox -s bench -- --quick --clients 200``; ``-- --help`` lists the options.
    """
    session.install("-e", ".[bench]")
    # The harness stops its servers and client processes itself on Ctrl-C: give it the time.
    session.run(
        "python", "-m", "benchmarks", *session.posargs,
        interrupt_timeout=30, terminate_timeout=10,
    )  # fmt: skip

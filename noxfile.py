"""Sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s bench`` (``nox`` alone: tests and lint)."""

from __future__ import annotations

import shutil

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

SOURCES = ["vtrio", "tests", "benchmarks", "noxfile.py"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, against a real mongod the session starts and stops itself, and a real
    Chromium (Debian's, installed here when missing) for the dashboard."""
    session.install("-e", ".[test]")
    install_browser_tools(session)
    session.run("pytest", *session.posargs)


def install_browser_tools(session: nox.Session) -> None:
    """Chromium from Debian (as root, when it is missing) and the Node packages the browser
    tests drive it with (playwright-core and ws, as locked in tests/browser)."""
    if shutil.which("chromium") is None:
        apt = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-q", external=True, env=apt)
        session.run("apt-get", "install", "-y", "-q", "chromium", external=True, env=apt)
    session.run("npm", "ci", "--prefix", "tests/browser", "--no-audit", "--no-fund", external=True)


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

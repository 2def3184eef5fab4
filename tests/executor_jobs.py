"""Jobs that tests/test_executors.py runs in worker processes.

They are module-level so that the workers can import them by name, and this module imports no
trio so that a fresh worker starts fast. Jobs report what happened through files, the one
channel that needs no shared state between processes: pid files, "started"/"finished" markers,
and gate files that the test creates to let a job finish.
"""

import os
import resource
import signal
import time
import uuid
from pathlib import Path
from typing import Any

POLL_INTERVAL = 0.005


def add(a: int, b: int) -> int:
    return a + b


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def noop() -> None:
    return None


def write_atomically(path: Path, text: str) -> None:
    """Write so that a reader sees either no file or the whole text."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def report_pid_then_sleep(pid_file: Path, seconds: float) -> int:
    write_atomically(pid_file, str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def mark_started(marker: Path) -> str:
    marker.write_text(str(os.getpid()))
    return "ran"


def gated(markers: Path, gate: Path, timeout: float = 20.0) -> int:
    """Write ``started-<id>`` (the pid), wait for ``gate`` to exist, write ``finished-<id>``.

    Returns the worker's pid. Raises TimeoutError if the gate never opens, so a broken test
    fails instead of hanging.
    """
    job_id = uuid.uuid4().hex
    write_atomically(markers / f"started-{job_id}", str(os.getpid()))
    deadline = time.monotonic() + timeout
    while not gate.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(POLL_INTERVAL)
    write_atomically(markers / f"finished-{job_id}", str(os.getpid()))
    return os.getpid()


def exit_abruptly(status: int) -> None:
    os._exit(status)


def segfault() -> None:
    # A real SIGSEGV with its default action; no core file for the test run to leave behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)  # not reached: the signal is delivered before kill() returns

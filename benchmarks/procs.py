"""Every process the harness starts, and the guarantee that none outlives it.

Children are started with ``subprocess.Popen`` from the trio thread itself (not through
``trio.lowlevel.open_process``, which forks from a worker thread), so that:

- each child gets ``PR_SET_PDEATHSIG = SIGKILL``: it dies with the harness even if the harness
  is SIGKILLed (the death signal follows the thread that forked, here the main thread, which
  lives as long as the harness);
- each child leads a session of its own (``start_new_session``): a Ctrl-C in the terminal reaches
  the harness only, which then decides how its children stop, and ``killpg`` of that session
  also reaches the worker processes a server started (pool workers inherit the group);
- exits are awaited through a pidfd, which is exact to the wake-up, for the shutdown timings.

:class:`Children` kills every process group it ever started when its block exits, however it
exits (normally, by an error, by cancellation on Ctrl-C).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import IO

import trio

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """A child process: its pid (= its process group), its exit, and its text streams."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path | None) -> None:
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self._pidfd = os.pidfd_open(popen.pid)
        self.exited_at: float | None = None  # time.monotonic() when the exit was seen
        self._stdout: trio.lowlevel.FdStream | None = None
        self._stdin: trio.lowlevel.FdStream | None = None
        self._stderr_lines: list[str] = []
        self._new_stderr = trio.lowlevel.ParkingLot()
        self._buffer = b""
        if popen.stdout is not None:
            self._stdout = trio.lowlevel.FdStream(os.dup(popen.stdout.fileno()))
            popen.stdout.close()
        if popen.stdin is not None:
            self._stdin = trio.lowlevel.FdStream(os.dup(popen.stdin.fileno()))
            popen.stdin.close()

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    async def wait(self) -> int:
        """Wait for the exit (reaped); record when it was seen."""
        if self.popen.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            if self.exited_at is None:
                self.exited_at = time.monotonic()
        return self.popen.wait()

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def kill_group(self) -> None:
        """SIGKILL the child's whole process group (it and any workers it started)."""
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    # --- line protocol on stdin/stdout (used by the harness's own helper processes) ----------

    async def send_line(self, text: str) -> None:
        assert self._stdin is not None, f"{self.name} has no stdin pipe"
        await self._stdin.send_all(text.encode() + b"\n")

    async def close_stdin(self) -> None:
        if self._stdin is not None:
            await self._stdin.aclose()
            self._stdin = None

    async def read_line(self) -> str:
        assert self._stdout is not None, f"{self.name} has no stdout pipe"
        while b"\n" not in self._buffer:
            chunk = await self._stdout.receive_some(1 << 20)
            if not chunk:
                raise EOFError(f"{self.name} closed its stdout (exit code {self.returncode})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    # --- stderr, collected and kept in a log file ------------------------------------------

    async def collect_stderr(self, stream: trio.lowlevel.FdStream, log: IO[str]) -> None:
        buffer = b""
        async with stream:
            while chunk := await stream.receive_some(1 << 16):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    self._stderr_lines.append(line)
                    log.write(line + "\n")
                log.flush()
                self._new_stderr.unpark_all()
        self._new_stderr.unpark_all()

    async def wait_for_stderr(self, predicate: Callable[[str], object], timeout: float) -> str:
        """The first stderr line for which ``predicate`` is true; fails if the child exits."""
        seen = 0
        with trio.fail_after(timeout):
            while True:
                for line in self._stderr_lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self._stderr_lines)
                if not self.alive:
                    raise RuntimeError(
                        f"{self.name} exited with code {self.returncode} before it was ready; "
                        f"last lines:\n" + "\n".join(self._stderr_lines[-15:])
                    )
                with trio.move_on_after(0.2):  # also notice an exit without more output
                    await self._new_stderr.park()

    def stderr_tail(self, lines: int = 15) -> str:
        return "\n".join(self._stderr_lines[-lines:])


class Children:
    """Starts children and, when its block ends, kills every process group it started."""

    def __init__(self, nursery: trio.Nursery, log_dir: Path) -> None:
        self._nursery = nursery
        self._log_dir = log_dir
        self._children: list[Child] = []
        self._count = 0

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        pipes: bool = False,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        """Start ``argv``; stderr goes to a log file (and is readable line by line).

        With ``pipes``, stdin and stdout are pipes for the line protocol; else /dev/null.
        """
        self._count += 1
        log_path = self._log_dir / f"{self._count:03d}-{name}.log"
        read_end, write_end = os.pipe()
        environment = dict(os.environ if env is None else env)
        environment.setdefault("PYTHONUNBUFFERED", "1")
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stderr=write_end,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env=environment,
                cwd=cwd,
            )
        finally:
            os.close(write_end)
        child = Child(name, popen, log_path)
        self._children.append(child)
        log = log_path.open("w")
        self._nursery.start_soon(_collect_and_close, child, trio.lowlevel.FdStream(read_end), log)
        return child

    def python(self, name: str, module: str, *args: str, pipes: bool = False) -> Child:
        return self.start(name, [sys.executable, "-m", module, *args], pipes=pipes)

    def kill_all(self) -> None:
        for child in self._children:
            child.kill_group()

    async def reap_all(self, timeout: float = 5.0) -> None:
        with trio.move_on_after(timeout):
            for child in self._children:
                await child.wait()


async def _collect_and_close(child: Child, stream: trio.lowlevel.FdStream, log: IO[str]) -> None:
    try:
        await child.collect_stderr(stream, log)
    finally:
        log.close()


@asynccontextmanager
async def open_children(log_dir: Path) -> AsyncIterator[Children]:
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before anything runs)
    async with trio.open_nursery() as nursery:
        children = Children(nursery, log_dir)
        try:
            yield children
        finally:
            # Whatever happened, nothing we started survives: SIGKILL each process group, then
            # reap (shielded: this runs while the harness is being cancelled on Ctrl-C).
            children.kill_all()
            with trio.CancelScope(shield=True):
                await children.reap_all()
            nursery.cancel_scope.cancel()


# --- what a process left behind, and how much CPU work is running --------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return text[text.rfind(")") + 2 :].split()


def processes_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def cpu_ns(pid: int) -> int | None:
    """CPU time used so far by every thread of ``pid``, in ns (schedstat: exact, not ticks)."""
    threads = thread_cpu_ns(pid)
    return None if threads is None else sum(threads.values())


def thread_cpu_ns(pid: int) -> dict[int, int] | None:
    """CPU time used so far by each thread of ``pid`` (by thread id), in ns."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    threads = {}
    for tid in tasks:
        try:
            schedstat = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text()
            threads[int(tid)] = int(schedstat.split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return threads


def thread_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None

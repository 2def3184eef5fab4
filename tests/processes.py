"""Running ``python -m vtrio`` as a real child process, and finding what it left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path

import trio

READY = re.compile(r"vtrio ready at (ws://\S+)")


class VtrioProcess:
    """A ``python -m vtrio`` child whose stderr is collected line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._new_line = trio.lowlevel.ParkingLot()
        self.url: str | None = None
        self.output_ended = False  # its stderr is closed: it has exited (or is exiting)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def collect_output(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in complete)
            self._new_line.unpark_all()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))
        self.output_ended = True
        self._new_line.unpark_all()

    async def wait_for_line(self, pattern: re.Pattern[str] | str, timeout: float = 60) -> re.Match:
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = 0
        with trio.fail_after(timeout):
            while True:
                for line in self.lines[seen:]:
                    if match := pattern.search(line):
                        return match
                seen = len(self.lines)
                if self.output_ended:  # no line will come: the process has gone
                    code = await self.process.wait()
                    raise AssertionError(
                        f"vtrio exited ({code}) before {pattern.pattern!r}:\n{self.output}"
                    )
                await self._new_line.park()

    async def wait_ready(self, timeout: float = 60) -> str:
        self.url = (await self.wait_for_line(READY, timeout)).group(1)
        return self.url

    @contextmanager
    def explained(self) -> Iterator[None]:
        """Add the server's output to any failure inside the block."""
        try:
            yield
        except BaseException as exc:
            exc.add_note(f"vtrio's output:\n{self.output}")
            raise

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def vtrio_process(
    args: Sequence[str], *, env: dict[str, str] | None = None
) -> AsyncIterator[VtrioProcess]:
    """Run ``python -m vtrio ARGS`` for the block; if it is still alive afterwards, kill it."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VTRIO_")}
    environment.update(env or {})
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vtrio", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment,
    )
    child = VtrioProcess(process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(child.collect_output)
        try:
            yield child
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
            nursery.cancel_scope.cancel()


def run_vtrio(args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120):
    """Run a short ``python -m vtrio`` command to completion (synchronously)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VTRIO_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "vtrio", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        stdin=subprocess.DEVNULL,
    )


def mongods_using(data_dir: Path) -> list[int]:
    """Pids of live mongod processes whose --dbpath lies under ``data_dir``."""
    found = []
    prefix = str(data_dir.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split(") ")[-1].split()[0]
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"mongod") or state == "Z":
            continue
        if b"--dbpath" in argv:
            db_path = argv[argv.index(b"--dbpath") + 1].decode()
            if db_path.startswith(prefix):
                found.append(int(entry.name))
    return found


def kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)

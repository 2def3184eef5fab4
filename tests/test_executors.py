"""Tests for vtrio.executors, with real threads and real worker processes (no mocks).

Process jobs live in tests/executor_jobs.py so that workers can import them, and report what
they do through files in tmp_path; thread jobs live here and report through threading.Events.
Waiting is done by polling the observable state with a deadline (`eventually`), never by
sleeping and hoping; "the caller is still waiting" is checked once every task is blocked
(`trio.testing.wait_all_tasks_blocked`), when it could only have returned already.
"""

import errno
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import trio
import trio.testing

import vtrio.framework._executors
from tests import executor_jobs as jobs
from vtrio.framework._executors import (
    ExecutorError,
    NotPicklable,
    WorkerCrashed,
    open_executors,
)

PROJECT_DIR = Path(__file__).parent.parent
OUR_SOURCE_FILES = {vtrio.framework._executors.__file__, jobs.__file__, __file__}


# --- helpers -----------------------------------------------------------------------------------


async def eventually(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until predicate() holds, failing after `within` seconds."""
    with trio.fail_after(within):
        # Polling: the state lives in other threads, other processes and the file system.
        while not predicate():
            await trio.sleep(0.005)


def started(markers: Path) -> list[Path]:
    return list(markers.glob("started-*"))


def read_pid(path: Path) -> int:
    return int(path.read_text())


def process_exists(pid: int) -> bool:
    """True while the process exists, zombie included (i.e. until it is reaped)."""
    return Path(f"/proc/{pid}").exists()


def child_processes() -> dict[int, str]:
    """This process's children, zombies included, by pid, with their command lines."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name in parentheses may contain spaces: split after the last ")".
            state_and_ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(state_and_ppid[1]) == os.getpid():
            children[int(stat.parent.name)] = cmdline
    return children


def new_workers(before: dict[int, str]) -> dict[int, str]:
    """Children that did not exist before, except multiprocessing's shared resource tracker."""
    return {
        pid: cmdline
        for pid, cmdline in child_processes().items()
        if pid not in before and "resource_tracker" not in cmdline
    }


def threads_running_our_code() -> list[str]:
    """Threads (other than this one) currently running code of the executors or of a job."""
    busy = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        current: FrameType | None = frame
        while current is not None:
            if current.f_code.co_filename in OUR_SOURCE_FILES:
                busy.append(f"thread {ident} in {current.f_code.co_name}")
                break
            current = current.f_back
    return busy


def blocking_job(started: threading.Event, finished: threading.Event, seconds: float) -> str:
    started.set()
    time.sleep(seconds)
    finished.set()
    return "done"


def gated_thread_job(
    started: threading.Event,
    gate: threading.Event,
    finished: threading.Event,
    error: Exception | None = None,
) -> str:
    started.set()
    if not gate.wait(timeout=20):
        raise TimeoutError("gate never opened")
    finished.set()
    if error is not None:
        raise error
    return "done"


class FifoReader:
    """A thread job stuck in a blocking call: opening a FIFO that nobody opens for writing.

    No timeout can end it: ``os.open`` returns only once `release` opens the FIFO for writing.
    """

    def __init__(self, folder: Path) -> None:
        self.fifo = folder / "fifo"
        os.mkfifo(self.fifo)
        self.entered = threading.Event()
        self.returned = threading.Event()
        self.in_daemon_thread: bool | None = None

    def __call__(self) -> None:
        self.in_daemon_thread = threading.current_thread().daemon
        self.entered.set()
        os.close(os.open(self.fifo, os.O_RDONLY))
        self.returned.set()

    async def release(self) -> None:
        """Open the FIFO for writing, which lets the reader's open() return."""
        with trio.fail_after(10):
            while True:
                try:
                    os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
                    return
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    # ENXIO: the reader has not reached its open() yet (it will: it entered).
                    await trio.sleep(0.005)


# --- threads -----------------------------------------------------------------------------------


async def test_run_in_thread_returns_result_and_passes_kwargs() -> None:
    async with open_executors(threads=2) as executors:
        assert await executors.run_in_thread(jobs.add, 2, b=3) == 5
        assert await executors.run_in_thread(jobs.echo, 1, fn="f", key="v") == (
            (1,),
            {"fn": "f", "key": "v"},
        )
        with pytest.raises(ZeroDivisionError):
            await executors.run_in_thread(divmod, 1, 0)


async def test_run_in_thread_respects_the_bound() -> None:
    lock = threading.Lock()
    gate = threading.Event()
    running = 0
    peak = 0

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            assert gate.wait(timeout=20)
        finally:
            with lock:
                running -= 1

    async with open_executors(threads=2) as executors, trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(executors.run_in_thread, job)
        # Two jobs are inside their threads and the other four queue for a slot, in trio.
        await eventually(lambda: running == 2 and executors.statistics().threads_waiting == 4)
        assert executors.statistics().threads_busy == 2
        gate.set()
    assert peak == 2


async def test_cancelled_thread_call_waits_for_the_thread_by_default() -> None:
    job_started, gate, job_finished = threading.Event(), threading.Event(), threading.Event()
    call_scope = trio.CancelScope()
    call_returned = trio.Event()
    finished_when_returned: list[bool] = []

    async with open_executors(threads=1) as executors, trio.open_nursery() as nursery:

        async def call() -> None:
            with call_scope:
                result = await executors.run_in_thread(
                    gated_thread_job, job_started, gate, job_finished
                )
                # The caller regains control only once the job is done, and gets its result.
                assert result == "done"
                finished_when_returned.append(job_finished.is_set())
                call_returned.set()
                await trio.lowlevel.checkpoint()  # where the cancellation takes effect
                raise AssertionError("the cancellation was lost")

        nursery.start_soon(call)
        await eventually(job_started.is_set)
        call_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert not call_returned.is_set()  # still waiting for the thread
        gate.set()
        with trio.fail_after(5):
            await call_returned.wait()
    assert finished_when_returned == [True]
    assert call_scope.cancelled_caught
    assert not threads_running_our_code()


async def test_cancelled_thread_call_in_abandon_mode_returns_while_the_thread_runs() -> None:
    job_started, gate, job_finished = threading.Event(), threading.Event(), threading.Event()
    call_scope = trio.CancelScope()
    call_returned = trio.Event()

    async with open_executors(threads=1) as executors, trio.open_nursery() as nursery:

        async def call() -> None:
            with call_scope:
                await executors.run_in_thread(
                    gated_thread_job, job_started, gate, job_finished, abandon_on_cancel=True
                )
            call_returned.set()

        nursery.start_soon(call)
        await eventually(job_started.is_set)
        cancelled_at = trio.current_time()
        call_scope.cancel()
        with trio.fail_after(1):
            await call_returned.wait()
        assert trio.current_time() - cancelled_at < 0.1
        # The abandoned thread still runs, and still holds its slot.
        assert not job_finished.is_set()
        assert executors.statistics().threads_busy == 1
        gate.set()
        await eventually(job_finished.is_set)
        await eventually(lambda: executors.statistics().threads_busy == 0)


async def test_cancelled_caller_that_waited_gets_the_job_exception() -> None:
    job_started, gate, job_finished = threading.Event(), threading.Event(), threading.Event()
    call_scope = trio.CancelScope()
    error = LookupError("the job failed")
    raised: list[BaseException] = []

    async with open_executors(threads=1) as executors, trio.open_nursery() as nursery:

        async def call() -> None:
            with call_scope:
                try:
                    await executors.run_in_thread(
                        gated_thread_job, job_started, gate, job_finished, error
                    )
                except LookupError as exc:
                    raised.append(exc)

        nursery.start_soon(call)
        await eventually(job_started.is_set)
        call_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    # The job's own error, not Cancelled: the work did end, and ended this way.
    assert raised == [error]


async def test_cancelled_queued_thread_call_never_starts_and_does_not_wait() -> None:
    job_started, gate, job_finished = threading.Event(), threading.Event(), threading.Event()
    queued_ran = threading.Event()
    queued_scope = trio.CancelScope()
    queued_returned = trio.Event()

    async with open_executors(threads=1) as executors, trio.open_nursery() as nursery:
        nursery.start_soon(
            executors.run_in_thread, gated_thread_job, job_started, gate, job_finished
        )
        await eventually(job_started.is_set)

        async def queued_call() -> None:
            with queued_scope:
                await executors.run_in_thread(queued_ran.set)
            queued_returned.set()

        nursery.start_soon(queued_call)
        await eventually(lambda: executors.statistics().threads_waiting == 1)
        queued_scope.cancel()
        # It returns at once, although the job whose slot it waited for goes on running.
        with trio.fail_after(1):
            await queued_returned.wait()
        assert queued_scope.cancelled_caught
        assert not job_finished.is_set()
        assert executors.statistics().threads_waiting == 0
        gate.set()
    assert not queued_ran.is_set()


async def test_abandon_threads_releases_a_caller_waiting_for_a_stuck_thread(
    tmp_path: Path,
) -> None:
    reader = FifoReader(tmp_path)
    call_scope = trio.CancelScope()
    call_returned = trio.Event()

    async with open_executors(threads=1) as executors, trio.open_nursery() as nursery:

        async def call() -> None:
            with call_scope:
                await executors.run_in_thread(reader)
            call_returned.set()

        try:
            nursery.start_soon(call)
            await eventually(reader.entered.is_set)
            call_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not call_returned.is_set()  # cancelled, it waits for its thread...
            abandoned_at = trio.current_time()
            executors.abandon_threads()
            with trio.fail_after(1):
                await call_returned.wait()  # ...until told to stop waiting
            assert trio.current_time() - abandoned_at < 0.1
            assert call_scope.cancelled_caught  # run_in_thread raised Cancelled
            # The abandoned thread is still stuck, and still holds its slot.
            assert not reader.returned.is_set()
            assert executors.statistics().threads_busy == 1
        finally:
            await reader.release()  # even if the test failed: no thread left stuck
        await eventually(reader.returned.is_set)
        await eventually(lambda: executors.statistics().threads_busy == 0)


async def test_calls_cancelled_after_abandon_threads_return_at_once() -> None:
    job_started, gate, job_finished = threading.Event(), threading.Event(), threading.Event()
    call_scope = trio.CancelScope()

    async with open_executors(threads=1) as executors:
        executors.abandon_threads()
        assert await executors.run_in_thread(jobs.add, 2, 3) == 5  # calls not cancelled: as ever

        async def call() -> None:
            with call_scope:
                await executors.run_in_thread(gated_thread_job, job_started, gate, job_finished)

        with trio.fail_after(1):
            async with trio.open_nursery() as call_nursery:
                call_nursery.start_soon(call)
                await eventually(job_started.is_set)
                call_scope.cancel()
        assert call_scope.cancelled_caught
        assert not job_finished.is_set()
        assert executors.statistics().threads_busy == 1
        gate.set()
        await eventually(lambda: executors.statistics().threads_busy == 0)


# --- processes: results, bounds, cancellation --------------------------------------------------


async def test_run_in_process_returns_results() -> None:
    async with open_executors(processes=1) as executors:
        assert await executors.run_in_process(jobs.add, 2, 3) == 5
        assert await executors.run_in_process(jobs.echo, 1, fn="f", key="v") == (
            (1,),
            {"fn": "f", "key": "v"},
        )
        worker = await executors.run_in_process(os.getpid)
        assert worker != os.getpid()
        with pytest.raises(ZeroDivisionError):
            await executors.run_in_process(divmod, 1, 0)


async def test_process_bound_holds(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    results: list[int] = []

    async def call() -> None:
        results.append(await executors.run_in_process(jobs.gated, tmp_path, gate))

    async with (
        open_executors(processes=2) as executors,
        trio.open_nursery() as nursery,
    ):
        for _ in range(4):
            nursery.start_soon(call)
        await eventually(
            lambda: len(started(tmp_path)) == 2 and executors.statistics().processes_waiting == 2
        )
        assert executors.statistics().processes_busy == 2
        gate.touch()
    assert len(started(tmp_path)) == 4
    assert len(set(results)) <= 2  # the four jobs shared two workers


async def test_cancelled_process_job_is_killed_within_100ms(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    call_scope = trio.CancelScope()
    returned_at = 0.0

    async with (
        open_executors(processes=1) as executors,
        trio.open_nursery() as nursery,
    ):

        async def call() -> None:
            nonlocal returned_at
            with call_scope:
                await executors.run_in_process(jobs.report_pid_then_sleep, pid_file, 10)
            returned_at = trio.current_time()

        nursery.start_soon(call)
        await eventually(pid_file.exists)
        worker = read_pid(pid_file)
        assert process_exists(worker)

        cancelled_at = trio.current_time()
        call_scope.cancel()
        await eventually(lambda: not process_exists(worker), within=0.1)
        await eventually(lambda: returned_at > 0, within=0.1)
        assert returned_at - cancelled_at < 0.1

        # The pool replaced the worker and keeps serving.
        assert await executors.run_in_process(os.getpid) != worker


async def test_cancelled_queued_process_job_never_starts(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    queued_marker = tmp_path / "queued-job-ran"
    queued_scope = trio.CancelScope()

    async with open_executors(processes=1) as executors, trio.open_nursery() as nursery:
        nursery.start_soon(executors.run_in_process, jobs.gated, tmp_path, gate)
        await eventually(lambda: len(started(tmp_path)) == 1)

        async def queued_call() -> None:
            with queued_scope:
                await executors.run_in_process(jobs.mark_started, queued_marker)

        nursery.start_soon(queued_call)
        await eventually(lambda: executors.statistics().processes_waiting == 1)
        queued_scope.cancel()
        await eventually(lambda: executors.statistics().processes_waiting == 0)
        gate.touch()
        # The one worker is free again and serves the next call; the cancelled one never ran.
        assert await executors.run_in_process(jobs.add, 1, 1) == 2
    assert queued_scope.cancelled_caught
    assert not queued_marker.exists()


# --- processes: crashes and pickling -----------------------------------------------------------

CRASHERS: dict[str, tuple[Callable[[], None], str]] = {
    "os._exit": (functools.partial(jobs.exit_abruptly, 1), "exited with status 1"),
    "SIGSEGV": (jobs.segfault, "killed by SIGSEGV"),
}


@pytest.mark.parametrize("crash", CRASHERS)
async def test_worker_crash_fails_the_call_and_the_pool_keeps_serving(crash: str) -> None:
    crasher, message = CRASHERS[crash]
    async with open_executors(processes=1) as executors:
        with pytest.raises(WorkerCrashed) as crashed:
            await executors.run_in_process(crasher)
        assert isinstance(crashed.value, ExecutorError)
        assert message in str(crashed.value)
        assert await executors.run_in_process(jobs.add, 2, 3) == 5


async def test_a_crash_fails_only_the_crashed_call(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    other_call: list[Any] = []

    async def call() -> None:
        try:
            other_call.append(await executors.run_in_process(jobs.gated, tmp_path, gate))
        except WorkerCrashed as exc:
            other_call.append(exc)

    async with open_executors(processes=2) as executors, trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await eventually(lambda: len(started(tmp_path)) == 1)
        with pytest.raises(WorkerCrashed):
            await executors.run_in_process(jobs.exit_abruptly, 1)
        gate.touch()
    assert isinstance(other_call[0], int)  # the other job's worker ran it to the end


def _local_function() -> Callable[[], None]:
    def local() -> None:
        pass

    return local


UNPICKLABLE: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
    "lambda": (lambda: None, ()),
    "local function": (_local_function(), ()),
    "lock argument": (jobs.echo, (threading.Lock(),)),
}


@pytest.mark.parametrize("case", UNPICKLABLE)
async def test_unpicklable_call_is_refused_before_anything_starts(case: str) -> None:
    fn, args = UNPICKLABLE[case]
    before = child_processes()
    async with open_executors(processes=1) as executors:
        with pytest.raises(NotPicklable) as refused:
            await executors.run_in_process(fn, *args)
        assert isinstance(refused.value, TypeError)
        assert isinstance(refused.value, ExecutorError)
        assert executors.statistics().processes_busy == 0
        assert not new_workers(before)  # workers spawn on demand: none was asked for


# --- shutdown ----------------------------------------------------------------------------------


async def test_shutdown_with_work_in_flight_leaves_nothing_running(tmp_path: Path) -> None:
    before = child_processes()
    thread_started = [threading.Event() for _ in range(2)]
    thread_finished = [threading.Event() for _ in range(2)]
    pid_files = [tmp_path / f"pid-{i}" for i in range(2)]

    with trio.CancelScope() as service_scope:
        async with (
            open_executors(threads=2, processes=2) as executors,
            trio.open_nursery() as nursery,
        ):
            for job_started, job_finished in zip(thread_started, thread_finished, strict=True):
                nursery.start_soon(
                    executors.run_in_thread, blocking_job, job_started, job_finished, 0.3
                )
            for pid_file in pid_files:
                nursery.start_soon(
                    executors.run_in_process, jobs.report_pid_then_sleep, pid_file, 10
                )
            await eventually(
                lambda: (
                    all(event.is_set() for event in thread_started)
                    and all(pid_file.exists() for pid_file in pid_files)
                )
            )
            workers = [read_pid(pid_file) for pid_file in pid_files]
            cancelled_at = trio.current_time()
            service_scope.cancel()

    # Shutdown waited for the thread jobs (0.3 s) but not for the 10 s process jobs.
    assert trio.current_time() - cancelled_at < 3
    assert all(event.is_set() for event in thread_finished)
    assert not threads_running_our_code()
    assert not [pid for pid in workers if process_exists(pid)]
    assert not new_workers(before)


async def test_abandon_threads_bounds_a_shutdown_held_by_a_stuck_thread(tmp_path: Path) -> None:
    """The server's sequence: cancel the service, then, when its grace ends, abandon threads."""
    reader = FifoReader(tmp_path)
    service_ended = trio.Event()

    async def service(*, task_status: trio.TaskStatus[tuple[trio.CancelScope, Any]]) -> None:
        with trio.CancelScope() as scope:
            async with open_executors(threads=1) as executors, trio.open_nursery() as nursery:
                nursery.start_soon(executors.run_in_thread, reader)
                task_status.started((scope, executors))
                await trio.sleep_forever()
        service_ended.set()

    async with trio.open_nursery() as server:
        try:
            service_scope, executors = await server.start(service)
            await eventually(reader.entered.is_set)
            service_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not service_ended.is_set()  # held by the cancelled call's stuck thread
            abandoned_at = trio.current_time()
            executors.abandon_threads()
            with trio.fail_after(2):
                await service_ended.wait()
            # The executors closed promptly, without the thread, which is still stuck (it dies
            # with the process at the latest: a daemon thread).
            assert trio.current_time() - abandoned_at < 1
            assert not reader.returned.is_set()
            assert reader.in_daemon_thread
        finally:
            await reader.release()
    await eventually(reader.returned.is_set)


async def test_closed_executors_refuse_work() -> None:
    async with open_executors() as executors:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await executors.run_in_thread(jobs.noop)
    with pytest.raises(trio.ClosedResourceError):
        await executors.run_in_process(jobs.noop)


@pytest.mark.parametrize("config", [{"threads": 0}, {"processes": 0}])
async def test_invalid_configuration_is_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        async with open_executors(**config):
            pass


# --- Ctrl-C ------------------------------------------------------------------------------------

# A tiny server: on Ctrl-C it lets its running job finish (shielded) and then exits.
CTRL_C_SERVER = """
import pathlib, sys, trio
from tests import executor_jobs
from vtrio.framework._executors import open_executors

async def main(pid_file):
    async with open_executors(processes=1) as executors:
        async def drain():
            with trio.CancelScope(shield=True):
                pid = await executors.run_in_process(
                    executor_jobs.report_pid_then_sleep, pid_file, 0.5
                )
            print("job finished", pid, flush=True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await trio.sleep_forever()

if __name__ == "__main__":
    try:
        trio.run(main, pathlib.Path(sys.argv[1]))
    except* KeyboardInterrupt:  # trio's nursery wraps it in an exception group
        print("interrupted", flush=True)
"""


async def test_ctrl_c_neither_kills_jobs_nor_prints_worker_tracebacks(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    completed: subprocess.CompletedProcess[bytes] | None = None

    async def run_server(*, task_status: trio.TaskStatus[trio.Process]) -> None:
        nonlocal completed
        completed = await trio.run_process(
            [sys.executable, "-c", CTRL_C_SERVER, str(pid_file)],
            env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)},
            start_new_session=True,  # its own process group, like a terminal's foreground job
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            task_status=task_status,
        )

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_server)
            await eventually(pid_file.exists)
            # What a terminal does on Ctrl-C: SIGINT to every process of the foreground group.
            os.killpg(server.pid, signal.SIGINT)

    assert completed is not None
    worker = read_pid(pid_file)
    assert completed.stderr.decode() == ""  # no traceback from the server or its workers
    assert completed.stdout.decode().split("\n") == [f"job finished {worker}", "interrupted", ""]
    assert completed.returncode == 0
    await eventually(lambda: not process_exists(worker), within=2)


# --- kill -9 -----------------------------------------------------------------------------------

# A server that runs one long job and is then killed outright.
LONG_JOB_SERVER = """
import pathlib, sys, trio
from tests import executor_jobs
from vtrio.framework._executors import open_executors

async def main(pid_file):
    async with open_executors(processes=1) as executors:
        await executors.run_in_process(executor_jobs.report_pid_then_sleep, pid_file, 60)

trio.run(main, pathlib.Path(sys.argv[1]))
"""


def running(pid: int) -> bool:
    """True while the process runs: neither reaped nor a zombie waiting for its new parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def test_kill_9_of_the_server_ends_a_worker_in_the_middle_of_a_job(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with trio.fail_after(20):
        server = await trio.lowlevel.open_process(
            [sys.executable, "-c", LONG_JOB_SERVER, str(pid_file)],
            env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)},
        )
        try:
            await eventually(pid_file.exists)
            worker = read_pid(pid_file)
            assert running(worker)
            server.kill()  # SIGKILL: the server cannot tell its worker anything
            assert await server.wait() == -signal.SIGKILL
        finally:
            server.kill()
            await server.wait()
        try:
            # The job had 60 s to go: only the worker's own watchdog can end it this soon.
            await eventually(
                lambda: not running(worker), within=vtrio.framework._executors.PARENT_POLL + 2
            )
        finally:
            if running(worker):
                os.kill(worker, signal.SIGKILL)  # the test failed: leave nothing behind

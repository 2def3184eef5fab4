"""Keep a child process (the embedded mongod) alive no longer than the process that wants it.

Usage: ``python -I -S _keeper.py OWNER STOP_TIMEOUT COMMAND [ARG ...]``

vtrio starts mongod through this script, with the keeper's stdin a pipe whose write end only
vtrio holds. The keeper starts COMMAND as its child and then waits for one of three things:

- end-of-file on stdin: vtrio closed the pipe to stop mongod, or vtrio died, however it died
  (the kernel closes a dead process's descriptors, so a SIGKILL ends the pipe just the same);
- SIGTERM, sent to the keeper itself: the same as end-of-file;
- the child exiting by itself.

In the first two cases it stops the child: SIGTERM, up to STOP_TIMEOUT seconds for a clean
shutdown, then SIGKILL. Either way it reaps the child and exits as the child did: with the same
exit code, or killed by the same signal. So the keeper's parent reads the child's status as the
keeper's own.

SIGINT is ignored: a Ctrl-C in a terminal reaches the whole foreground process group, and the
owner, not the terminal, decides when mongod stops. (The owner also starts the keeper in a
session of its own, so it is not in that group in the first place.)

OWNER is the pid of the process the keeper serves. The keeper does not use it: it is written
on the command line for others to read in ``/proc/PID/cmdline``. A keeper whose parent is still
OWNER serves a live process; one whose parent is no longer OWNER has lost it, and is stopping
its child (or was stopped itself, and cannot).

Standard library only, and nothing of vtrio or trio, so that it starts in about 20 ms.
Linux only: it waits for its child through a pidfd (Linux 5.3).
"""

import os
import resource
import select
import signal
import sys
from typing import NoReturn

_NAME = "vtrio keeper"
_USAGE = "usage: python -I -S _keeper.py OWNER STOP_TIMEOUT COMMAND [ARG ...]"
# What a shell exits with when it cannot find, or cannot run, a command.
_NOT_FOUND = 127
_CANNOT_RUN = 126


def main(argv: list[str]) -> NoReturn:
    """Start the child, wait, stop it if asked, and exit as it did (see the module's docstring)."""
    stop_timeout, command = _parse(argv)
    signals = _catch_signals()
    try:
        child = _spawn(command)
    except OSError as exc:
        print(f"{_NAME}: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        sys.exit(_NOT_FOUND if isinstance(exc, FileNotFoundError) else _CANNOT_RUN)
    try:
        # A pidfd refers to this one child, even exited: it becomes readable when it exits,
        # and stays so until the child is reaped, which only the keeper does.
        pidfd = os.pidfd_open(child)
        if _wait_for_a_reason_to_stop(pidfd, signals):
            _stop(child, pidfd, stop_timeout)
        returncode = _reap(child)
    except BaseException:
        # A keeper that fails with an exception (a bug) takes its child along, rather than
        # leave it running with no one to stop it.
        os.kill(child, signal.SIGKILL)
        raise
    _exit_as(returncode)


def _parse(argv: list[str]) -> tuple[float, list[str]]:
    try:
        int(argv[1])  # OWNER: checked, and left for others to read (see above)
        stop_timeout, command = float(argv[2]), argv[3:]
    except (IndexError, ValueError):
        stop_timeout, command = 0.0, []
    if not command:
        print(_USAGE, file=sys.stderr)
        sys.exit(2)
    return stop_timeout, command


def _catch_signals() -> int:
    """Catch SIGINT and SIGTERM without being interrupted by them; return a descriptor that
    receives the number of each signal caught, as a byte."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for signum in (signal.SIGINT, signal.SIGTERM):
        # A handler, not SIG_IGN: Python's handler is what writes to the wakeup descriptor,
        # and a handled signal goes back to its default in the child at exec, where an ignored
        # one would stay ignored.
        signal.signal(signum, _noted)
    # An ignored SIGCHLD, inherited through exec, would make the kernel reap the child for us
    # and lose its exit status.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # The owner may start us from a thread that blocks signals, and a mask is inherited.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    return read_end


def _noted(signum: int, frame: object) -> None:
    """The wakeup descriptor has the signal; there is nothing else to do here."""


def _spawn(command: list[str]) -> int:
    """Start ``command``, the path in its first word taken as it is (no PATH search)."""
    return os.posix_spawn(
        command[0],
        command,
        os.environ,
        # mongod logs to its --logpath; nothing of it belongs on vtrio's terminal, and it
        # must not hold the keeper's stdin, which is vtrio's alone.
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        # No signal blocked, whatever mask the keeper was given; and the defaults of the two
        # that Python ignores, as subprocess gives them back to its children.
        setsigmask=(),
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )


def _wait_for_a_reason_to_stop(pidfd: int, signals: int) -> bool:
    """Block until the child should be stopped (True) or has exited by itself (False)."""
    poller = select.poll()
    for fd in (pidfd, 0, signals):
        poller.register(fd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if pidfd in ready:
            return False
        if 0 in ready and _at_end_of_file(0):
            return True
        if signals in ready and signal.SIGTERM in os.read(signals, 64):
            return True


def _at_end_of_file(fd: int) -> bool:
    try:
        return not os.read(fd, 4096)  # the owner writes nothing; whatever it does is dropped
    except OSError:
        return True  # not readable at all: no owner to wait for


def _stop(child: int, pidfd: int, timeout: float) -> None:
    # os.kill by pid is safe: until the keeper reaps it, the child's pid cannot be reused.
    os.kill(child, signal.SIGTERM)
    if not _readable_within(pidfd, timeout):
        os.kill(child, signal.SIGKILL)


def _readable_within(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    # A signal caught meanwhile does not cut this short: Python resumes the poll for the
    # time that is left (PEP 475).
    return bool(poller.poll(timeout * 1000))


def _reap(child: int) -> int:
    """Wait for the child to exit; its status as subprocess reports it: -N for signal N."""
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def _exit_as(returncode: int) -> NoReturn:
    """Exit with the child's exit code, or die of the signal that killed it."""
    if returncode >= 0:
        sys.exit(returncode)
    signum = -returncode
    # The child has dumped core already if it was going to; the keeper's core is worth nothing.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if signum != signal.SIGKILL:  # the one whose handling cannot be changed, nor needs to be
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    # Not reached: only a signal that kills by default can have killed the child. Were it
    # reached, say it as shells do.
    sys.exit(128 + signum)


if __name__ == "__main__":
    main(sys.argv)

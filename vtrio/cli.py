"""The ``vtrio`` command: run the server, or manage its users and API keys; and the signals.

The process is the command line's: it turns SIGINT and SIGTERM into the server's one stop
signal (:class:`~vtrio.framework.Stopping`). The first starts a graceful stop, bounded by
``--shutdown-timeout``; a second SIGINT (or one before the server is ready) stops it at once:
every cleanup still running is cut short, and if the process has not exited
:data:`HARD_EXIT_AFTER` seconds later it exits anyway (its embedded mongod dies with it).

Exit codes: 0 done; 1 a service or command failed (one line on stderr says which and why);
2 a setting or argument is wrong (one line names it); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

import pymongo
import trio

from vtrio import __version__, virtool
from vtrio.config import ConfigError, Settings, add_settings_arguments, load_settings
from vtrio.framework import (
    DEFAULT_URL,
    ClientError,
    Database,
    DatabaseError,
    MongodError,
    ServiceError,
    Stopping,
    describe,
    dumps,
    open_database,
    run_mongod,
    running_mongod,
)
from vtrio.framework import call as call_method
from vtrio.framework import watch as watch_changes
from vtrio.server import serve
from vtrio.virtool import COLLECTIONS

log = logging.getLogger("vtrio")

HARD_EXIT_AFTER = 2.0
"""Seconds a process stopped at once may take to exit before it exits regardless."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vtrio`` and ``python -m vtrio``; returns the exit code."""
    parser = _parser()
    arguments = vars(parser.parse_args(argv))
    command: Callable[[Settings, dict[str, Any]], Any] = arguments.pop("command", run_server)
    if command in (run_call, run_watch):  # clients of a server: no server settings to load
        return _run_client(command, arguments)
    try:
        settings = load_settings({k: v for k, v in arguments.items() if isinstance(v, str)})
    except ConfigError as exc:
        print(f"vtrio: error: {exc}", file=sys.stderr)
        return 2
    # Admin commands print their own result; their progress is not worth a line each.
    _configure_logging(settings, quiet=command is not run_server)
    _exit_promptly_from_pymongo()
    try:
        trio.run(command, settings, arguments)
    except ServiceError as exc:
        print(f"vtrio: {exc}", file=sys.stderr)
        return 1
    except (virtool.AuthError, MongodError, DatabaseError) as exc:
        print(f"vtrio: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:  # several things failed at once
        print(f"vtrio: {describe(group)}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    settings = argparse.ArgumentParser(add_help=False)
    add_settings_arguments(settings)
    parser = argparse.ArgumentParser(
        prog="vtrio",
        description="Virtool's backend core on Trio: live MongoDB changes over websockets.",
        parents=[settings],
    )
    parser.add_argument("--version", action="version", version=f"vtrio {__version__}")
    commands = parser.add_subparsers(title="commands (default: serve)", metavar="COMMAND")
    serve_parser = commands.add_parser("serve", parents=[settings], help="run the server")
    serve_parser.set_defaults(command=run_server)

    users = commands.add_parser("users", help="manage users").add_subparsers(required=True)
    create_user = users.add_parser("create", parents=[settings], help="create a user")
    create_user.add_argument("name")
    create_user.add_argument("--admin", action="store_true", help="the user administers vtrio")
    create_user.add_argument(
        "--group",
        action="append",
        default=[],
        dest="groups",
        metavar="GROUP",
        help="a group the user belongs to (repeatable)",
    )
    create_user.set_defaults(command=users_create)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(required=True)
    create_key = keys.add_parser(
        "create", parents=[settings], help="create a key for USER; prints the key, once"
    )
    create_key.add_argument("user")
    create_key.set_defaults(command=keys_create)
    list_keys = keys.add_parser("list", parents=[settings], help="list USER's key ids and dates")
    list_keys.add_argument("user")
    list_keys.set_defaults(command=keys_list)
    revoke_key = keys.add_parser(
        "revoke", parents=[settings], help="revoke a key; its connections are closed"
    )
    revoke_key.add_argument("id")
    revoke_key.set_defaults(command=keys_revoke)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--url",
        default=os.environ.get("VTRIO_URL", DEFAULT_URL),
        help=f"the server's websocket URL [VTRIO_URL; default: {DEFAULT_URL}]",
    )
    client.add_argument("--key", default=os.environ.get("VTRIO_KEY"), help="API key [VTRIO_KEY]")
    call_parser = commands.add_parser(
        "call", parents=[client], help="call a method; print its result as JSON"
    )
    call_parser.add_argument("method", help="e.g. samples.list")
    call_parser.add_argument(
        "params", nargs="?", default="{}", help='JSON object of parameters, e.g. \'{"id": "..."}\''
    )
    call_parser.set_defaults(command=run_call)
    watch_parser = commands.add_parser(
        "watch", parents=[client], help="print change messages as JSON lines until Ctrl-C"
    )
    watch_parser.add_argument(
        "--interface", default="", help="only these interfaces, comma-separated (e.g. samples,jobs)"
    )
    watch_parser.set_defaults(command=run_watch)
    return parser  # fmt: skip


def _run_client(command: Callable[..., Any], arguments: dict[str, Any]) -> int:
    try:
        trio.run(command, arguments)
    except ClientError as exc:
        print(f"vtrio: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


async def run_call(arguments: dict[str, Any]) -> None:
    try:
        params = json.loads(arguments["params"])
    except ValueError as exc:
        raise ClientError(f"PARAMS is not JSON: {exc}") from None
    await call_method(arguments["url"], arguments["key"], arguments["method"], params)


async def run_watch(arguments: dict[str, Any]) -> None:
    interfaces = [name for name in arguments["interface"].split(",") if name]
    await watch_changes(arguments["url"], arguments["key"], interfaces)


def _configure_logging(settings: Settings, *, quiet: bool = False) -> None:
    level = settings.log_level_number
    if quiet and level == logging.INFO:  # the default, not a level the user asked for
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A line per connection is trio-websocket's debug chatter, not ours.
    logging.getLogger("trio-websocket").setLevel(max(logging.INFO, settings.log_level_number))


def _exit_promptly_from_pymongo() -> None:
    # pymongo's monitor threads look for their stop flag every MIN_HEARTBEAT_INTERVAL (0.5 s),
    # and pymongo joins them when the interpreter exits: the process took half a second to exit
    # after all else had stopped. Looking ten times as often costs nothing measurable; the
    # price is that a server that is down may be probed up to 20 times a second instead of 2.
    # It is process-wide, so it is the process's owner, the command line, that sets it.
    pymongo.common.MIN_HEARTBEAT_INTERVAL = 0.05


async def run_server(settings: Settings, arguments: dict[str, Any]) -> None:
    """Serve until a signal stops the server (see the module docstring)."""
    stopping = Stopping(settings.shutdown_timeout)
    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, stopping, ready, nursery.cancel_scope)
        async with trio.open_nursery() as server:
            await server.start(serve, settings, stopping)
            ready.set()
        nursery.cancel_scope.cancel()  # the server has stopped: so may the signal watcher


async def _stop_on_signals(stopping: Stopping, ready: trio.Event, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if stopping.requested or not ready.is_set():
                log.warning("%s: stopping now", name)
                stopping.hurry()
                scope.cancel()
                _exit_if_still_running_after(HARD_EXIT_AFTER)
            else:
                log.info("%s received: stopping gracefully within %.1f s (again to stop at once)",
                         name, stopping.grace_period)  # fmt: skip
                stopping.request()


def _exit_if_still_running_after(seconds: float) -> None:
    """The last resort of a stop at once: whatever still holds the process (a thread stuck in a
    system call, say) does not hold it past ``seconds``."""

    def exit_now() -> None:
        log.error("still running %.1f s after a stop at once: exiting regardless", seconds)
        logging.shutdown()
        os._exit(130)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


@asynccontextmanager
async def admin_database(settings: Settings) -> AsyncIterator[Database]:
    """The server's database, for a command run beside it (or without it).

    With the embedded default, the mongod of a running server is used if there is one; else
    one is started for the command and stopped after it.
    """
    if settings.mongodb_url:
        url_source: AbstractAsyncContextManager[str] = nullcontext(settings.mongodb_url)
    elif (running := running_mongod(settings.data_dir)) is not None:
        url_source = nullcontext(running.url)
    else:
        url_source = run_mongod(
            settings.data_dir, port=settings.mongod_port, binary=settings.mongod_path
        )
    async with (
        url_source as url,
        open_database(
            url, settings.db_name, collections=COLLECTIONS, timeout=settings.mongodb_timeout,
            watch=False,  # a command has no clients to tell
        ) as db,
    ):  # fmt: skip
        yield db


async def users_create(settings: Settings, arguments: dict[str, Any]) -> None:
    async with admin_database(settings) as db:
        user = await virtool.create_user(
            db, arguments["name"], admin=arguments["admin"], groups=arguments["groups"]
        )
    print(f"created user {user['name']}" + (" (admin)" if user["admin"] else ""))


async def keys_create(settings: Settings, arguments: dict[str, Any]) -> None:
    async with admin_database(settings) as db:
        _, key = await virtool.create_key(db, arguments["user"])
    print(key)


async def keys_list(settings: Settings, arguments: dict[str, Any]) -> None:
    async with admin_database(settings) as db:
        keys = await virtool.list_keys(db, arguments["user"])
    for key in keys:
        print(dumps(key))


async def keys_revoke(settings: Settings, arguments: dict[str, Any]) -> None:
    async with admin_database(settings) as db:
        await virtool.revoke_key(db, arguments["id"])
    print(f"revoked key {arguments['id']}")

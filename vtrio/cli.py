"""The ``vtrio`` command: run the server, or manage its users and API keys.

Exit codes: 0 done; 1 a service or command failed (one line on stderr says which and why);
2 a setting or argument is wrong (one line names it); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

import trio

from vtrio import __version__, auth, client
from vtrio.client import DEFAULT_URL, ClientError
from vtrio.config import ConfigError, Settings, add_settings_arguments, load_settings
from vtrio.db import Database, DatabaseError, open_database
from vtrio.encoding import dumps
from vtrio.mongod import MongodError, run_mongod, running_mongod
from vtrio.server import serve
from vtrio.services import ServiceError, describe

log = logging.getLogger("vtrio")


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
    try:
        trio.run(command, settings, arguments)
    except ServiceError as exc:
        print(f"vtrio: {exc}", file=sys.stderr)
        return 1
    except (auth.AuthError, MongodError, DatabaseError) as exc:
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
    await client.call(arguments["url"], arguments["key"], arguments["method"], params)


async def run_watch(arguments: dict[str, Any]) -> None:
    interfaces = [name for name in arguments["interface"].split(",") if name]
    await client.watch(arguments["url"], arguments["key"], interfaces)


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


async def run_server(settings: Settings, arguments: dict[str, Any]) -> None:
    await serve(settings)


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
            url, settings.db_name, dispatch=_nowhere, timeout=settings.mongodb_timeout
        ) as db,
    ):
        await auth.create_indexes(db)
        yield db


def _nowhere(interface: str, operation: str, data: Any, subject: Any) -> None:
    """Admin commands touch only silent collections: there is no one to dispatch to."""


async def users_create(settings: Settings, arguments: dict[str, Any]) -> None:
    async with admin_database(settings) as db:
        user = await auth.create_user(
            db, arguments["name"], admin=arguments["admin"], groups=arguments["groups"]
        )
    print(f"created user {user['name']}" + (" (admin)" if user["admin"] else ""))


async def keys_create(settings: Settings, arguments: dict[str, Any]) -> None:
    async with admin_database(settings) as db:
        _, key = await auth.create_key(db, arguments["user"])
    print(key)


async def keys_list(settings: Settings, arguments: dict[str, Any]) -> None:
    async with admin_database(settings) as db:
        keys = await auth.list_keys(db, arguments["user"])
    for key in keys:
        print(dumps(key))


async def keys_revoke(settings: Settings, arguments: dict[str, Any]) -> None:
    async with admin_database(settings) as db:
        await auth.revoke_key(db, arguments["id"])
    print(f"revoked key {arguments['id']}")

"""Settings: every one comes from a command-line flag or a ``VTRIO_*`` environment variable.

A flag wins over the environment, the environment over the default, and every default runs on a
laptop. The table of settings is the dataclass below: each field's metadata gives its help text,
and its flag (``--db-name``) and variable (``VTRIO_DB_NAME``) are derived from its name, so the
``--help`` text, the README's table and the parser cannot drift apart.

A value that cannot be used raises :class:`ConfigError`, which names the setting the way the user
gave it (flag or variable); the CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo.errors import ConfigurationError, InvalidURI
from pymongo.uri_parser import parse_uri

ENV_PREFIX = "VTRIO_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(Exception):
    """A setting has a value vtrio cannot use. The message names the setting and the fix."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source


# --- value parsers: each takes the raw string and returns the value or raises ValueError -------


def _port(raw: str) -> int:
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port (1-65535, or 0 for any free port)")
    return port


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"{value} must be 0 or more")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{raw} must be a number of seconds above 0")
    return value


def _mongodb_url(raw: str) -> str:
    try:
        parse_uri(raw)
    except (InvalidURI, ConfigurationError, ValueError) as exc:
        raise ValueError(f"not a usable MongoDB URL ({exc})") from None
    return raw


def _choice(choices: Sequence[str], *, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.upper() if upper else raw
        if value not in choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _data_dir(raw: str) -> Path:
    path = Path(raw).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # os.access says yes to root for anything; only a real write proves the folder usable.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"{path} cannot be used as the data directory ({exc.strerror})") from None
    return path


def _folder(raw: str) -> Path:
    return Path(raw).expanduser().resolve()


def _text(raw: str) -> str:
    return raw


def setting(default: Any, help: str, parse: Callable[[str], Any] = _text, **extra: Any) -> Any:
    """Declare a setting: its default, its help text and the parser for its string form."""
    return field(default=default, metadata={"help": help, "parse": parse, **extra})


@dataclass(frozen=True)
class Settings:
    """Everything vtrio can be told. Field ``db_name`` is ``--db-name`` and ``VTRIO_DB_NAME``."""

    # The server
    host: str = setting("127.0.0.1", "address the websocket server listens on")
    port: int = setting(9950, "port the websocket server listens on (0: any free port)", _port)
    data_dir: Path = setting(Path("vtrio-data"), "folder for vtrio's data", _data_dir)
    uploads_dir: Path | None = setting(
        None,
        "folder of reads files; instances sharing a MongoDB share it (default: DATA_DIR/uploads)",
        _folder,
    )
    shutdown_timeout: float = setting(
        10.0, "grace period for a graceful shutdown, in seconds", _positive_float
    )
    log_level: str = setting(
        "INFO", "DEBUG, INFO, WARNING or ERROR", _choice(LOG_LEVELS, upper=True)
    )
    # MongoDB
    mongodb_url: str | None = setting(
        None, "MongoDB to use; unset: run an embedded mongod under the data directory", _mongodb_url
    )
    db_name: str = setting("vtrio", "MongoDB database name")
    mongod_path: Path | None = setting(
        None, "mongod binary for the embedded MongoDB (default: the one from vtrio[mongodb])", Path
    )
    mongod_port: int = setting(
        0, "port of the embedded mongod on 127.0.0.1 (0: any free port)", _port
    )
    mongodb_timeout: float = setting(
        10.0, "time limit of one MongoDB operation, in seconds", _positive_float
    )
    mongodb_pool_size: int = setting(
        8, "threads running MongoDB calls, each with a connection of its own", _positive_int
    )
    history_size: int = setting(
        10_000, "changes kept in memory for clients that resume (older ones: from MongoDB)",
        _positive_int,
    )  # fmt: skip
    # Executors
    threads: int = setting(16, "threads for blocking work (run_in_thread)", _positive_int)
    processes: int = setting(
        max(1, os.cpu_count() or 1), "worker processes for CPU-heavy work", _positive_int
    )
    jobs: int = setting(
        2, "jobs run at once (each uses one worker process at a time)", _positive_int
    )
    # Websocket clients
    max_connections: int = setting(10_000, "websocket connections open at once", _positive_int)
    max_handshakes: int = setting(
        1000, "connections in their handshake at once (the longest waiting is dropped)",
        _positive_int,
    )  # fmt: skip
    handshake_timeout: float = setting(
        5.0, "seconds a connection has to send its request", _positive_float
    )
    max_message_size: int = setting(
        1 << 20, "largest frame a client may send, in bytes", _positive_int
    )
    send_queue_size: int = setting(
        1000, "messages queued for one client before it is closed as too slow", _positive_int
    )
    send_buffer_size: int = setting(
        0,
        "kernel send buffer per connection, bytes (0: the kernel's own sizing)",
        _non_negative_int,
    )
    heartbeat_interval: float = setting(
        20.0, "seconds between pings to each client; a missed pong closes it", _positive_float
    )
    # Outgoing HTTP
    http_connect_timeout: float = setting(5.0, "HTTP connect timeout, seconds", _positive_float)
    http_read_timeout: float = setting(30.0, "HTTP read timeout, seconds", _positive_float)
    http_total_timeout: float = setting(60.0, "HTTP request time limit, seconds", _positive_float)
    http_max_connections: int = setting(20, "HTTP connections open at once", _positive_int)
    ncbi_base_url: str = setting(
        "https://eutils.ncbi.nlm.nih.gov/entrez/eutils", "NCBI E-utilities base URL"
    )
    ncbi_api_key: str | None = setting(None, "NCBI API key (10 requests/s instead of 3)")

    @property
    def uploads(self) -> Path:
        """The uploads folder: ``--uploads-dir``, or ``DATA_DIR/uploads``."""
        return self.uploads_dir or self.data_dir / "uploads"

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every setting. Absent flags leave no attribute, so the environment shows."""
    group = parser.add_argument_group("settings (each also read from its VTRIO_* variable)")
    for f in dataclasses.fields(Settings):
        default = f.default if f.default is not None else "unset"
        group.add_argument(
            flag_of(f.name),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.name.split("_")[-1].upper(),
            help=f"{f.metadata['help']} [{env_of(f.name)}; default: {default}]",
        )


def load_settings(flags: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> Settings:
    """Build the settings from parsed flags (strings), then the environment, then the defaults.

    Raises ConfigError naming the flag or variable whose value is wrong.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name in flags:
            source, raw = flag_of(f.name), flags[f.name]
        elif env_of(f.name) in environ:
            source, raw = env_of(f.name), environ[env_of(f.name)]
        elif f.name == "data_dir":  # the default folder is created and checked too
            source, raw = flag_of(f.name), str(f.default)
        else:
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as exc:
            message = str(exc)
            if "invalid literal" in message or "could not convert" in message:
                message = f"{raw!r} is not a number"
            raise ConfigError(source, message) from None
    return Settings(**values)

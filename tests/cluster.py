"""Several ``python -m vtrio`` instances on one database, and what their tests need around them.

- :func:`instances`: real server processes sharing one MongoDB database, stopped at the end;
- :class:`Admin`: users and keys, made in this process through vtrio's own admin functions;
- :class:`LiveClient`: a websocket client (trio-websocket) with a reader task, so that many
  JSON-RPC calls may be in flight at once while change messages are recorded in order;
- :class:`Follower`: a raw client (see :class:`tests.live.RawClient`) that follows the changes
  across reconnects and resets, resuming with ``?since=`` from the last position it saw;
- :func:`committed`: the changes MongoDB committed, read from a change stream of this process's
  own (not vtrio's), with the positions vtrio gives them, and :func:`expected_for`: the
  messages a user should receive for them, by the visibility rule of the README;
- :class:`Mongod`: a mongod of a test's own (a single-node replica set), to roll its oplog over
  or to kill and restart under a running server.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymongo
import trio
from bson import Timestamp
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url
from wsproto.events import CloseConnection, Ping, TextMessage

from tests.live import RawClient
from tests.processes import VtrioProcess, mongods_using, vtrio_process
from tests.rpc_client import CallFailed
from vtrio import virtool
from vtrio.framework import FEED_NAME, Database, dumps, find_mongod, open_database, to_wire
from vtrio.virtool import COLLECTIONS, runner_name

Message = dict[str, Any]

WATCHED = ("jobs", "keys", "samples", "users")
"""The collections vtrio's change stream follows (its ordinals count their events)."""
SAMPLE_FIELDS = COLLECTIONS["samples"].projection
FASTQ = b"@r1\nACGT\n+\nIIII\n"


# --- positions ----------------------------------------------------------------------------------


def position_of(cluster_time: Timestamp, ordinal: int = 1) -> str:
    """The wire form of a position (README: 22 hex digits that sort in commit order)."""
    return f"{cluster_time.time:08x}{cluster_time.inc:08x}{ordinal:06x}"


def timestamp_of(position: str) -> Timestamp:
    return Timestamp(int(position[:8], 16), int(position[8:16], 16))


def strictly_increasing(positions: Sequence[str]) -> bool:
    return all(a < b for a, b in itertools.pairwise(positions))


# --- server instances ---------------------------------------------------------------------------


@dataclass
class Instance:
    """One running ``python -m vtrio`` of the cluster."""

    process: VtrioProcess
    url: str
    data_dir: Path

    @property
    def name(self) -> str:
        """What ``system.info`` calls it, and the ``runner`` its job runner writes on jobs."""
        return runner_name(self.data_dir)

    @property
    def pid(self) -> int:
        return self.process.process.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])


def instance_args(mongodb_url: str, db_name: str, data_dir: Path, *extra: str) -> list[str]:
    return [
        "--mongodb-url",
        mongodb_url,
        "--db-name",
        db_name,
        "--data-dir",
        str(data_dir),
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--log-level",
        "INFO",
        "--processes",
        "1",
        "--shutdown-timeout",
        "5",
        *extra,
    ]


@asynccontextmanager
async def instances(
    mongodb_url: str,
    db_name: str,
    base: Path,
    count: int,
    *extra: str,
    each: Sequence[Sequence[str]] = (),
    prefix: str = "instance",
    at_once: bool = False,
) -> AsyncIterator[list[Instance]]:
    """``count`` instances on one database, started at once; each has a data directory of its
    own under ``base``; they share the uploads folder ``base/uploads`` (which holds ``r.fq``, a
    FASTQ file), as the README asks of instances sharing a MongoDB. Each takes ``extra``
    arguments, and ``each[i]`` too. The first is started alone, the others together once it
    is ready (``at_once``: all together). At the end they are asked to stop (SIGTERM) and must
    exit 0 within 15 s; a server that wrote a traceback fails the test, with its output."""
    uploads = base / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    (uploads / "r.fq").write_bytes(FASTQ)
    async with AsyncExitStack() as stack:
        started: list[Instance] = []
        processes = []
        urls: dict[int, str] = {}

        async def ready(index: int, process: VtrioProcess) -> None:
            with process.explained():
                urls[index] = await process.wait_ready(90)

        for index in range(count):
            data_dir = base / f"{prefix}{index}"
            data_dir.mkdir(parents=True, exist_ok=True)
            own = list(each[index]) if index < len(each) else []
            args = instance_args(
                mongodb_url, db_name, data_dir, "--uploads-dir", str(uploads), *extra, *own
            )
            process = await stack.enter_async_context(vtrio_process(args))
            processes.append((process, data_dir))
            if index == 0 and not at_once:
                await ready(index, process)
        async with trio.open_nursery() as nursery:
            for index, (process, _) in enumerate(processes):
                if index not in urls:
                    nursery.start_soon(ready, index, process)
        for index, (process, data_dir) in enumerate(processes):
            started.append(Instance(process, urls[index], data_dir))
        yield started
        for instance in started:
            if instance.process.process.returncode is None:
                instance.process.signal(signal.SIGTERM)
        for instance in started:
            with instance.process.explained():
                code = await instance.process.wait(15)
                assert code == 0, f"{instance.name} exited with {code}"
                assert "Traceback" not in instance.process.output, "a server wrote a traceback"


def alive(instance: Instance) -> bool:
    return instance.process.process.returncode is None


# --- users and keys -----------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False
    groups: frozenset[str] = frozenset()

    def sees(self, sample: dict[str, Any] | None) -> bool:
        """The README's rule: the owner, the group with ``group_read``, everyone with
        ``all_read``, and administrators (who also see what cannot be judged)."""
        if self.admin:
            return True
        if sample is None:
            return False
        return (
            sample.get("user") == self.name
            or sample.get("all_read") is True
            or (sample.get("group_read") is True and sample.get("group") in self.groups)
        )


class Admin:
    """Users and keys of the test's database, made with vtrio's own admin functions."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def user(self, user: User) -> None:
        await virtool.create_user(self.db, user.name, admin=user.admin, groups=sorted(user.groups))

    async def key(self, user: User) -> str:
        if await self.db.users.find_one({"_id": user.name}) is None:
            await self.user(user)
        _, key = await virtool.create_key(self.db, user.name)
        return key


@asynccontextmanager
async def admin(mongodb_url: str, db_name: str) -> AsyncIterator[Admin]:
    async with open_database(mongodb_url, db_name, collections=COLLECTIONS, watch=False) as db:
        yield Admin(db)


# --- a client with many calls in flight ---------------------------------------------------------


class LiveClient:
    """A websocket connection whose frames one task reads: responses go to their callers,
    change messages to :attr:`messages`, in order. Made by :func:`live_client`."""

    def __init__(self, websocket: WebSocketConnection) -> None:
        self.websocket = websocket
        self.messages: list[Message] = []
        self.frames = 0
        self.answered: set[Any] = set()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed_at: float | None = None
        """When the close frame was read (time.time())."""
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.Event] = {}
        self._responses: dict[int, dict[str, Any]] = {}
        self._news = trio.lowlevel.ParkingLot()

    async def read_forever(self) -> None:
        try:
            while True:
                frame = json.loads(await self.websocket.get_message())
                self.frames += 1
                for item in frame if isinstance(frame, list) else [frame]:
                    if "jsonrpc" in item:
                        assert item["id"] not in self.answered, f"two responses: {item}"
                        self.answered.add(item["id"])
                        if item["id"] in self._waiting:  # else its caller gave up (cancelled)
                            self._responses[item["id"]] = item
                            self._waiting[item["id"]].set()
                    else:
                        assert set(item) == {"interface", "operation", "data", "position"}, item
                        self.messages.append(item)
                self._news.unpark_all()
        except ConnectionClosed as closed:
            self.closed_at = time.time()
            self.close_code, self.close_reason = closed.reason.code, closed.reason.reason
        finally:
            self._news.unpark_all()
            for event in self._waiting.values():
                event.set()

    async def call(self, method: str, params: Any = None, timeout: float = 20) -> Any:
        """The result of ``method``; CallFailed if the server answered with an error."""
        request_id = next(self._ids)
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        done = self._waiting[request_id] = trio.Event()
        try:
            with trio.fail_after(timeout):
                await self.websocket.send_message(json.dumps(request))
                await done.wait()
        finally:
            del self._waiting[request_id]
        response = self._responses.pop(request_id, None)
        if response is None:
            raise AssertionError(f"{method}: connection closed ({self.close_code}) first")
        if "error" in response:
            raise CallFailed(response["error"])
        return response["result"]

    async def wait(
        self, condition: Callable[[], bool], timeout: float = 20, what: str = ""
    ) -> None:
        """Until ``condition()`` (looked at after every frame); fails after ``timeout``."""
        try:
            with trio.fail_after(timeout):
                while not condition():
                    if self.close_code is not None:
                        raise AssertionError(f"closed with {self.close_code} {self.close_reason}")
                    await self._news.park()
        except trio.TooSlowError:
            raise AssertionError(f"timed out waiting for {what or condition}") from None

    async def wait_messages(self, count: int, timeout: float = 20) -> list[Message]:
        """Until at least ``count`` messages have come; all of them."""
        await self.wait(lambda: len(self.messages) >= count, timeout, f"{count} messages")
        return self.messages

    async def wait_position(self, position: str, timeout: float = 20) -> None:
        """Until a message at ``position`` or after it has come."""
        await self.wait(
            lambda: bool(self.messages) and self.messages[-1]["position"] >= position,
            timeout,
            f"a message at {position}",
        )

    async def wait_closed(self, timeout: float = 20) -> int:
        await self.wait(lambda: self.close_code is not None, timeout, "a close")
        assert self.close_code is not None
        return self.close_code


@asynccontextmanager
async def live_client(
    url: str, key: str, *, since: str | None = None, batch: bool = True
) -> AsyncIterator[LiveClient]:
    query = "&".join(
        ([f"since={since}"] if since is not None else []) + ([] if batch else ["batch=0"])
    )
    headers = [(b"authorization", f"Bearer {key}".encode())]
    target = url + ("?" + query if query else "")
    async with (
        open_websocket_url(target, extra_headers=headers, max_message_size=64 << 20) as websocket,
        trio.open_nursery() as nursery,
    ):
        client = LiveClient(websocket)
        nursery.start_soon(client.read_forever)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()


# --- a client that follows the changes across reconnects ----------------------------------------


@dataclass(eq=False)
class Follower:
    """One user's view of the changes, over any number of connections to any instances: every
    change message it received, in order, and the position it would resume from."""

    key: str
    user: User
    position: str | None = None
    messages: list[Message] = field(default_factory=list)
    connections: int = 0
    resets: int = 0
    closes: list[tuple[int, str]] = field(default_factory=list)

    async def connect(self, url: str, *, receive_buffer: int = 0) -> RawClient:
        query = "" if self.position is None else f"?since={self.position}"
        raw = await RawClient.connect(url, self.key, receive_buffer=receive_buffer, query=query)
        self.connections += 1
        return raw

    async def read(self, raw: RawClient, until: Callable[[], bool] = lambda: False) -> int | None:
        """Read change messages until ``until()`` (then None), or until the connection ends:
        the server's close code (answered), or 1006 if the TCP connection just ended. Pings
        are answered."""
        parts: list[str] = []
        while True:
            for event in raw.protocol.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        self._take(json.loads("".join(parts)))
                        parts.clear()
                elif isinstance(event, Ping):
                    await raw.sock.send(raw.protocol.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.closes.append((event.code, event.reason or ""))
                    with suppress(Exception):
                        await raw.sock.send(raw.protocol.send(event.response()))
                    return event.code
            if until():
                return None
            try:
                data = await raw.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.closes.append((1006, ""))
                return 1006
            raw.protocol.receive_data(data)

    def _take(self, frame: Any) -> None:
        for message in frame if isinstance(frame, list) else [frame]:
            assert "jsonrpc" not in message, f"a response no request asked for: {message}"
            self.messages.append(message)
            self.position = message["position"]

    def seen(self, position: str) -> bool:
        return self.position is not None and self.position >= position


# --- what MongoDB committed, and what each user should see of it --------------------------------


@dataclass(frozen=True)
class Committed:
    """One committed change, as a change stream of the test's own read it."""

    position: str
    collection: str
    operation: str  # insert, update, replace, delete, ...
    id: Any
    before: dict[str, Any] | None
    after: dict[str, Any] | None


def read_committed(
    mongodb_url: str, db_name: str, after: str, until: str, timeout: float = 60
) -> list[Committed]:
    """Blocking: every change to vtrio's collections after position ``after`` up to position
    ``until``, with pre- and post-images, and positions counted as the README says (cluster
    time, then the ordinal among the changes of that cluster time)."""
    pipeline = [
        {
            "$match": {
                "$or": [
                    {"ns.coll": {"$in": list(WATCHED)}},
                    {"operationType": {"$in": ["dropDatabase", "invalidate"]}},
                ]
            }
        },
    ]
    found: list[Committed] = []
    deadline = time.monotonic() + timeout
    with (
        pymongo.MongoClient(mongodb_url) as client,
        client[db_name].watch(
            pipeline,
            start_at_operation_time=timestamp_of(after),
            full_document="whenAvailable",
            full_document_before_change="whenAvailable",
            max_await_time_ms=200,
        ) as stream,
    ):
        last: tuple[Timestamp | None, int] = (None, 0)
        while not found or found[-1].position < until:
            if time.monotonic() > deadline:
                raise AssertionError(f"MongoDB's stream did not reach {until} in {timeout} s")
            event = stream.try_next()
            if event is None:
                continue
            cluster_time = event["clusterTime"]
            ordinal = last[1] + 1 if cluster_time == last[0] else 1
            last = (cluster_time, ordinal)
            position = position_of(cluster_time, ordinal)
            if position <= after:
                continue
            found.append(
                Committed(
                    position,
                    event.get("ns", {}).get("coll", ""),
                    event["operationType"],
                    event.get("documentKey", {}).get("_id"),
                    event.get("fullDocumentBeforeChange"),
                    event.get("fullDocument"),
                )
            )
    return found


async def committed(mongodb_url: str, db_name: str, after: str, until: str) -> list[Committed]:
    return await trio.to_thread.run_sync(read_committed, mongodb_url, db_name, after, until)


def wire(document: dict[str, Any], fields: Sequence[str] | None = SAMPLE_FIELDS) -> Any:
    """A document as a change message carries it: projected, ``id`` for ``_id``, JSON."""
    wanted = None if fields is None else {"_id", *fields}
    kept = {k: v for k, v in document.items() if wanted is None or k in wanted}
    return json.loads(dumps(to_wire(kept)))


def sample_message(user: User, change: Committed) -> Message | None:
    """The message ``user`` should receive for a change to ``samples`` (None: none), by the
    README's rule: the change's own operation, or an insert / a delete for a user who gains /
    loses the right to read the sample."""
    kind = "update" if change.operation == "replace" else change.operation
    if kind == "insert":
        operation = "insert" if user.sees(change.after) else None
    elif kind == "delete":
        operation = "delete" if user.sees(change.before) else None
    elif kind == "update":
        sees = user.sees(change.after)
        if change.before is None:
            operation = "update" if sees else None
        else:
            saw = user.sees(change.before)
            operation = ("update" if saw else "insert") if sees else ("delete" if saw else None)
    else:
        return None
    if operation is None:
        return None
    assert operation == "delete" or change.after is not None, change
    data = [change.id] if operation == "delete" else wire(change.after or {})
    return {
        "interface": "samples",
        "operation": operation,
        "data": data,
        "position": change.position,
    }


def expected_for(user: User, changes: Iterable[Committed]) -> list[Message]:
    """The sample messages ``user`` should receive for ``changes``, in order."""
    messages = []
    for change in changes:
        if change.collection == "samples" and (message := sample_message(user, change)):
            messages.append(message)
    return messages


def summary(messages: Iterable[Message]) -> list[tuple[str, str, Any, Any]]:
    """(position, operation, id, host) of each message: what a failure should show."""
    rows = []
    for m in messages:
        data = m["data"]
        if isinstance(data, dict):
            rows.append((m["position"], m["operation"], data.get("id"), data.get("host")))
        else:
            rows.append((m["position"], m["operation"], data, None))
    return rows


def first_difference(got: Sequence[Message], want: Sequence[Message]) -> str:
    """Where two message sequences part, for an assertion message."""
    for index, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"message {index} of {len(got)} (want {len(want)}):\n got {a}\nwant {b}"
    return f"lengths differ: got {len(got)}, want {len(want)}; " + (
        f"extra: {summary(got[len(want) :][:5])}"
        if len(got) > len(want)
        else f"missing: {summary(want[len(got) :][:5])}"
    )


# --- a mongod of the test's own -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mongod:
    """A single-node replica set of the test's own on 127.0.0.1 (the embedded binary), which
    the test may kill and start again on the same port and data."""

    def __init__(self, db_path: Path, *, oplog_mb: int, extra: Sequence[str] = ()) -> None:
        self.db_path = db_path
        self.port = free_port()
        self.url = f"mongodb://127.0.0.1:{self.port}/?directConnection=true&replicaSet=rs0"
        self._args = [
            str(find_mongod()),
            "--dbpath",
            str(db_path),
            "--bind_ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--replSet",
            "rs0",
            "--oplogSize",
            str(oplog_mb),
            "--wiredTigerCacheSizeGB",
            "0.25",
            "--wiredTigerEngineConfigString",
            "log=(prealloc=false,file_max=16MB)",
            "--setParameter",
            "diagnosticDataCollectionEnabled=false",
            "--logpath",
            str(db_path / "mongod.log"),
            "--logappend",
            *extra,
        ]
        self.process: trio.Process | None = None

    async def start(self) -> None:
        self.db_path.mkdir(parents=True, exist_ok=True)
        self.process = await trio.lowlevel.open_process(
            self._args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await trio.to_thread.run_sync(self._until_primary)

    def _until_primary(self) -> None:
        direct = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"
        deadline = time.monotonic() + 60
        with pymongo.MongoClient(direct, serverSelectionTimeoutMS=500) as client:
            while True:
                assert self.process is not None
                if self.process.returncode is not None or time.monotonic() > deadline:
                    log = (self.db_path / "mongod.log").read_text()[-3000:]
                    raise AssertionError(f"mongod did not become primary:\n{log}")
                try:
                    hello = client.admin.command("hello")
                    if hello.get("isWritablePrimary"):
                        return
                    if "setName" not in hello:  # never initiated
                        member = {"_id": 0, "host": f"127.0.0.1:{self.port}"}
                        client.admin.command("replSetInitiate", {"_id": "rs0", "members": [member]})
                except pymongo.errors.OperationFailure as exc:
                    if exc.code != 23:  # AlreadyInitialized
                        raise
                except pymongo.errors.PyMongoError:
                    pass
                time.sleep(0.1)

    async def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would, and reap it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(20):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


@asynccontextmanager
async def own_mongod(
    base: Path, *, oplog_mb: int, extra: Sequence[str] = ()
) -> AsyncIterator[Mongod]:
    """A mongod of the test's own under ``base``; stopped at the end, and none left behind."""
    mongod = Mongod(base / "own-mongod", oplog_mb=oplog_mb, extra=extra)
    try:
        await mongod.start()
        yield mongod
    finally:
        with trio.CancelScope(shield=True):
            await mongod.stop()
        assert mongods_using(base) == [], "a mongod of the test's own is still running"


# --- processes and sockets ----------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Pids of ``pid``'s live child processes that are multiprocessing workers."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        worker = b"spawn_main" in cmdline and b"resource_tracker" not in cmdline
        if int(fields[1]) == pid and fields[0] != "Z" and worker:
            found.append(int(stat.parent.name))
    return found


def computing(pid: int) -> bool:
    """Whether the process is on a CPU now (state R)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, IndexError):
        return False


def local_tcp_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets the process ``pid`` holds open."""
    inodes = set()
    with suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                columns = line.split()
                if columns[9] in inodes:
                    ports.add(int(columns[1].rsplit(":", 1)[1], 16))
    return ports


def change_stream_cursors(mongodb_url: str, db_name: str) -> list[dict[str, Any]]:
    """Blocking: the change-stream cursors open on ``db_name`` (idle ones too), as $currentOp
    shows them, made by vtrio's change feeds (clients named FEED_NAME)."""
    with pymongo.MongoClient(mongodb_url) as client:
        operations = list(
            client.admin.aggregate([{"$currentOp": {"idleCursors": True, "allUsers": True}}])
        )
    found = []
    for operation in operations:
        cursor = operation.get("cursor") or {}
        command = cursor.get("originatingCommand") or {}
        pipeline = command.get("pipeline") or [{}]
        if "$changeStream" not in pipeline[0]:
            continue
        if command.get("$db") != db_name or operation.get("appName") != FEED_NAME:
            continue
        found.append(operation)
    return found

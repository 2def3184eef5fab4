"""The hub: every open connection, and the fan-out of changes to those allowed to see them.

The hub follows the change feed: :meth:`Hub.publish` takes each batch of committed changes, in
commit order, and offers each live connection the messages its user may see, without waiting:
a connection's socket takes them at once or its outbox keeps them (see
:mod:`vtrio.framework._connection`), so a slow or broken client holds up neither the feed nor
the other clients. The verdicts and the encoded frames are made once per user, however many
connections that user has open.

A connection that opens with ``?since=POSITION`` first catches up: it gets every change after
that position that its user may see, from the feed's memory or from MongoDB, paced by how fast
it reads, and then joins the live ones in the same step, so that there is no gap and no
duplicate at the seam. Until then, its requests' answers are held back, so that none overtakes
a change it caused. A position that cannot be served closes it with 4003 (reload).

One task pings every connection each heartbeat interval (a missed pong closes it with 4001).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from vtrio.framework._changes import Change, CollectionSpec
from vtrio.framework._connection import Connection, Delivery
from vtrio.framework._feed import REPLAY_BATCH, ChangeFeed, HistoryLost, Position
from vtrio.framework._metrics import Metrics
from vtrio.framework._services import Stopping
from vtrio.framework._wire import CloseCode

__all__ = ["Hub"]

log = logging.getLogger(__name__)

SHUTDOWN_REASON = "server shutting down"
FAILURE_REASON = "server failure: see the server's log"
RELOAD_REASON = "reload: the changes since your position cannot be had"
POSITION_WAIT = 5.0
"""How long a connection may wait for this instance's feed to reach the position it resumes
from (another instance's feed may have been a little ahead)."""
REPLAYS_AT_ONCE = 4
"""Catch-ups reading from MongoDB at once (each holds a change stream open)."""


class Hub:
    """Knows every open connection; turns committed changes into messages for them.

    ``specs`` says, per collection, who sees its changes; a collection without a spec reaches
    every connection, a silent one none. :meth:`publish` may be called before :meth:`running`
    starts or after it ends: with no connection, a change reaches no one.
    """

    def __init__(
        self,
        specs: Mapping[str, CollectionSpec],
        *,
        heartbeat_interval: float = 20.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._specs = dict(specs)
        self._default = CollectionSpec()
        self._connections: set[Connection] = set()  # every open one
        self._live: set[Connection] = set()  # those caught up: they get what is published
        self._feed: ChangeFeed | None = None
        self._replays = trio.CapacityLimiter(REPLAYS_AT_ONCE)
        self.nursery: trio.Nursery | None = None
        self._stopping: Stopping | None = None
        self._metrics = metrics
        """Where every connection is served, while :meth:`running`."""
        self._heartbeat_interval = heartbeat_interval
        self._left = trio.lowlevel.ParkingLot()
        self._closing_with: tuple[int, str] | None = None

    @property
    def connections(self) -> frozenset[Connection]:
        return frozenset(self._connections)

    @property
    def closing(self) -> bool:
        """Every connection is being closed, and new ones are turned away."""
        return self._closing_with is not None

    def publish(self, changes: Sequence[Change]) -> None:
        """Offer ``changes`` (in commit order) to every connection allowed to see them.

        Never waits and never raises for one connection's sake: a rule that fails is logged
        and that connection gets nothing of this batch.
        """
        deliveries: dict[Any, Delivery | None] = {}
        delivered = 0
        for connection in self._live:
            identity = connection.identity
            if identity not in deliveries:
                deliveries[identity] = self._delivery_for(identity, changes)
            delivery = deliveries[identity]
            if delivery is not None:
                connection.deliver(delivery)
                delivered += len(delivery.payloads)
        if self._metrics is not None:
            self._metrics.messages_delivered.inc(delivered)

    def _delivery_for(self, identity: Any, changes: Sequence[Change]) -> Delivery | None:
        payloads = []
        position = ""
        try:
            for change in changes:
                spec = self._specs.get(change.collection, self._default)
                if spec.silent:
                    continue
                payload = change.message_for(identity, spec)
                if payload is not None:
                    payloads.append(payload)
                    position = change.position
        except Exception:
            log.exception("judging changes for %r failed", identity)
            return None
        return Delivery(payloads, position) if payloads else None

    def close_matching(self, matches: Callable[[Any], bool], code: int, reason: str) -> int:
        """Close every connection whose identity ``matches``; return how many."""
        closing = [c for c in self._connections if matches(c.identity)]
        for connection in closing:
            connection.close(code, reason)
        return len(closing)

    def close_all(self, code: int, reason: str) -> None:
        """Close every connection with ``code``, and any that opens from now on."""
        self._closing_with = (code, reason)
        for connection in self._connections:
            connection.close(code, reason)

    def _farewell(self) -> tuple[int, str]:
        """How a connection cancelled with the tree closes: going away after a stop request,
        failing otherwise (a service died)."""
        if self._stopping is None or self._stopping.requested:
            return CloseCode.GOING_AWAY, SHUTDOWN_REASON
        return CloseCode.INTERNAL_ERROR, FAILURE_REASON

    def reset(self) -> None:
        """The feed skipped ahead: nobody has every change any more. Every client reloads."""
        for connection in self._connections:
            connection.close(CloseCode.HISTORY_LOST, RELOAD_REASON)

    async def serve(self, connection: Connection, since: str | None = None) -> None:
        """Serve ``connection`` to its end, as one of the hub's (see Connection.serve); from
        ``since`` (a position), after catching up, or live from now."""
        self._connections.add(connection)
        if self._closing_with is not None:
            connection.close(*self._closing_with)
        try:
            if since is None:
                self._go_live(connection, [])
                await connection.serve(farewell=self._farewell)
            else:
                first = partial(self._resume, connection, since)
                await connection.serve(first, farewell=self._farewell)
        finally:
            self._connections.discard(connection)
            self._live.discard(connection)
            self._left.unpark_all()
            if self._metrics is not None:
                self._metrics.connections_closed.labels(str(connection.close_code)).inc()

    @property
    def outbox_depth(self) -> int:
        """Messages waiting in the outboxes of every connection."""
        return sum(connection.waiting for connection in self._connections)

    async def _resume(self, connection: Connection, since: str) -> None:
        try:
            await self._catch_up(connection, Position.parse(since))
        except (ValueError, HistoryLost) as exc:
            log.info("%r cannot resume from %r: %s", connection, since[:40], exc)
            connection.close(CloseCode.HISTORY_LOST, RELOAD_REASON)

    async def _catch_up(self, connection: Connection, cursor: Position) -> None:
        """Send what ``connection`` missed after ``cursor``, then make it live (module doc).

        Raises HistoryLost when the changes after ``cursor`` cannot be had.
        """
        feed = self._feed
        if feed is None:
            raise HistoryLost("this server keeps no change history")
        while True:
            with trio.move_on_after(POSITION_WAIT):
                await feed.wait_for(cursor)
            if feed.position < cursor:
                raise HistoryLost("no change has that position")
            changes = feed.history_after(cursor, REPLAY_BATCH)
            if changes is None and await feed.reach_back(cursor):
                changes = feed.history_after(cursor, REPLAY_BATCH)
            if changes is not None and len(changes) < REPLAY_BATCH:
                self._go_live(connection, changes)  # the tail and the live ones: no seam
                return
            if changes is None:
                async with self._replays:
                    changes = await feed.read_history(cursor, REPLAY_BATCH)
                if not changes:
                    raise HistoryLost("MongoDB holds no change after that position")
            self._send(connection, changes)
            cursor = Position.parse(changes[-1].position)
            await connection.wait_sent()  # paced by the client: its outbox stays short

    def _go_live(self, connection: Connection, tail: Sequence[Change]) -> None:
        self._send(connection, tail)
        if not tail and self._feed is not None:
            connection.position = str(self._feed.position)
        self._live.add(connection)
        connection.caught_up()

    def _send(self, connection: Connection, changes: Sequence[Change]) -> None:
        delivery = self._delivery_for(connection.identity, changes)
        if delivery is not None:
            connection.deliver(delivery)
        if changes:
            connection.position = changes[-1].position

    async def wait_all_gone(self) -> None:
        """Return once no connection is open (those closing have finished)."""
        while self._connections:
            await self._left.park()

    @asynccontextmanager
    async def running(
        self, stopping: Stopping, feed: ChangeFeed | None = None
    ) -> AsyncIterator[trio.Nursery]:
        """Follow ``feed`` and run the heartbeat; yield the nursery every connection must be
        served in.

        Resource handling: when ``stopping`` is set, every connection is told at once (1001)
        and no new one is admitted. On exit every connection is closed (1001 after a stop
        request, 1011 if the tree is coming down because something failed) and given until
        ``stopping.deadline`` to finish its close handshake; what is left then is cancelled.
        """
        unsubscribe = feed.subscribe(self.publish, self.reset) if feed else (lambda: None)
        self._feed, self._stopping = feed, stopping
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._heartbeat_forever)
            nursery.start_soon(self._close_all_when, stopping)
            try:
                yield nursery
            finally:
                stopping.coming_down()  # a failure's teardown is bounded too
                if stopping.requested:
                    self.close_all(CloseCode.GOING_AWAY, SHUTDOWN_REASON)
                else:
                    self.close_all(CloseCode.INTERNAL_ERROR, FAILURE_REASON)
                with stopping.shielded():
                    await self.wait_all_gone()
                nursery.cancel_scope.cancel()
                unsubscribe()

    async def _close_all_when(self, stopping: Stopping) -> None:
        await stopping.wait()
        self.close_all(CloseCode.GOING_AWAY, SHUTDOWN_REASON)

    async def _heartbeat_forever(self) -> None:
        while True:
            await trio.sleep(self._heartbeat_interval)
            for connection in list(self._connections):
                connection.heartbeat()


@asynccontextmanager
async def open_hub(
    specs: Mapping[str, CollectionSpec],
    stopping: Stopping,
    feed: ChangeFeed | None,
    *,
    heartbeat_interval: float = 20.0,
    metrics: Metrics | None = None,
) -> AsyncIterator[Hub]:
    """The hub as a service: following ``feed``, for the block (see :meth:`Hub.running`)."""
    hub = Hub(specs, heartbeat_interval=heartbeat_interval, metrics=metrics)
    async with hub.running(stopping, feed):
        yield hub

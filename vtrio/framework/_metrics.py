"""The server's metrics, for Prometheus (``GET /metrics``), through ``prometheus-client``.

Counters and histograms are updated where things happen, once per batch on hot paths (a change
fanned out to 1,000 clients is one increment by 1,000, not 1,000 increments); gauges are read
at scrape time from the services that know them (:meth:`Metrics.gauge`), so that nothing is
kept twice. Each server has a registry of its own: several in one process (tests) do not mix.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1000)

Reading = Callable[[], float | Mapping[str, float]]
"""A gauge's value at scrape time: a number, or numbers by the label's value."""


class Metrics:
    """The metrics of one server: counters the framework updates, gauges it reads on demand."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections_closed = Counter(
            "vtrio_connections_closed_total", "Websocket connections closed, by close code",
            ["code"], registry=self.registry,
        )  # fmt: skip
        self.changes = Counter(
            "vtrio_changes_total", "Committed changes read from MongoDB's change stream",
            registry=self.registry,
        )  # fmt: skip
        self.messages_delivered = Counter(
            "vtrio_messages_delivered_total", "Change messages handed to client connections",
            registry=self.registry,
        )  # fmt: skip
        self.rpc_calls = Counter(
            "vtrio_rpc_calls_total", "JSON-RPC calls answered, by method and outcome",
            ["method", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.rpc_seconds = Histogram(
            "vtrio_rpc_duration_seconds", "Time to answer a JSON-RPC call, by method",
            ["method"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.mongodb_seconds = Histogram(
            "vtrio_mongodb_operation_duration_seconds",
            "Time of a MongoDB operation, queueing for a worker thread included, by kind",
            ["operation"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.mongodb_queue_seconds = Histogram(
            "vtrio_mongodb_queue_seconds",
            "Time a MongoDB job waited for a worker thread (high: the threads are saturated)",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.mongodb_job_seconds = Histogram(
            "vtrio_mongodb_job_seconds",
            "Time a worker thread spent on one job: a MongoDB call, or a coalesced batch",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.mongodb_job_calls = Histogram(
            "vtrio_mongodb_job_calls", "Calls one worker-thread job served (coalescing)",
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.write_fence_seconds = Histogram(
            "vtrio_write_fence_seconds",
            "Time a write waited, once applied, for the change stream to read and dispatch it",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.mongodb_errors = Counter(
            "vtrio_mongodb_errors_total", "MongoDB operations that failed, by kind",
            ["operation"], registry=self.registry,
        )  # fmt: skip
        self._gauges = _Gauges()
        self.registry.register(self._gauges)
        self._refreshers: list[Callable[[], Awaitable[None]]] = []

    def observe_job(self, queued: float, ran: float, calls: int) -> None:
        """One worker-thread job: seconds queued and running, calls served (any thread)."""
        self.mongodb_queue_seconds.observe(queued)
        self.mongodb_job_seconds.observe(ran)
        self.mongodb_job_calls.observe(calls)

    def gauge(self, name: str, documentation: str, read: Reading, label: str = "") -> None:
        """Report ``read()`` as the gauge ``name`` at every scrape (by ``label`` if given)."""
        self._gauges.add(name, documentation, read, label)

    def refresh_before_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Await ``refresh()`` before each scrape (for a gauge read from MongoDB, say)."""
        self._refreshers.append(refresh)

    async def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        for refresh in self._refreshers:
            await refresh()
        return generate_latest(self.registry)


class _Gauges(Collector):
    """Gauges whose values are read from the services at scrape time."""

    def __init__(self) -> None:
        self._gauges: list[tuple[str, str, Reading, str]] = []

    def add(self, name: str, documentation: str, read: Reading, label: str) -> None:
        self._gauges.append((name, documentation, read, label))

    def describe(self) -> Iterable[Metric]:
        return []  # collected fresh each scrape; nothing to check up front

    def collect(self) -> Iterable[Metric]:
        for name, documentation, read, label in self._gauges:
            value = read()
            if isinstance(value, Mapping):
                family = GaugeMetricFamily(name, documentation, labels=[label])
                for key, number in value.items():
                    family.add_metric([str(key)], number)
            else:
                family = GaugeMetricFamily(name, documentation, value=value)
            yield family

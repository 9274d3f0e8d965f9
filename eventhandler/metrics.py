"""Every Prometheus metric of the project, declared in one place against an injected registry."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from eventhandler import __version__
from eventhandler.models import STAGES, STATUSES, DepthSnapshot

_BATCH_SIZE_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


# Gauges every process reads from the same table: the latest reading of a live process counts.
_LATEST: Literal["livemostrecent"] = "livemostrecent"

LagReader = Callable[[], dict[tuple[str, int], int]]


class _LagCollector(Collector):
    """`eventhandler_consumer_lag_messages`, read at scrape time from the worker's positions, so a
    partition revoked from this worker stops being reported here the moment it moves."""

    def __init__(self) -> None:
        self.read: LagReader = dict

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for (topic, partition), lag in sorted(self.read().items()):
            family.add_metric([topic, str(partition)], lag)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "eventhandler_consumer_lag_messages",
            "Messages of an assigned partition not yet processed: its high watermark minus the "
            "position stored in PostgreSQL.",
            labels=["topic", "partition"],
        )


class Metrics:
    """Metrics of the worker, the replayer and the admin API. Nothing is global: tests and
    benchmarks pass their own registry.

    `multiprocess`: a worker process under the supervisor (`eventhandler run --processes N`), whose
    values prometheus-client keeps in files that the supervisor adds up (PROMETHEUS_MULTIPROC_DIR is
    set for it). Each gauge says how its children combine: a count of partitions adds up, the DLQ
    depth every child reads from the same table is the latest reading, and a process that exited
    drops out. The lag, read at scrape time in one process, is copied into a gauge instead
    (`publish_lag`), since the supervisor cannot call into its children."""

    def __init__(self, registry: CollectorRegistry | None = None, *, multiprocess: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess
        r = self.registry
        self.messages_consumed = Counter(
            "eventhandler_messages_consumed", "Kafka messages consumed.", ["topic"], registry=r
        )
        self.events_processed = Counter(
            "eventhandler_events_processed",
            "Events whose projection writes were committed.",
            ["event_type"],
            registry=r,
        )
        self.events_failed = Counter(
            "eventhandler_events_failed",
            "Messages that failed and went to the DLQ, by failure stage.",
            ["stage"],
            registry=r,
        )
        self.events_duplicate = Counter(
            "eventhandler_events_duplicate", "Events skipped because their id was applied before.", registry=r
        )
        self.events_skipped = Counter(
            "eventhandler_events_skipped", "Events of unknown type skipped by policy.", registry=r
        )
        self.events_parked = Counter(
            "eventhandler_events_parked",
            "Events parked behind an open failure of their key (EVENTHANDLER_PARKING).",
            registry=r,
        )
        self.events_released = Counter(
            "eventhandler_events_released",
            "Parked events that took effect when their key was released.",
            registry=r,
        )
        self.dlq_depth = Gauge(
            "eventhandler_dlq_depth",
            "Rows in the dead letter queue.",
            ["consumer", "status"],
            registry=r,
            multiprocess_mode=_LATEST,
        )
        self.dlq_oldest_pending_age = Gauge(
            "eventhandler_dlq_oldest_pending_age_seconds",
            "Age of the oldest pending DLQ row.",
            ["consumer"],
            registry=r,
            multiprocess_mode=_LATEST,
        )
        self.dlq_oldest_replayed_age = Gauge(
            "eventhandler_dlq_oldest_replayed_age_seconds",
            "Seconds since the oldest row still `replayed` was republished (its outcome has not come back).",
            ["consumer"],
            registry=r,
            multiprocess_mode=_LATEST,
        )
        self.dlq_oldest_parked_age = Gauge(
            "eventhandler_dlq_oldest_parked_age_seconds",
            "How long the oldest parked row (waiting behind an open failure of its key) has waited.",
            ["consumer"],
            registry=r,
            multiprocess_mode=_LATEST,
        )
        self.dlq_write_errors = Counter(
            "eventhandler_dlq_write_errors",
            "Batches whose DLQ rows could not be written (retried).",
            registry=r,
        )
        self.dlq_resolved_by_replay = Counter(
            "eventhandler_dlq_resolved_by_replay",
            "DLQ rows resolved because their replay succeeded.",
            registry=r,
        )
        self.replay_published = Counter(
            "eventhandler_replay_published", "DLQ rows republished to Kafka.", registry=r
        )
        self.replay_failed = Counter(
            "eventhandler_replay_failed",
            "DLQ rows whose republish was not confirmed by the broker.",
            registry=r,
        )
        self.batch_size = Histogram(
            "eventhandler_batch_size_messages",
            "Messages per consumed batch.",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "eventhandler_batch_duration_seconds",
            "Time to process and commit one batch.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.projection_write_duration = Histogram(
            "eventhandler_projection_write_duration_seconds",
            "Time of the batch's PostgreSQL transaction (projections, DLQ, positions).",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.transient_retries = Counter(
            "eventhandler_transient_retries",
            "Retries of a batch after a transient failure.",
            ["reason"],
            registry=r,
        )
        self.paused_partitions = Gauge(
            "eventhandler_paused_partitions",
            "Assigned partitions paused while a failure is retried.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.assigned_partitions = Gauge(
            "eventhandler_assigned_partitions",
            "Partitions assigned to this worker (to all its processes).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rebalances = Counter(
            "eventhandler_rebalances", "Consumer group rebalances seen, by kind.", ["kind"], registry=r
        )
        self.circuit_open = Gauge(
            "eventhandler_circuit_open",
            "1 while the flood guard holds the line for a systemic failure (a fingerprint), else 0.",
            ["consumer", "fingerprint"],
            registry=r,
            multiprocess_mode=_LATEST,
        )
        # The fingerprint a label shows: keyed while redacting, as every view shows it (`app` sets it).
        self.shown_fingerprint: Callable[[str], str] = str
        self.consumer_lag = _LagCollector()
        if multiprocess:
            # livemax: a partition a process gave up reads 0 there (from its next report) and its lag at
            # its new owner; a sum would count it twice for that second
            self._lag_gauge = Gauge(
                "eventhandler_consumer_lag_messages",
                _LagCollector._family().documentation,
                ["topic", "partition"],
                registry=r,
                multiprocess_mode="livemax",
            )
            self._lag_published: set[tuple[str, int]] = set()
        else:
            r.register(self.consumer_lag)
        # A process's own readiness (the supervisor answers the container's); live: gone with the process
        self.ready = Gauge(
            "eventhandler_ready",
            "1 when the worker can make progress.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.build_info = Info("eventhandler_build", "Build information.", registry=r)
        self.build_info.info({"version": __version__})

        # Children for the fixed label values, created once, outside the hot loop.
        self.failed_by_stage = {stage: self.events_failed.labels(stage=stage) for stage in STAGES}
        self._consumed_by_topic: dict[str, Counter] = {}
        self._processed_by_type: dict[str, Counter] = {}
        for stage in STAGES:
            self.failed_by_stage[stage].inc(0)

    def consumed(self, topic: str) -> Counter:
        child = self._consumed_by_topic.get(topic)
        if child is None:
            child = self._consumed_by_topic[topic] = self.messages_consumed.labels(topic=topic)
        return child

    def processed(self, event_type: str) -> Counter:
        child = self._processed_by_type.get(event_type)
        if child is None:
            child = self._processed_by_type[event_type] = self.events_processed.labels(event_type=event_type)
        return child

    def publish_lag(self) -> None:
        """Multiprocess mode: copy the current lag into the shared gauge; a partition no longer
        assigned here reads 0 (a multiprocess series cannot be removed)."""
        if not self.multiprocess:
            return
        lags = self.consumer_lag.read()
        for topic, partition in self._lag_published - lags.keys():
            self._lag_gauge.labels(topic=topic, partition=str(partition)).set(0)
        for (topic, partition), lag in lags.items():
            self._lag_gauge.labels(topic=topic, partition=str(partition)).set(lag)
        self._lag_published = set(lags)

    def set_dlq_depth(self, consumers: list[str], snapshot: DepthSnapshot) -> None:
        """Publish a fresh depth snapshot; statuses with no rows read 0, not stale values."""
        counts = {(row.consumer, row.status): row.count for row in snapshot.rows}
        for consumer in {*consumers, *(c for c, _ in counts)}:
            for status in STATUSES:
                self.dlq_depth.labels(consumer=consumer, status=status).set(counts.get((consumer, status), 0))
            self.dlq_oldest_pending_age.labels(consumer=consumer).set(
                snapshot.oldest_pending.get(consumer, 0.0)
            )
            self.dlq_oldest_replayed_age.labels(consumer=consumer).set(
                snapshot.oldest_replayed.get(consumer, 0.0)
            )
            self.dlq_oldest_parked_age.labels(consumer=consumer).set(
                snapshot.oldest_parked.get(consumer, 0.0)
            )
        # Circuits are shared through PostgreSQL: every worker shows what the table says, so one
        # closed by an operator or by another worker's trial reads 0 here too.
        for consumer, fingerprint, is_open in snapshot.circuits:
            if consumer in consumers or not consumers:
                self.set_circuit(consumer, fingerprint, is_open)

    def set_circuit(self, consumer: str, fingerprint: str, is_open: bool) -> None:
        """`fingerprint` as stored; the label shows it as views do."""
        shown = self.shown_fingerprint(fingerprint)
        self.circuit_open.labels(consumer=consumer, fingerprint=shown).set(1 if is_open else 0)


class _Children(Collector):
    """Every worker process's metrics from prometheus-client's multiprocess files, added up as each
    metric's mode says, without the families the supervisor answers itself.

    A process that exited leaves its counters and histograms behind (their totals must not drop); they
    are folded into one archive file per kind (`fold`), so a worker restarted thousands of times
    costs one file, not thousands read at every scrape. A scrape and a fold never run at once: a
    scrape in between would count the folded values twice, or not at all, and a counter that drops
    reads as a reset."""

    def __init__(self, path: Path, own: frozenset[str]) -> None:
        self._path = path
        self._inner = MultiProcessCollector(None, path=str(path))  # type: ignore[no-untyped-call]
        self._own = own
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families = list(self._inner.collect())  # type: ignore[no-untyped-call]
        return (family for family in families if family.name not in self._own)

    def fold(self, pid: int) -> None:
        """Forget an exited process: drop its live gauges, move its counts into the archive."""
        with self._lock:
            multiprocess.mark_process_dead(pid, str(self._path))  # type: ignore[no-untyped-call]
            for kind in ("counter", "histogram"):
                dead = self._path / f"{kind}_{pid}.db"
                if not dead.exists():
                    continue
                archive = MmapedDict(str(self._path / f"{kind}_archive.db"))  # type: ignore[no-untyped-call]
                try:
                    for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(dead)):  # type: ignore[no-untyped-call]
                        total, _ = archive.read_value(key)  # type: ignore[no-untyped-call]
                        archive.write_value(key, total + value, timestamp)  # type: ignore[no-untyped-call]
                finally:
                    archive.close()  # type: ignore[no-untyped-call]
                dead.unlink()


class SupervisorMetrics:
    """The container's `/metrics` under `eventhandler run --processes N`: the children's metrics added
    up, readiness over every child, the version, and the supervisor's own counts."""

    def __init__(
        self, children: Path, ready: Callable[[], tuple[bool, Any]], running: Callable[[], int]
    ) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.children = _Children(children, frozenset({"eventhandler_ready"}))
        r.register(self.children)
        Gauge(
            "eventhandler_ready", "1 when every worker process can make progress.", registry=r
        ).set_function(lambda: 1.0 if ready()[0] else 0.0)
        Info("eventhandler_build", "Build information.", registry=r).info({"version": __version__})
        Gauge(
            "eventhandler_worker_processes", "Worker processes running (EVENTHANDLER_PROCESSES).", registry=r
        ).set_function(lambda: float(running()))
        self.restarts = Counter(
            "eventhandler_worker_process_restarts", "Worker processes restarted after they died.", registry=r
        )

"""The composition root: every running part of eventhandler is built here from `Settings`, once.

`build_worker` wires the worker (`eventhandler run`, the demo, tests and benchmarks); `build_service`
wires the operators' side (`eventhandler dlq`, `replay`, the admin API, the demo). Nothing else
constructs pools, clients or repositories.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg_pool

from eventhandler.circuits import PostgresCircuitStore
from eventhandler.config import Settings
from eventhandler.db import create_pool
from eventhandler.dlq.operators import PostgresOperatorStore
from eventhandler.dlq.parking import PostgresParkingStore
from eventhandler.dlq.replays import PostgresReplayRows
from eventhandler.dlq.writer import PostgresDLQWriter
from eventhandler.errors import ConfigError
from eventhandler.flood import FloodGuard, Thresholds
from eventhandler.handlers import Registry
from eventhandler.handlers.loading import load_registry
from eventhandler.health import DepthRefresher, HealthServer
from eventhandler.inflight import InFlight, Transaction
from eventhandler.ledger import Ledger, LedgerPruner, StoredPositions
from eventhandler.metrics import Metrics
from eventhandler.observer import BatchHealth, BatchLog, MetricsObserver, Observer, Observers, WorkerStats
from eventhandler.parking import RELEASE_EVERY_SECONDS, Parking, ParkingStep
from eventhandler.pipeline import BatchProcessor
from eventhandler.policy import Backoff, FailurePolicy
from eventhandler.redaction import Redactor
from eventhandler.replay import Replayer
from eventhandler.service import DLQService
from eventhandler.simulate import Simulator
from eventhandler.source import KafkaSource
from eventhandler.worker import Worker, default_worker_id

# Collect the youngest generation every 20,000 new container objects instead of CPython's 700: a
# batch allocates tens of thousands (records, events, models) that die with the batch by reference
# counting, and the default makes the collector walk each batch several times (benchmarks/README.md
# has the measurement). Memory stays bounded: a generation is still collected.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """Process-wide: move everything alive after start-up (modules, models, compiled validators) out
    of the collector's sight, and collect young objects less often (see `GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass
class App:
    """Everything `build_worker` wired, so the caller can start and stop it as one."""

    worker: Worker
    pool: psycopg_pool.ConnectionPool
    metrics: Metrics
    observers: Observers  # `observers.add(...)` to watch every batch (tests, benchmarks)
    health: HealthServer | None
    refresher: DepthRefresher
    pruner: LedgerPruner

    def run(self, stop_when_idle: float | None = None) -> WorkerStats:
        tune_gc()
        if self.health is not None:
            self.health.start()
        self.refresher.start()
        self.pruner.start()
        try:
            return self.worker.run(stop_when_idle=stop_when_idle)
        finally:
            self.pruner.stop()
            self.refresher.stop()
            if self.health is not None:
                self.health.stop()
            self.pool.close()


def build_worker(
    settings: Settings,
    *,
    registry: Registry | None = None,
    metrics: Metrics | None = None,
    policy: FailurePolicy | None = None,
    observers: Sequence[Observer] = (),
    serve_http: bool = True,
) -> App:
    """The worker: pool, consumer, repositories, metrics and handlers, wired once."""
    metrics = metrics or Metrics()
    policy = policy or FailurePolicy(
        Backoff(settings.retry_initial_seconds, settings.retry_max_seconds),
        skip_unknown=settings.unknown_event_policy == "skip",
    )
    registry = registry or load_registry(settings.handlers)
    worker_id = settings.worker_id or default_worker_id()
    # Opened once the metrics port is bound: a port in use is a bad setting told in one line, before
    # the pool starts connecting (and, with PostgreSQL down too, logging about it).
    pool = create_pool(settings, min_size=1, open_now=False)
    ledger = Ledger(settings.consumer_group)
    parking = None
    if settings.parking:
        rules = Parking(settings.consumer_group, settings.parking_keys())
        parking = ParkingStep(rules, PostgresParkingStore())
    guard = None
    if settings.flood_guard:
        thresholds = Thresholds(
            window=settings.flood_window_seconds,
            min_failures=settings.flood_min_failures,
            min_keys=settings.flood_min_keys,
            ratio=settings.flood_ratio,
            probe_seconds=settings.flood_probe_seconds,
        )
        guard = FloodGuard(settings.consumer_group, worker_id, PostgresCircuitStore(), thresholds)
    processor = BatchProcessor(
        consumer_group=settings.consumer_group,
        registry=registry,
        ledger=ledger,
        dlq=PostgresDLQWriter(),
        policy=policy,
        parking=parking,
        guard=guard,
    )
    positions = StoredPositions(pool, ledger, timeout=settings.db_connect_timeout_seconds)
    source = KafkaSource(
        settings.consumer_config() | {"client.id": f"eventhandler-{worker_id}"},
        settings.topics,
        load_positions=positions.load,
        metrics=metrics,
    )
    refresher = DepthRefresher(
        PostgresOperatorStore(pool),
        metrics,
        [settings.consumer_group],
        settings.dlq_refresh_seconds,
        timeout=settings.db_connect_timeout_seconds + settings.db_statement_timeout_seconds,
    )
    stats, health_of_batches = WorkerStats(), BatchHealth()
    redactor = Redactor(settings.api_redact_fields, secret=settings.dsn)  # logs show what views show
    metrics.shown_fingerprint = redactor.fingerprint
    watchers = Observers(
        [
            stats,
            MetricsObserver(metrics, settings.consumer_group),
            BatchLog(redactor),
            health_of_batches,
            *observers,
        ]
    )
    transaction = Transaction(
        pool,
        processor,
        metrics,
        statement_timeout=settings.db_statement_timeout_seconds,
        connect_timeout=settings.db_connect_timeout_seconds,
    )
    worker = Worker(
        source=source,
        processor=processor,
        inflight=InFlight(transaction, source, policy, watchers),
        stats=stats,
        health=health_of_batches,
        batch_max_messages=settings.batch_max_messages,
        batch_max_wait_seconds=settings.batch_max_wait_seconds,
        labels={"consumer_group": settings.consumer_group, "worker_id": worker_id},
        refresher=refresher,
        release_every=RELEASE_EVERY_SECONDS if parking is not None else None,
    )
    metrics.consumer_lag.read = source.current_lags
    metrics.ready.set_function(worker.ready_value)
    health = None
    if serve_http and settings.metrics_port:
        try:
            health = HealthServer("0.0.0.0", settings.metrics_port, metrics.registry, worker.is_ready)  # noqa: S104 - scraped from outside the container
        except OSError as exc:
            raise ConfigError(
                "EVENTHANDLER_METRICS_PORT",
                f"cannot serve metrics on port {settings.metrics_port}: {exc.strerror}",
            ) from None
    pool.open(wait=False)
    pruner = LedgerPruner(pool, ledger, settings.ledger_retention_hours * 3600)
    return App(
        worker=worker,
        pool=pool,
        metrics=metrics,
        observers=watchers,
        health=health,
        refresher=refresher,
        pruner=pruner,
    )


def build_service(
    settings: Settings, *, metrics: Metrics | None = None
) -> tuple[DLQService, psycopg_pool.ConnectionPool]:
    """The operators' side (CLI, API, demo): the DLQ service on its own pool, which the caller closes."""
    pool = create_pool(settings, min_size=1, name="eventhandler-admin")
    repository = PostgresOperatorStore(pool)
    redactor = Redactor(settings.api_redact_fields, secret=settings.dsn)
    if metrics is not None:  # the API's /metrics shows circuits as every view does
        metrics.shown_fingerprint = redactor.fingerprint
    replayer = Replayer(PostgresReplayRows(pool), settings.producer_config(), metrics=metrics)
    simulator = Simulator(
        pool,
        lambda: load_registry(settings.handlers),
        handlers=settings.handlers,
        skip_unknown=settings.unknown_event_policy == "skip",
        redactor=redactor,
    )
    service = DLQService(
        repository,
        replayer,
        redactor=redactor,
        circuits=PostgresCircuitStore(pool),
        simulator=simulator,
    )
    return service, pool

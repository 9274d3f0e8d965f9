"""The composition root: every running part of eventhandler is built here from `Settings`, once.

`build_worker` wires the worker (`eventhandler run`, the demo, tests and benchmarks); `build_service`
wires the operators' side (`eventhandler dlq`, `replay`, the admin API, the demo). Nothing else
constructs pools, clients or repositories.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg_pool

from eventhandler.config import Settings
from eventhandler.consumer import KafkaSource
from eventhandler.db import create_pool
from eventhandler.dlq import PostgresDLQRepository
from eventhandler.handlers import Registry
from eventhandler.handlers.loading import load_registry
from eventhandler.health import DepthRefresher, HealthServer
from eventhandler.ledger import Ledger, LedgerPruner, StoredPositions
from eventhandler.metrics import Metrics
from eventhandler.pipeline import BatchProcessor
from eventhandler.redaction import Redactor
from eventhandler.replay import Replayer
from eventhandler.service import DLQService
from eventhandler.worker import Worker, WorkerStats, default_worker_id, tune_gc


@dataclass
class App:
    """Everything `build_worker` wired, so the caller can start and stop it as one."""

    worker: Worker
    pool: psycopg_pool.ConnectionPool
    metrics: Metrics
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
    serve_http: bool = True,
) -> App:
    """The worker: pool, consumer, repositories, metrics and handlers, wired once."""
    metrics = metrics or Metrics()
    registry = registry or load_registry(settings.handlers)
    worker_id = settings.worker_id or default_worker_id()
    pool = create_pool(settings, min_size=1)
    dlq = PostgresDLQRepository(pool)
    ledger = Ledger(settings.consumer_group)

    processor = BatchProcessor(
        consumer=settings.consumer_group,
        registry=registry,
        ledger=ledger,
        dlq=dlq,
        unknown_event_policy=settings.unknown_event_policy,
    )
    positions = StoredPositions(pool, ledger, timeout=settings.db_connect_timeout_seconds)
    source = KafkaSource(
        settings.consumer_config() | {"client.id": f"eventhandler-{worker_id}"},
        settings.topics,
        load_positions=positions.load,
        metrics=metrics,
    )
    refresher = DepthRefresher(
        dlq,
        metrics,
        [settings.consumer_group],
        settings.dlq_refresh_seconds,
        timeout=settings.db_connect_timeout_seconds + settings.db_statement_timeout_seconds,
    )
    worker = Worker(
        settings=settings,
        pool=pool,
        source=source,
        processor=processor,
        metrics=metrics,
        refresher=refresher,
        worker_id=worker_id,
    )
    metrics.consumer_lag.read = source.current_lags
    metrics.ready.set_function(worker.ready_value)
    health = None
    if serve_http and settings.metrics_port:
        health = HealthServer("0.0.0.0", settings.metrics_port, metrics, worker.is_ready)  # noqa: S104 - scraped from outside the container
    pruner = LedgerPruner(pool, ledger, settings.ledger_retention_hours * 3600)
    return App(worker=worker, pool=pool, metrics=metrics, health=health, refresher=refresher, pruner=pruner)


def build_service(
    settings: Settings, *, metrics: Metrics | None = None
) -> tuple[DLQService, psycopg_pool.ConnectionPool]:
    """The operators' side (CLI, API, demo): the DLQ service on its own pool, which the caller closes."""
    pool = create_pool(settings, min_size=1, name="eventhandler-admin")
    repository = PostgresDLQRepository(pool)
    replayer = Replayer(repository, settings.producer_config(), metrics=metrics)
    service = DLQService(
        repository,
        replayer,
        redactor=Redactor(settings.api_redact_fields, secret=settings.dsn),
    )
    return service, pool

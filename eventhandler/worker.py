"""The worker loop and its composition root.

while running:
    records = consume a batch
    batch   = decode(records)                 # bytes → events, bad input → rejected
    commit(batch)                             # one PostgreSQL transaction, retried if transient
    tell Kafka the new offsets                # for lag tools; PostgreSQL already has them
"""

from __future__ import annotations

import functools
import gc
import math
import os
import signal
import socket
import time
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import psycopg_pool
import structlog

from eventhandler import __version__
from eventhandler.config import Settings
from eventhandler.consumer import TP, KafkaSource
from eventhandler.db import deadline, translate_db_errors
from eventhandler.errors import DatabaseUnavailable, PermanentError, SuspectFailure, TransientError
from eventhandler.health import DepthRefresher
from eventhandler.logs import get_logger
from eventhandler.metrics import Metrics
from eventhandler.pipeline import BatchProcessor, BatchResult, DecodedBatch, Record
from eventhandler.policy import SUSPECT_ATTEMPTS, Backoff
from eventhandler.redaction import Redactor

log = get_logger("eventhandler.worker")

SETTLE_SLICE_SECONDS = 0.01  # how long the loop consumes before it looks at the batch in flight again
LOGGED_DLQ_IDS = 20  # per `events_dead_lettered` line; the rest of its group is counted


@dataclass
class WorkerStats:
    """Totals since start (the `run` command prints them; tests read them)."""

    batches: int = 0
    consumed: int = 0
    applied: int = 0
    failed: int = 0
    duplicates: int = 0
    retries: int = 0
    failed_by_stage: dict[str, int] = field(default_factory=dict)


@dataclass
class _InFlight:
    future: futures.Future[BatchResult]
    records: list[Record]
    started: float


class Worker:
    def __init__(
        self,
        *,
        settings: Settings,
        pool: psycopg_pool.ConnectionPool,
        source: KafkaSource,
        processor: BatchProcessor,
        metrics: Metrics,
        refresher: DepthRefresher | None = None,
        worker_id: str,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.source = source
        source.on_revoked = self.on_revoked
        self.processor = processor
        self.metrics = metrics
        self.refresher = refresher
        self.worker_id = worker_id
        self.backoff = Backoff(settings.retry_initial_seconds, settings.retry_max_seconds)
        self.redactor = Redactor(settings.api_redact_fields, secret=settings.dsn)  # logs show what views show
        self.running = True
        self.stats = WorkerStats()
        self._pending: DecodedBatch | None = None  # the batch committing or being retried
        self._in_flight: _InFlight | None = None
        self._committer: futures.ThreadPoolExecutor | None = None
        self._revocations: list[set[TP]] = []  # every revoke, in order (see `submit`)
        self._abandoned = False
        self._db_ok: bool | None = None
        self._retrying: str | None = None  # the error a batch is being retried for
        self._started = False

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, stop_when_idle: float | None = None) -> WorkerStats:
        structlog.contextvars.bind_contextvars(
            consumer_group=self.settings.consumer_group, worker_id=self.worker_id
        )
        self.source.start()
        self._started = True
        log.info("worker_started", topics=self.settings.topics, version=__version__)
        idle_since = time.monotonic()
        # Before the first assignment the worker is joining its group, not idle. A member that died
        # without leaving holds the group for a session timeout, and then the group rebalances.
        join_grace = 2.5 * self.source.session_timeout_ms / 1000
        try:
            while self.running:
                records = self._next_batch()
                if records:
                    self.submit(records)
                    idle_since = time.monotonic()
                    continue
                self.settle()  # nothing new: make the batch in flight durable now
                if stop_when_idle is not None and self._idle_for(idle_since, join_grace) >= stop_when_idle:
                    log.info("worker_idle_stop", idle_seconds=stop_when_idle)
                    break
        finally:
            try:
                self.settle()
            finally:
                if self._committer is not None:
                    self._committer.shutdown(wait=True)
                    self._committer = None
                self.source.close()
            self._started = False
            log.info("worker_stopped", **vars(self.stats))
        return self.stats

    def _next_batch(self) -> list[Record]:
        """Up to `batch_max_messages` records, waiting at most `batch_max_wait_seconds`.

        While a batch is in flight the wait is cut into short slices, and that batch is settled (Kafka
        commit, metrics, log line) as soon as its transaction is done, instead of a whole batch wait
        later: at a steady trickle of events that wait was most of the produce-to-settled latency."""
        limit, wait = self.settings.batch_max_messages, self.settings.batch_max_wait_seconds
        # Revocations are compared by position in this list, and nothing holds a position between
        # loop iterations: forget the old ones, or a worker that rebalances for months grows it forever.
        self._revocations.clear()
        if self._in_flight is None:
            return self.source.consume(limit, wait)
        deadline = time.monotonic() + wait
        records: list[Record] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(records) >= limit:
                return records
            epoch = len(self._revocations)
            if self._in_flight is not None and self._in_flight.future.done():
                self.settle()
            slice_ = remaining if self._in_flight is None else min(remaining, SETTLE_SLICE_SECONDS)
            fresh = self.source.consume(limit - len(records), slice_)
            revoked = set().union(*self._revocations[epoch:])
            if revoked:
                # A rebalance in this slice took these partitions: what was read of them before it
                # belongs to their new owner, or, if they came back to us, is read again from the
                # stored position (what this slice returned already is).
                records = [r for r in records if (r.topic, r.partition) not in revoked]
            records += fresh

    def _idle_for(self, idle_since: float, join_grace: float) -> float:
        if not self.source.assigned_at:
            idle_since += join_grace
        return time.monotonic() - max(idle_since, self.source.assigned_at)

    def stop(self, *_: Any) -> None:
        """Finish the batch in hand, commit it, then leave (signal handler and tests)."""
        self.running = False

    def submit(self, records: list[Record]) -> None:
        """Decode a batch while the previous one commits, then hand it to the committer thread.

        Batches commit one at a time and in order, so positions only move forward; decoding the next
        batch meanwhile keeps the CPU busy while PostgreSQL works.
        """
        started = time.perf_counter()
        epoch = len(self._revocations)
        batch = self.processor.decode(records)
        self.settle()
        if self._abandoned:
            # The batch before this one was given up (shutdown during an outage): committing this one
            # would move positions past events that never took effect.
            return
        revoked = set().union(*self._revocations[epoch:])
        if revoked:
            # Partitions revoked while the previous batch settled belong to another worker now (or
            # were assigned again and will be read again from their stored position).
            batch = batch.without_partitions(revoked)
            records = [r for r in records if (r.topic, r.partition) not in revoked]
            if not batch.records:
                return
        self._pending = batch
        if self._committer is None:
            self._committer = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-commit")
        self._in_flight = _InFlight(self._committer.submit(self._commit, batch), records, started)

    def settle(self) -> BatchResult | None:
        """Wait for the batch in flight to be durable (retrying a transient failure), then tell Kafka."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return None
        try:
            result: BatchResult | None = in_flight.future.result()
            self._set_db_ok(True)
        except TransientError as exc:
            result = self._commit_with_retry(failed=exc)
            self._abandoned = result is None and not self.running
        self._pending = None
        if result is None:
            return None
        self.source.commit(result.positions)  # only what PostgreSQL now has
        self._record(in_flight.records, result, time.perf_counter() - in_flight.started)
        return result

    def _commit_with_retry(self, failed: TransientError | None = None) -> BatchResult | None:
        attempt = 0
        suspect = 0  # consecutive suspect failures while PostgreSQL answered (see policy)
        outage_started = 0.0
        while True:
            batch = self._pending
            if batch is None or not batch.records:
                self._retrying = None
                return None  # every partition of the batch was revoked while we waited
            try:
                if failed is not None:
                    error, failed = failed, None
                    raise error
                result = self._commit(batch, isolate_suspects=suspect >= SUSPECT_ATTEMPTS)
            except TransientError as exc:
                attempt += 1
                outage_started = outage_started or time.monotonic()
                suspect = suspect + 1 if isinstance(exc, SuspectFailure) and self._postgres_answers() else 0
                self._on_transient(exc, attempt, batch)
                self._sleep_polling(self.backoff.delay(attempt))
                if not self.running:
                    log.warning("batch_abandoned", reason="shutdown", records=len(batch.records))
                    return None
                continue
            if self.source.paused:
                self.source.resume_all()
            if attempt:
                log.info(
                    "batch_recovered",
                    attempts=attempt,
                    outage_seconds=round(time.monotonic() - outage_started, 3),
                )
            self._set_db_ok(True)
            self._retrying = None
            return result

    def _commit(self, batch: DecodedBatch, *, isolate_suspects: bool = False) -> BatchResult:
        timeout = self.settings.db_statement_timeout_seconds + self.settings.db_connect_timeout_seconds
        if isolate_suspects:
            # Bisecting runs the culprit's statement once per level, each up to a statement timeout.
            timeout *= 2 * math.ceil(math.log2(len(batch.events) + 1)) + 2
        with (
            translate_db_errors(),
            self.pool.connection(timeout=self.settings.db_connect_timeout_seconds) as conn,
            deadline(conn, timeout),
            self.metrics.projection_write_duration.time(),
        ):
            return self.processor.commit(conn, batch, isolate_suspects=isolate_suspects)

    def _postgres_answers(self) -> bool:
        """A probe on another connection: does PostgreSQL answer at all right now?"""
        try:
            with (
                translate_db_errors(),
                self.pool.connection(timeout=self.settings.db_connect_timeout_seconds) as conn,
                deadline(conn, self.settings.db_connect_timeout_seconds),
            ):
                conn.execute("SELECT 1")
        except (TransientError, PermanentError):
            return False
        return True

    def _on_transient(self, exc: Exception, attempt: int, batch: DecodedBatch) -> None:
        # Unreachable is an outage; any other error means PostgreSQL answers but the batch fails.
        self._set_db_ok(not isinstance(exc, DatabaseUnavailable))
        self._retrying = f"{type(exc).__name__}: {str(exc)[:200]}"
        self.stats.retries += 1
        self.metrics.transient_retries.labels(reason=type(exc).__name__).inc()
        if batch.rejected:
            self.metrics.dlq_write_errors.inc()
        if not self.source.paused:
            self.source.pause_all()
        if attempt == 1 or attempt % 10 == 0:
            log.warning(
                "batch_retry",
                attempt=attempt,
                error=str(exc),
                error_type=type(exc).__name__,
                records=len(batch.records),
            )

    def _sleep_polling(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while self.running:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self.source.poll_while_paused(min(remaining, 0.2))

    def on_revoked(self, partitions: set[TP]) -> None:
        # The batch in flight may hold positions of these partitions: they must be durable (or
        # abandoned) before another worker is given the partitions and reads the positions.
        if self._in_flight is not None:
            futures.wait([self._in_flight.future])
        self._revocations.append(set(partitions))
        if self._pending is not None:
            self._pending = self._pending.without_partitions(partitions)

    def _record(self, records: list[Record], result: BatchResult, seconds: float) -> None:
        metrics, stats = self.metrics, self.stats
        by_topic: dict[str, int] = {}
        for record in records:
            by_topic[record.topic] = by_topic.get(record.topic, 0) + 1
        for topic, count in by_topic.items():
            metrics.consumed(topic).inc(count)
        for event_type, count in result.applied.items():
            metrics.processed(event_type).inc(count)
        for stage, count in result.failed.items():
            metrics.failed_by_stage[stage].inc(count)
            stats.failed_by_stage[stage] = stats.failed_by_stage.get(stage, 0) + count
        if result.duplicates:
            metrics.events_duplicate.inc(result.duplicates)
        if result.skipped:
            metrics.events_skipped.inc(result.skipped)
        if result.resolved:
            metrics.dlq_resolved_by_replay.inc(len(result.resolved))
        metrics.batch_size.observe(len(records))
        metrics.batch_duration.observe(seconds)
        applied = sum(result.applied.values())
        failed = sum(result.failed.values())
        stats.batches += 1
        stats.consumed += len(records)
        stats.applied += applied
        stats.failed += failed
        stats.duplicates += result.duplicates
        log.info(
            "batch_committed",
            messages=len(records),
            applied=applied,
            failed=failed,
            duplicates=result.duplicates,
            skipped=result.skipped,
            resolved=len(result.resolved),
            duration_ms=round(seconds * 1000, 2),
        )
        if result.dlq_ids:
            self._log_dead_letters(result)

    def _log_dead_letters(self, result: BatchResult) -> None:
        """One line per failure group (stage, error type, normalised message) of the batch, with its
        count, its first message and up to `LOGGED_DLQ_IDS` dlq_ids: a storm of one bad producer
        logs a few lines a batch, not one per message (the DLQ row has every detail)."""
        groups: dict[str, list[int]] = {}  # fingerprint → positions in the batch's dead letters
        for position, failure in enumerate(result.dead_letters):
            groups.setdefault(failure.fingerprint, []).append(position)
        for fingerprint, positions in groups.items():
            first = result.dead_letters[positions[0]]
            redact = functools.partial(self.redactor.failure_text, value=first.value, headers=first.headers)
            log.warning(
                "events_dead_lettered",
                count=len(positions),
                stage=first.stage,
                error_type=first.error_type,
                error=redact(first.error_message)[:300],
                fingerprint=self.redactor.fingerprint(fingerprint),
                dlq_ids=[result.dlq_ids[p] for p in positions[:LOGGED_DLQ_IDS]],
                event_id=None if first.event_id is None else redact(first.event_id),
                event_type=first.event_type,
                topic=first.topic,
                partition=first.partition,
                offset=first.offset,
            )

    # -- health ---------------------------------------------------------------------------------------

    def _set_db_ok(self, ok: bool) -> None:
        self._db_ok = ok

    def ready_value(self) -> float:
        """`eventhandler_ready`: 1 when ready."""
        return 1.0 if self.is_ready()[0] else 0.0

    def is_ready(self) -> tuple[bool, dict[str, Any]]:
        db_ok = self._db_ok is not False and (self.refresher is None or self.refresher.last_ok is not False)
        kafka_ok = self._started and self.source.broker_error is None
        detail: dict[str, Any] = {
            "postgres": "ok" if db_ok else "unreachable",
            "kafka": "ok" if kafka_ok else (self.source.broker_error or "not started"),
            "assigned_partitions": len(self.source.assignment),
        }
        retrying = self._retrying
        if retrying is not None:
            detail["batch"] = f"retrying after {retrying}"
        return db_ok and kafka_ok and retrying is None, detail


# Collect the youngest generation every 20,000 new container objects instead of CPython's 700: a
# batch allocates tens of thousands (records, events, models) that die with the batch by reference
# counting, and the default makes the collector walk each batch several times (a third of a failure
# storm's CPU at the default thresholds). Memory stays bounded: a generation is still collected.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """Process-wide: move everything alive after start-up (modules, models, compiled validators) out
    of the collector's sight, and collect young objects less often (see `GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def install_signal_handlers(worker: Worker) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)

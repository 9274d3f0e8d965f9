"""What the worker tells the world about its batches: one seam, `Observer`, and the observers that
hang off it — Prometheus metrics, the totals `run` prints, the log lines, and readiness.

The in-flight batch calls the observer at each turn of a batch's life; nothing else in the loop
updates a metric or writes a batch's log line. Benchmarks and tests add their own observer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from eventhandler.batch import BatchResult, DecodedBatch, Record
from eventhandler.errors import DatabaseUnavailable
from eventhandler.flood import CircuitOpen
from eventhandler.logs import get_logger
from eventhandler.metrics import Metrics
from eventhandler.redaction import Redactor

log = get_logger("eventhandler.worker")

LOGGED_DLQ_IDS = 20  # per `events_dead_lettered` line; the rest of its group is counted


class Observer(Protocol):
    def settled(self, records: list[Record], result: BatchResult, seconds: float) -> None:
        """A batch is durable in PostgreSQL and Kafka was told (`seconds` since it was read)."""

    def retrying(self, exc: Exception, attempt: int, batch: DecodedBatch) -> None:
        """A batch's transaction failed and will be tried again (the `attempt`-th failure)."""

    def recovered(self, attempts: int, outage_seconds: float) -> None:
        """A batch that failed `attempts` times went through."""

    def abandoned(self, batch: DecodedBatch, reason: str) -> None:
        """A batch is given up without effect (its events will be read again)."""

    def revoked(self) -> None:
        """A batch being retried lost all its partitions to a rebalance (their new owner reads them)."""


class Observers:
    """Several observers as one, called in order."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = list(observers)

    def add(self, observer: Observer) -> None:
        self.observers.append(observer)

    def settled(self, records: list[Record], result: BatchResult, seconds: float) -> None:
        for observer in self.observers:
            observer.settled(records, result, seconds)

    def retrying(self, exc: Exception, attempt: int, batch: DecodedBatch) -> None:
        for observer in self.observers:
            observer.retrying(exc, attempt, batch)

    def recovered(self, attempts: int, outage_seconds: float) -> None:
        for observer in self.observers:
            observer.recovered(attempts, outage_seconds)

    def abandoned(self, batch: DecodedBatch, reason: str) -> None:
        for observer in self.observers:
            observer.abandoned(batch, reason)

    def revoked(self) -> None:
        for observer in self.observers:
            observer.revoked()


class Quiet:
    """An observer that ignores everything: a base for observers that care about one turn."""

    def settled(self, records: list[Record], result: BatchResult, seconds: float) -> None:
        pass

    def retrying(self, exc: Exception, attempt: int, batch: DecodedBatch) -> None:
        pass

    def recovered(self, attempts: int, outage_seconds: float) -> None:
        pass

    def abandoned(self, batch: DecodedBatch, reason: str) -> None:
        pass

    def revoked(self) -> None:
        pass


@dataclass
class WorkerStats(Quiet):
    """Totals since start (the `run` command prints them; tests read them)."""

    batches: int = 0
    consumed: int = 0
    applied: int = 0
    failed: int = 0
    duplicates: int = 0
    retries: int = 0
    parked: int = 0
    released: int = 0
    failed_by_stage: dict[str, int] = field(default_factory=dict)

    def settled(self, records: list[Record], result: BatchResult, seconds: float) -> None:
        self.batches += 1
        self.consumed += len(records)
        self.applied += sum(result.applied.values())
        self.failed += sum(result.failed.values())
        self.duplicates += result.duplicates
        self.parked += len(result.parked)
        self.released += len(result.released)
        for stage, count in result.failed.items():
            self.failed_by_stage[stage] = self.failed_by_stage.get(stage, 0) + count

    def retrying(self, exc: Exception, attempt: int, batch: DecodedBatch) -> None:
        self.retries += 1


class MetricsObserver(Quiet):
    def __init__(self, metrics: Metrics, consumer: str) -> None:
        self.metrics = metrics
        self.consumer = consumer

    def settled(self, records: list[Record], result: BatchResult, seconds: float) -> None:
        metrics = self.metrics
        by_topic: dict[str, int] = {}
        for record in records:
            by_topic[record.topic] = by_topic.get(record.topic, 0) + 1
        for topic, count in by_topic.items():
            metrics.consumed(topic).inc(count)
        for event_type, count in result.applied.items():
            metrics.processed(event_type).inc(count)
        for stage, count in result.failed.items():
            metrics.failed_by_stage[stage].inc(count)
        if result.duplicates:
            metrics.events_duplicate.inc(result.duplicates)
        if result.skipped:
            metrics.events_skipped.inc(result.skipped)
        if result.resolved:
            metrics.dlq_resolved_by_replay.inc(len(result.resolved))
        if result.parked:
            metrics.events_parked.inc(len(result.parked))
        if result.released:
            metrics.events_released.inc(len(result.released))
        for fingerprint in result.circuits_closed:
            metrics.set_circuit(self.consumer, fingerprint, False)
        metrics.batch_size.observe(len(records))
        metrics.batch_duration.observe(seconds)

    def retrying(self, exc: Exception, attempt: int, batch: DecodedBatch) -> None:
        self.metrics.transient_retries.labels(reason=type(exc).__name__).inc()
        if isinstance(exc, CircuitOpen):  # held on purpose: its DLQ rows were not refused
            self.metrics.set_circuit(self.consumer, exc.circuit.fingerprint, not exc.exempted)
        elif batch.rejected:
            self.metrics.dlq_write_errors.inc()


class BatchLog(Quiet):
    """The worker's log lines about batches; failures redacted as the operators' views are."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor

    def settled(self, records: list[Record], result: BatchResult, seconds: float) -> None:
        log.info(
            "batch_committed",
            messages=len(records),
            applied=sum(result.applied.values()),
            failed=sum(result.failed.values()),
            duplicates=result.duplicates,
            skipped=result.skipped,
            resolved=len(result.resolved),
            parked=len(result.parked),
            released=len(result.released),
            duration_ms=round(seconds * 1000, 2),
        )
        if result.dlq_ids:
            self._dead_letters(result)
        for fingerprint in result.circuits_closed:
            log.warning("circuit_closed", fingerprint=self.redactor.fingerprint(fingerprint))

    def _dead_letters(self, result: BatchResult) -> None:
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

    def retrying(self, exc: Exception, attempt: int, batch: DecodedBatch) -> None:
        if isinstance(exc, CircuitOpen):
            if not exc.exempted:
                self._circuit(exc, attempt, batch)
        elif attempt == 1 or attempt % 10 == 0:
            log.warning(
                "batch_retry",
                attempt=attempt,
                error=str(exc),
                error_type=type(exc).__name__,
                records=len(batch.records),
            )

    def _circuit(self, held: CircuitOpen, attempt: int, batch: DecodedBatch) -> None:
        """One line when the line stops (then one every 10 trials): what failed, how often, where."""
        if not (held.opened or attempt == 1 or attempt % 10 == 0):
            return
        circuit, sample = held.circuit, held.circuit.sample
        redact = functools.partial(self.redactor.failure_text, value=sample.value, headers=sample.headers)
        log.error(
            "circuit_open" if held.opened or attempt == 1 else "circuit_still_open",
            fingerprint=self.redactor.fingerprint(circuit.fingerprint),
            stage=sample.stage,
            error_type=sample.error_type,
            error=redact(sample.error_message)[:300],
            event_types=sorted(circuit.event_types),
            failures=circuit.failures,
            messages=circuit.messages,
            keys=circuit.keys,
            trial=attempt,
            probe_seconds=held.probe_seconds,
            held_records=len(batch.records),
            topic=sample.topic,
            partition=sample.partition,
            offset=sample.offset,
        )

    def recovered(self, attempts: int, outage_seconds: float) -> None:
        log.info("batch_recovered", attempts=attempts, outage_seconds=round(outage_seconds, 3))

    def abandoned(self, batch: DecodedBatch, reason: str) -> None:
        log.warning("batch_abandoned", reason=reason, records=len(batch.records))


class BatchHealth(Quiet):
    """What readiness needs to know of the batches: does PostgreSQL answer, is one being retried."""

    def __init__(self) -> None:
        self.postgres_ok: bool | None = None
        self.retrying_after: str | None = None  # the error a batch is being retried for

    def settled(self, records: list[Record], result: BatchResult, seconds: float) -> None:
        self.postgres_ok, self.retrying_after = True, None

    def retrying(self, exc: Exception, attempt: int, batch: DecodedBatch) -> None:
        # Unreachable is an outage; any other error means PostgreSQL answers but the batch fails.
        self.postgres_ok = not isinstance(exc, DatabaseUnavailable)
        self.retrying_after = f"{type(exc).__name__}: {str(exc)[:200]}"

    def recovered(self, attempts: int, outage_seconds: float) -> None:
        self.postgres_ok, self.retrying_after = True, None

    def revoked(self) -> None:
        self.retrying_after = None  # no batch of ours is being retried any more

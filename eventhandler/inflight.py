"""The batch in flight: at most one batch in its PostgreSQL transaction while the loop reads and
decodes the next, its retries, and what a rebalance takes from it.

Rules, each written once here:

- Batches are written one at a time and in order, so positions only move forward; Kafka hears of a
  batch's offsets only after PostgreSQL has them (`settle`).
- A failed transaction is retried as the failure policy says, the consumer paused meanwhile; at
  shutdown during an outage the batch is given up, and so is every batch after it (`abandoned`):
  writing one would move positions past events that never took effect.
- Records of a partition revoked while their batch waited belong to its new owner (or, if it came
  back, are read again from the stored position): they are dropped from the batch, never written.
"""

from __future__ import annotations

import math
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Protocol

import psycopg_pool

from eventhandler.batch import TP, BatchResult, DecodedBatch, Record, without_partitions
from eventhandler.db import deadline, translate_db_errors
from eventhandler.errors import PermanentError, SuspectFailure, TransientError
from eventhandler.metrics import Metrics
from eventhandler.observer import Observer
from eventhandler.pipeline import BatchProcessor
from eventhandler.policy import Decision, FailurePolicy


class Source(Protocol):
    """What the in-flight batch needs of the Kafka side (`source.KafkaSource`)."""

    paused: bool

    def commit_offsets(self, positions: dict[TP, int]) -> None: ...
    def pause_all(self) -> None: ...
    def resume_all(self) -> None: ...
    def poll_while_paused(self, timeout: float) -> None: ...


class BatchWrites(Protocol):
    """How the in-flight batch writes a batch (`Transaction`)."""

    def __call__(self, batch: DecodedBatch, *, isolate_suspects: bool = False) -> BatchResult: ...
    def postgres_answers(self) -> bool: ...


class Transaction:
    """One batch's PostgreSQL transaction: a pooled connection, a deadline, the processor's writes."""

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool,
        processor: BatchProcessor,
        metrics: Metrics,
        *,
        statement_timeout: float,
        connect_timeout: float,
    ) -> None:
        self.pool = pool
        self.processor = processor
        self.metrics = metrics
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout

    def __call__(self, batch: DecodedBatch, *, isolate_suspects: bool = False) -> BatchResult:
        timeout = self.statement_timeout + self.connect_timeout
        if isolate_suspects:
            # Bisecting runs the culprit's statement once per level, each up to a statement timeout.
            timeout *= 2 * math.ceil(math.log2(len(batch.events) + 1)) + 2
        with (
            translate_db_errors(),
            self.pool.connection(timeout=self.connect_timeout) as conn,
            deadline(conn, timeout),
            self.metrics.projection_write_duration.time(),
        ):
            return self.processor.write(conn, batch, isolate_suspects=isolate_suspects)

    def postgres_answers(self) -> bool:
        """A probe on another connection: does PostgreSQL answer at all right now?"""
        try:
            with (
                translate_db_errors(),
                self.pool.connection(timeout=self.connect_timeout) as conn,
                deadline(conn, self.connect_timeout),
            ):
                conn.execute("SELECT 1")
        except (TransientError, PermanentError):
            return False
        return True


class Revocations:
    """Every revoke since a mark, so that a reader can tell which of its records a rebalance took."""

    def __init__(self) -> None:
        self._seen: list[set[TP]] = []

    def add(self, partitions: set[TP]) -> None:
        self._seen.append(set(partitions))

    def mark(self) -> int:
        return len(self._seen)

    def since(self, mark: int) -> set[TP]:
        return set().union(*self._seen[mark:])

    def forget(self) -> None:
        """Between two loop turns nothing holds a mark: a worker that rebalances for months must not
        keep every revoke."""
        self._seen.clear()


@dataclass
class _Writing:
    future: futures.Future[BatchResult]
    records: list[Record]
    started: float


class InFlight:
    def __init__(
        self, transaction: BatchWrites, source: Source, policy: FailurePolicy, observer: Observer
    ) -> None:
        self.transaction = transaction
        self.source = source
        self.policy = policy
        self.observer = observer
        self.revocations = Revocations()
        self.stopping = False
        self.abandoned = False  # a batch was given up: nothing after it may be written
        self._batch: DecodedBatch | None = None  # the batch writing or being retried
        self._writing: _Writing | None = None
        self._thread: futures.ThreadPoolExecutor | None = None

    @property
    def busy(self) -> bool:
        return self._writing is not None

    def done(self) -> bool:
        """True when the batch in flight has finished its first attempt (settling will not wait)."""
        return self._writing is not None and self._writing.future.done()

    def submit(self, batch: DecodedBatch, records: list[Record], started: float, mark: int) -> None:
        """Settle the batch before, then start writing `batch` (decoded from `records`, read at
        `started`; `mark` is the revocation mark taken before it was decoded)."""
        self.settle()
        if self.abandoned:
            return
        revoked = self.revocations.since(mark)
        if revoked:
            batch = batch.without_partitions(revoked)
            records = without_partitions(records, revoked)
            if not batch.records:
                return
        self._batch = batch
        if self._thread is None:
            self._thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-write")
        self._writing = _Writing(self._thread.submit(self.transaction, batch), records, started)

    def settle(self) -> BatchResult | None:
        """Wait for the batch in flight to be durable (retrying as the policy says), then tell Kafka."""
        writing, self._writing = self._writing, None
        if writing is None:
            return None
        try:
            result: BatchResult | None = writing.future.result()
        except TransientError as exc:
            result = self._retry(exc)
            self.abandoned = result is None and self.stopping
        self._batch = None
        if result is None:
            return None
        self.source.commit_offsets(result.positions)  # only what PostgreSQL now has
        if writing.records or result.released:  # an empty batch that released nothing did nothing
            self.observer.settled(writing.records, result, time.perf_counter() - writing.started)
        return result

    def revoked(self, partitions: set[TP]) -> None:
        """The consumer's revoke callback: the batch in flight may hold positions of these partitions;
        they must be durable (or given up) before another worker reads the positions."""
        if self._writing is not None:
            futures.wait([self._writing.future])
        self.revocations.add(partitions)
        if self._batch is not None:
            self._batch = self._batch.without_partitions(partitions)

    def close(self) -> None:
        try:
            self.settle()
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None

    def _retry(self, failed: TransientError) -> BatchResult | None:
        attempt = streak = 0  # every failure; failures in a row of one kind (what the policy counts)
        kind: type[Exception] | None = None
        outage_started = time.monotonic()
        error: Exception | None = failed
        isolate = False
        while True:
            batch = self._batch
            if batch is None or not batch.records:
                # Every partition of the batch went to another worker while it waited: nothing is left
                # to retry, and the partitions assigned now must not stay paused behind it.
                if self.source.paused:
                    self.source.resume_all()
                self.observer.revoked()
                return None
            if error is None:
                try:
                    result = self.transaction(batch, isolate_suspects=isolate)
                except TransientError as exc:
                    error = exc
                else:
                    if self.source.paused:
                        self.source.resume_all()
                    self.observer.recovered(attempt, time.monotonic() - outage_started)
                    return result
            # A suspect failure while PostgreSQL does not answer a probe is the outage, not the batch.
            answered = not isinstance(error, SuspectFailure) or self.transaction.postgres_answers()
            counted = error if answered else TransientError(str(error))
            attempt += 1
            streak = streak + 1 if type(counted) is kind else 1
            kind = type(counted)
            decision = self.policy.decide(counted, "batch", streak)
            if decision is Decision.STOP:
                raise error
            isolate = decision is Decision.ISOLATE  # anything else holds the position: a retry
            self.observer.retrying(error, attempt, batch)
            if not self.source.paused:
                self.source.pause_all()
            error = None
            self._sleep_polling(self.policy.delay(counted, attempt))
            if self.stopping:
                self.observer.abandoned(batch, "shutdown")
                return None

    def _sleep_polling(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while not self.stopping:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self.source.poll_while_paused(min(remaining, 0.2))

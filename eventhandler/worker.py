"""The worker loop.

while running:
    records = read a batch from Kafka            # while the batch before is being written
    batch   = decode(records)                    # bytes → events; bad input → rejected
    submit(batch)                                # settle the batch before, then write this one
settle the last batch, leave the group

Writing, retrying and what a rebalance takes live in `inflight`; what a batch did is told to the
observers (`observer`); what a failure means is the policy's (`policy`).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

import structlog

from eventhandler import __version__
from eventhandler.batch import TP, DecodedBatch, Record, without_partitions
from eventhandler.health import DepthRefresher
from eventhandler.inflight import InFlight, Source
from eventhandler.logs import get_logger
from eventhandler.observer import BatchHealth, WorkerStats

log = get_logger("eventhandler.worker")

SETTLE_SLICE_SECONDS = 0.01  # how long the loop reads before it looks at the batch in flight again


class Reader(Source, Protocol):
    """What the loop needs of the Kafka side (`source.KafkaSource`)."""

    topics: list[str]
    session_timeout_ms: int
    assigned_at: float  # time.monotonic() of the last assignment, 0 before the first
    assignment: set[TP]
    broker_error: str | None
    on_revoked: Callable[[set[TP]], None]

    def start(self) -> None: ...
    def close(self) -> None: ...
    def consume(self, max_messages: int, timeout: float) -> list[Record]: ...


class Decoder(Protocol):
    """Bytes to events, no I/O (`pipeline.BatchProcessor`)."""

    def decode(self, records: list[Record]) -> DecodedBatch: ...


class Worker:
    def __init__(
        self,
        *,
        source: Reader,
        processor: Decoder,
        inflight: InFlight,
        stats: WorkerStats,
        health: BatchHealth,
        batch_max_messages: int,
        batch_max_wait_seconds: float,
        labels: dict[str, Any],
        refresher: DepthRefresher | None = None,
        release_every: float | None = None,
    ) -> None:
        self.source = source
        self.processor = processor
        self.inflight = inflight
        self.stats = stats
        self.health = health
        self.batch_max_messages = batch_max_messages
        self.batch_max_wait_seconds = batch_max_wait_seconds
        self.labels = labels  # bound to every log line of the loop (consumer group, worker id)
        self.refresher = refresher
        # With parking, an idle worker still writes an empty batch this often: its transaction
        # releases the parked rows of keys an operator unblocked meanwhile.
        self.release_every = release_every
        self._written_at = 0.0
        self.running = True
        self._started = False
        source.on_revoked = inflight.revoked

    def run(self, stop_when_idle: float | None = None) -> WorkerStats:
        structlog.contextvars.bind_contextvars(**self.labels)
        self.source.start()
        self._started = True
        log.info("worker_started", topics=self.source.topics, version=__version__)
        idle_since = time.monotonic()
        # Before the first assignment the worker is joining its group, not idle. A member that died
        # without leaving holds the group for a session timeout, and then the group rebalances.
        join_grace = 2.5 * self.source.session_timeout_ms / 1000
        try:
            while self.running:
                records = self.next_batch()
                if records:
                    self.submit(records)
                    idle_since = time.monotonic()
                    continue
                self.inflight.settle()  # nothing new: make the batch in flight durable now
                if self.release_every and time.monotonic() - self._written_at >= self.release_every:
                    self.submit([])
                if stop_when_idle is not None and self._idle_for(idle_since, join_grace) >= stop_when_idle:
                    log.info("worker_idle_stop", idle_seconds=stop_when_idle)
                    break
        finally:
            try:
                self.inflight.close()
            finally:
                self.source.close()
            self._started = False
            log.info("worker_stopped", **vars(self.stats))
        return self.stats

    def next_batch(self) -> list[Record]:
        """Up to `batch_max_messages` records, waiting at most `batch_max_wait_seconds`.

        While a batch is in flight the wait is cut into short slices, and that batch is settled (Kafka
        offsets, metrics, log line) as soon as its transaction is done, instead of a whole batch wait
        later: at a steady trickle of events that wait was most of the produce-to-settled latency."""
        limit, wait = self.batch_max_messages, self.batch_max_wait_seconds
        inflight = self.inflight
        inflight.revocations.forget()
        if not inflight.busy:
            return self.source.consume(limit, wait)
        until = time.monotonic() + wait
        records: list[Record] = []
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0 or len(records) >= limit:
                return records
            mark = inflight.revocations.mark()
            if inflight.done():
                inflight.settle()
            slice_ = min(remaining, SETTLE_SLICE_SECONDS) if inflight.busy else remaining
            fresh = self.source.consume(limit - len(records), slice_)
            revoked = inflight.revocations.since(mark)
            if revoked:
                # What was read of these partitions before this slice belongs to their new owner, or,
                # if they came back to us, is read again from the stored position (as this slice was).
                records = without_partitions(records, revoked)
            records += fresh

    def submit(self, records: list[Record]) -> None:
        """Decode a batch while the one before is written, then hand it to the in-flight batch."""
        started = time.perf_counter()
        self._written_at = time.monotonic()
        mark = self.inflight.revocations.mark()
        batch = self.processor.decode(records)
        self.inflight.submit(batch, records, started, mark)

    def stop(self, *_: Any) -> None:
        """Finish the batch in hand, write it, then leave (signal handler and tests)."""
        self.running = False
        self.inflight.stopping = True

    def _idle_for(self, idle_since: float, join_grace: float) -> float:
        if not self.source.assigned_at:
            idle_since += join_grace
        return time.monotonic() - max(idle_since, self.source.assigned_at)

    # -- health ---------------------------------------------------------------------------------------

    def ready_value(self) -> float:
        """`eventhandler_ready`: 1 when ready."""
        return 1.0 if self.is_ready()[0] else 0.0

    def is_ready(self) -> tuple[bool, dict[str, Any]]:
        refreshed = self.refresher is None or self.refresher.last_ok is not False
        db_ok = self.health.postgres_ok is not False and refreshed
        kafka_ok = self._started and self.source.broker_error is None
        detail: dict[str, Any] = {
            "postgres": "ok" if db_ok else "unreachable",
            "kafka": "ok" if kafka_ok else (self.source.broker_error or "not started"),
            "assigned_partitions": len(self.source.assignment),
        }
        retrying = self.health.retrying_after
        if retrying is not None:
            detail["batch"] = f"retrying after {retrying}"
        return db_ok and kafka_ok and retrying is None, detail


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def install_signal_handlers(worker: Worker) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    # `kill -USR1` prints every thread's stack to stderr: what a worker that does not stop is waiting on
    faulthandler.register(signal.SIGUSR1, all_threads=True)

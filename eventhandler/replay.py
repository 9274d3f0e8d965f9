"""Replay: republish DLQ rows to Kafka, exactly as they were consumed, and mark them `replayed`.

Rows are taken in chunks, each claimed for the replay's lease in a short transaction (see
`dlq.replays`), so two replayers never publish the same row, and no transaction stays open while the
rate limiter or the broker is waited on: the worker, which updates replayed rows, is never held up by
a replay. The
producer is idempotent. A row is marked `replayed` only after the broker confirmed its delivery: a
replay killed part-way leaves the rest `pending` (its lease dies with its session) and can simply be
run again. A row whose delivery outcome was unknown may then be published twice; the worker recognises
the duplicate by its event id (or its `dlq_id` header) and applies it once. A row with a header key that
is not UTF-8 goes out through librdkafka's C API (`RawProducer`), since the Python client cannot write one.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException, Producer

from eventhandler.dlq import ReplayRows
from eventhandler.errors import BrokerUnavailable, DatabaseUnavailable
from eventhandler.events import DLQ_ID_HEADER, ORIGIN_HEADER, REPLAY_COUNT_HEADER, origin_header
from eventhandler.librdkafka import RawProducer, raw_header_key
from eventhandler.metrics import Metrics
from eventhandler.models import DLQEntry, DLQFilter, DLQSummary, Headers, OutgoingRow

CHUNK = 1000  # rows a lease takes at once
WINDOW = 4  # chunks in flight: the next ones are taken and sent while the broker confirms the first
CONNECT_SECONDS = 5.0  # how long a replay waits for the broker's metadata before it gives up
DOWN_SECONDS = 5.0  # after the broker did not answer, replays fail at once for this long
_OUR_HEADERS = {DLQ_ID_HEADER, ORIGIN_HEADER, REPLAY_COUNT_HEADER}


@dataclass
class ReplayReport:
    matched: int = 0
    published: int = 0
    failed: int = 0
    dry_run: bool = False
    published_ids: list[int] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)  # dlq_id → why the broker refused it
    canary: dict[str, Any] | None = None  # a canary replay's verdict (see `canary`)
    stopped: bool = False  # the canary failed: the rest was left untouched
    outcomes: dict[str, int] | None = None  # what the workers made of the published rows so far

    def as_dict(self) -> dict[str, Any]:
        return {
            "matched": self.matched,
            "published": self.published,
            "failed": self.failed,
            "dry_run": self.dry_run,
            "published_ids": self.published_ids,
            "failures": {str(k): v for k, v in self.failures.items()},
            "canary": self.canary,
            "stopped": self.stopped,
            "outcomes": self.outcomes,
        }


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay would take, found without changing anything: how many rows, and the first ones."""

    matched: int
    rows: list[DLQSummary] = field(default_factory=list)

    def report(self) -> ReplayReport:
        """The plan as the report of a dry run."""
        return ReplayReport(matched=self.matched, dry_run=True)


def replay_headers(entry: DLQEntry | OutgoingRow) -> Headers:
    """The original headers, byte for byte, plus the row's id, the original message's coordinates and
    the replay count (replacing older ones)."""
    headers: Headers = [(k, v) for k, v in entry.headers if k not in _OUR_HEADERS]
    headers += origin_header(entry.dlq_id, entry.source_topic, entry.source_partition, entry.source_offset)
    headers.append((REPLAY_COUNT_HEADER, str(entry.replay_count + 1).encode()))
    return headers


def replay_message(entry: DLQEntry | OutgoingRow) -> tuple[bytes | None, Headers]:
    """What a replay publishes for a row, beside its key: the payload (an operator's repair of it when
    there is one) and the headers."""
    value = entry.edited_payload if entry.edited_payload is not None else entry.event_payload
    return value, replay_headers(entry)


def _utf8_keys(headers: Headers) -> bool:
    try:
        for key, _ in headers:
            key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _RawPublisher:
    """librdkafka's C API, for the rows the Python client cannot publish (a header key that is not
    UTF-8); made when the first such row comes."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._producer: RawProducer | None = None

    def publish(
        self, dlq_id: int, topic: str, value: bytes | None, key: bytes | None, headers: Headers
    ) -> str | None:
        if self._producer is None:
            self._producer = RawProducer(self._config)
        raw = [(raw_header_key(name), header) for name, header in headers]
        return self._producer.produce(dlq_id, topic, value, key, raw)

    def settle(self, timeout: float, delivered: set[int], failed: dict[int, str]) -> None:
        if self._producer is None:
            return
        self._producer.flush(timeout)
        for dlq_id, why in self._producer.outcomes.items():
            if why is None:
                delivered.add(dlq_id)
            else:
                failed[dlq_id] = why
        self._producer.outcomes.clear()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()


class RateLimiter:
    """Spaces sends evenly at `rate` per second (None: as fast as possible)."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._next = clock()

    def wait(self) -> None:
        if not self._interval:
            return
        now = self._clock()
        if self._next > now:
            time.sleep(self._next - now)
        self._next = max(self._next, now) + self._interval


@dataclass
class _Chunk:
    """Rows taken for the lease and handed to the producer, waiting for their delivery reports."""

    rows: list[OutgoingRow]
    claim: int | None  # None: no row was free
    size: int  # the ids it stood for (a row another replayer took is counted as done)
    topics: dict[int, str] = field(default_factory=dict)  # dlq_id → where it went
    delivered: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        return len(self.delivered) + len(self.failed) >= len(self.rows)


class Replayer:
    def __init__(
        self,
        rows: ReplayRows,
        producer_config: dict[str, Any],
        *,
        metrics: Metrics | None = None,
        delivery_timeout: float = 30.0,
    ) -> None:
        self._rows = rows
        self._producer_config = producer_config
        self._metrics = metrics
        self._delivery_timeout = delivery_timeout
        self._down_until = 0.0  # monotonic time until which the broker counts as down

    def connect(self) -> Producer:
        """A producer, after checking the broker answers (one clear error instead of a hang). Once it
        did not, every replay fails at once for a few seconds: a burst of API retries while Kafka is
        down answers 503 quickly instead of holding a thread each."""
        where = self._producer_config.get("bootstrap.servers")
        if time.monotonic() < self._down_until:
            raise BrokerUnavailable(f"cannot reach Kafka at {where} (it did not answer a moment ago)")
        config = self._producer_config | {
            "message.timeout.ms": int(self._delivery_timeout * 1000),
            "logger": logging.getLogger("librdkafka"),  # its lines through structlog, not raw stderr
        }
        producer = Producer(config)
        try:
            producer.list_topics(timeout=CONNECT_SECONDS)
        except KafkaException as exc:
            self._down_until = time.monotonic() + DOWN_SECONDS
            raise BrokerUnavailable(f"cannot reach Kafka at {where}: {exc.args[0].str()}") from None
        return producer

    def replay(
        self,
        flt: DLQFilter,
        *,
        limit: int | None = None,
        to_topic: str | None = None,
        rate: float | None = None,
        actor: str = "unknown",
        progress: Callable[[int], None] | None = None,
    ) -> ReplayReport:
        """Publish the matching rows, oldest first. Chunks are pipelined: while the broker confirms
        one chunk, the next is taken and sent (at most `WINDOW` in flight); a chunk is marked once
        all its delivery reports are in, in order, so a row is `replayed` only after the broker took
        it, and no transaction is open while the broker or the rate limiter is waited on."""
        report = ReplayReport()
        # The ids are read once, oldest first; each chunk is then taken by id (an index lookup,
        # whatever the table's statistics say) with the filter applied again, so a row another
        # replayer took, or that changed meanwhile, is skipped.
        ids = self._rows.matching_ids(flt, limit=limit)
        report.matched = len(ids)
        if not ids:
            return report
        producer = self.connect()
        raw = _RawPublisher(
            self._producer_config | {"message.timeout.ms": int(self._delivery_timeout * 1000)}
        )
        limiter = RateLimiter(rate)
        # With a rate, a chunk is about a second of sending: leases stay short and rows are marked
        # (and the progress moves) as they go.
        size = CHUNK if not rate else max(1, min(CHUNK, int(rate)))
        lease_seconds = self._delivery_timeout + (size * WINDOW / rate if rate else 0) + 60
        flying: deque[_Chunk] = deque()

        def settle(wait_for_all: bool) -> bool:
            """Mark the settled chunks at the head; wait while the window is full (or for all).
            False once a chunk came back with nothing delivered: the rest would fare the same."""
            deadline = time.monotonic() + self._delivery_timeout + 5
            while flying:
                producer.poll(0)
                head = flying[0]
                if not head.settled:
                    if not wait_for_all and len(flying) < WINDOW:
                        return True
                    if time.monotonic() < deadline:
                        producer.poll(0.05)
                        continue
                    head.failed |= {
                        row.dlq_id: "delivery not confirmed before the timeout (outcome unknown)"
                        for row in head.rows
                        if row.dlq_id not in head.delivered and row.dlq_id not in head.failed
                    }
                flying.popleft()
                self._finish(head, lease, actor, to_topic, report)
                if progress is not None:
                    progress(head.size)
                if head.failed and not head.delivered:
                    return False
            return True

        try:
            with self._rows.lease() as lease:
                for start in range(0, len(ids), size):
                    chunk = self._send(
                        producer, raw, flt, ids[start : start + size], lease, lease_seconds, to_topic, limiter
                    )
                    flying.append(chunk)
                    if not settle(wait_for_all=False):
                        break
                settle(wait_for_all=True)
        finally:
            producer.flush(5)
            raw.close()
        return report  # the service logs the outcome with the audit line

    def _send(
        self,
        producer: Producer,
        raw: _RawPublisher,
        flt: DLQFilter,
        ids: list[int],
        lease: int,
        lease_seconds: float,
        to_topic: str | None,
        limiter: RateLimiter,
    ) -> _Chunk:
        """Take the chunk's rows (a short transaction) and hand them to the producer."""
        if not self._rows.lease_held(lease):
            raise DatabaseUnavailable(
                "the replay lost its lease (its PostgreSQL connection dropped); the rows it did not "
                "publish are still pending: run it again"
            )
        rows, claim = self._rows.take(
            flt.model_copy(update={"ids": tuple(ids)}),
            limit=len(ids),
            lease=lease,
            lease_seconds=lease_seconds,
        )
        chunk = _Chunk(rows, claim, len(ids))
        delivered, failed = chunk.delivered, chunk.failed

        for row in rows:
            limiter.wait()
            topic = to_topic or row.source_topic
            chunk.topics[row.dlq_id] = topic
            value, headers = replay_message(row)
            if not _utf8_keys(headers):
                refused = raw.publish(row.dlq_id, topic, value, row.message_key, headers)
                if refused is not None:
                    failed[row.dlq_id] = refused
                continue
            on_delivery = _reporter(row.dlq_id, delivered, failed)
            while True:
                try:
                    producer.produce(
                        topic,
                        value=value,
                        key=row.message_key,
                        headers=headers,  # type: ignore[arg-type]  # list is invariant
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)  # the queue is full: let deliveries drain it
                except KafkaException as exc:
                    failed[row.dlq_id] = exc.args[0].str()
                    break
            producer.poll(0)
        raw.settle(self._delivery_timeout, delivered, failed)
        return chunk

    def _finish(
        self, chunk: _Chunk, lease: int, actor: str, to_topic: str | None, report: ReplayReport
    ) -> None:
        """Mark the rows the broker confirmed (by topic) and free the others, with the audit row."""
        if chunk.claim is None:
            return
        published: dict[str, list[int]] = {}
        done = [row.dlq_id for row in chunk.rows if row.dlq_id in chunk.delivered]
        for dlq_id in done:
            published.setdefault(chunk.topics[dlq_id], []).append(dlq_id)
        failed = {i: why for i, why in chunk.failed.items() if i not in chunk.delivered}
        self._rows.finish(
            lease=lease,
            claim=chunk.claim,
            published=published,
            actor=actor,
            detail={"to_topic": to_topic, "failed": len(failed)},
        )
        report.published_ids += done
        report.published += len(done)
        report.failed += len(failed)
        report.failures.update(failed)
        if self._metrics is not None:
            self._metrics.replay_published.inc(len(done))
            self._metrics.replay_failed.inc(len(failed))


def _reporter(dlq_id: int, delivered: set[int], failed: dict[int, str]) -> Callable[[Any, Any], None]:
    """The delivery callback of one row's message."""

    def report(err: Any, _msg: Any) -> None:
        if err is None:
            delivered.add(dlq_id)
        else:
            failed[dlq_id] = err.str()

    return report

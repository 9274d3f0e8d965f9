"""Replay: republish DLQ rows to Kafka, exactly as they were consumed, and mark them `replayed`.

Rows are taken in chunks with a lease (a short transaction with `FOR UPDATE SKIP LOCKED`), so two
replayers never publish the same row, and no transaction stays open while the rate limiter or the
broker is waited on: the worker, which updates replayed rows, is never held up by a replay. The
producer is idempotent. A row is marked `replayed` only after the broker confirmed its delivery: a
replay killed part-way leaves the rest `pending` (its lease dies with its session) and can simply be
run again. A row whose delivery outcome was unknown may then be published twice; the worker recognises
the duplicate by its event id (or its `dlq_id` header) and applies it once. A row with a header key that
is not UTF-8 goes out through librdkafka's C API (`RawProducer`), since the Python client cannot write one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException, Producer

from eventhandler.dlq import ReplayRows
from eventhandler.errors import BrokerUnavailable, DatabaseUnavailable
from eventhandler.events import DLQ_ID_HEADER, ORIGIN_HEADER, REPLAY_COUNT_HEADER, origin_header
from eventhandler.librdkafka import RawProducer, raw_header_key
from eventhandler.metrics import Metrics
from eventhandler.models import DLQEntry, DLQFilter, DLQSummary, Headers

CHUNK = 200
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


def replay_headers(entry: DLQEntry) -> Headers:
    """The original headers, byte for byte, plus the row's id, the original message's coordinates and
    the replay count (replacing older ones)."""
    headers: Headers = [(k, v) for k, v in entry.headers if k not in _OUR_HEADERS]
    headers += origin_header(entry.dlq_id, entry.source_topic, entry.source_partition, entry.source_offset)
    headers.append((REPLAY_COUNT_HEADER, str(entry.replay_count + 1).encode()))
    return headers


def replay_message(entry: DLQEntry) -> tuple[bytes | None, Headers]:
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
        # With a rate, smaller chunks keep each lease short (about ten seconds of sending).
        chunk_size = CHUNK if not rate else max(1, min(CHUNK, int(rate * 10)))
        try:
            with self._rows.lease() as lease:
                for start in range(0, len(ids), chunk_size):
                    chunk = ids[start : start + chunk_size]
                    done, failed = self._replay_chunk(
                        producer, raw, flt, chunk, lease, to_topic, limiter, rate, actor
                    )
                    report.published_ids += done
                    report.published += len(done)
                    report.failed += len(failed)
                    report.failures.update(failed)
                    if self._metrics is not None:
                        self._metrics.replay_published.inc(len(done))
                        self._metrics.replay_failed.inc(len(failed))
                    if progress is not None:
                        progress(len(chunk))
                    if failed and not done:  # the broker took none of a chunk: the rest would fare the same
                        break
        finally:
            producer.flush(5)
            raw.close()
        return report  # the service logs the outcome with the audit line

    def _replay_chunk(
        self,
        producer: Producer,
        raw: _RawPublisher,
        flt: DLQFilter,
        chunk: list[int],
        lease: int,
        to_topic: str | None,
        limiter: RateLimiter,
        rate: float | None,
        actor: str,
    ) -> tuple[list[int], dict[int, str]]:
        """Take the chunk's rows (a short transaction), publish them with no transaction open, then
        mark the confirmed ones and free the rest (another short transaction)."""
        lease_seconds = self._delivery_timeout + (len(chunk) / rate if rate else 0) + 60
        if not self._rows.lease_held(lease):
            raise DatabaseUnavailable(
                "the replay lost its lease (its PostgreSQL connection dropped); the rows it did not "
                "publish are still pending: run it again"
            )
        rows, taken_at = self._rows.take(
            flt.model_copy(update={"ids": tuple(chunk)}),
            limit=len(chunk),
            lease=lease,
            lease_seconds=lease_seconds,
        )
        if not rows:
            return [], {}
        delivered, failed = self._publish(producer, raw, rows, to_topic, limiter)
        published: dict[str, list[int]] = {}
        for row in rows:
            if row.dlq_id in delivered:
                published.setdefault(to_topic or row.source_topic, []).append(row.dlq_id)
        done = [row.dlq_id for row in rows if row.dlq_id in delivered]
        self._rows.finish(
            lease=lease,
            taken_at=taken_at,
            published=published,
            unpublished=[row.dlq_id for row in rows if row.dlq_id not in delivered],
            actor=actor,
            detail={"to_topic": to_topic, "failed": len(failed)},
        )
        return done, failed

    def _publish(
        self,
        producer: Producer,
        raw: _RawPublisher,
        rows: list[DLQEntry],
        to_topic: str | None,
        limiter: RateLimiter,
    ) -> tuple[set[int], dict[int, str]]:
        delivered: set[int] = set()
        failed: dict[int, str] = {}

        def on_delivery(dlq_id: int) -> Callable[[Any, Any], None]:
            def report(err: Any, _msg: Any) -> None:
                if err is None:
                    delivered.add(dlq_id)
                else:
                    failed[dlq_id] = err.str()

            return report

        for row in rows:
            limiter.wait()
            topic = to_topic or row.source_topic
            value, headers = replay_message(row)
            if not _utf8_keys(headers):
                refused = raw.publish(row.dlq_id, topic, value, row.message_key, headers)
                if refused is not None:
                    failed[row.dlq_id] = refused
                continue
            while True:
                try:
                    producer.produce(
                        topic,
                        value=value,
                        key=row.message_key,
                        headers=headers,  # type: ignore[arg-type]  # list is invariant
                        on_delivery=on_delivery(row.dlq_id),
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
                except KafkaException as exc:
                    failed[row.dlq_id] = exc.args[0].str()
                    break
            producer.poll(0)
        producer.flush(self._delivery_timeout)
        raw.settle(self._delivery_timeout, delivered, failed)
        for row in rows:
            if row.dlq_id not in delivered and row.dlq_id not in failed:
                failed[row.dlq_id] = "delivery not confirmed before the timeout (outcome unknown)"
        return delivered, failed

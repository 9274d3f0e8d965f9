"""Replay: republish DLQ rows to Kafka, exactly as they were consumed, and mark them `replayed`.

Rows are taken in chunks, each claimed for the replay's lease in a short transaction (see
`dlq.replays`), so two replayers never publish the same row, and no transaction stays open while the
rate limiter or the broker is waited on: the worker, which updates replayed rows, is never held up by
a replay. The producer is idempotent. A row is marked `replayed` only after the broker confirmed its
delivery: a replay killed part-way leaves the rest `pending` (its claims die with its lease's session)
and can simply be run again. A row whose delivery outcome was unknown may then be published twice; the
worker recognises the duplicate by its event id (or its `dlq_id` header) and applies it once. A row with
a header key that is not UTF-8 goes out through librdkafka's C API (`RawProducer`), since the Python
client cannot write one.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException, Producer

from eventhandler.dlq import ReplayRows
from eventhandler.errors import BrokerUnavailable, DatabaseUnavailable
from eventhandler.events import DLQ_ID_HEADER, ORIGIN_HEADER, REPLAY_COUNT_HEADER, origin_header
from eventhandler.librdkafka import RawPublisher
from eventhandler.metrics import Metrics
from eventhandler.models import DLQEntry, DLQFilter, DLQSummary, Headers, OutgoingRow

CHUNK = 1000  # rows a lease takes at once
WINDOW = 4  # chunks taken and not yet marked: the next ones are sent while the first are confirmed and marked
MARKERS = 2  # chunks marked at once: a mark is mostly PostgreSQL's work, and one thread left it waiting
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
    deadline: float = 0.0  # monotonic time after which an unconfirmed row counts as failed

    @property
    def settled(self) -> bool:
        return len(self.delivered) + len(self.failed) >= len(self.rows) or time.monotonic() >= self.deadline

    def outcome(self) -> _Outcome:
        """What the broker made of the rows, fixed when the chunk is handed over to be marked (a late
        delivery report changes nothing after that)."""
        published: dict[str, list[int]] = {}
        for row in self.rows:
            if row.dlq_id in self.delivered:
                published.setdefault(self.topics[row.dlq_id], []).append(row.dlq_id)
        failed = {
            row.dlq_id: self.failed.get(
                row.dlq_id, "delivery not confirmed before the timeout (outcome unknown)"
            )
            for row in self.rows
            if row.dlq_id not in self.delivered
        }
        done = [row.dlq_id for row in self.rows if row.dlq_id in self.delivered]
        return _Outcome(published, done, failed)


@dataclass(frozen=True)
class _Outcome:
    published: dict[str, list[int]]  # topic → ids the broker confirmed
    done: list[int]  # the same ids, in the chunk's order (oldest first)
    failed: dict[int, str]  # dlq_id → why it was not confirmed


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
        one chunk and PostgreSQL marks another, the next is taken and sent (at most `WINDOW` taken and
        not yet marked); a chunk is marked once all its delivery reports are in, in order, so a row is
        `replayed` only after the broker took it, and no transaction is open while the broker or the
        rate limiter is waited on."""
        report = ReplayReport()
        # The ids are read once, oldest first; each chunk is then taken by id (an index lookup,
        # whatever the table's statistics say) with the filter applied again, so a row another
        # replayer took, or that changed meanwhile, is skipped.
        ids = self._rows.matching_ids(flt, limit=limit)
        report.matched = len(ids)
        if not ids:
            return report
        producer = self.connect()
        raw = RawPublisher(self._producer_config | {"message.timeout.ms": int(self._delivery_timeout * 1000)})
        limiter = RateLimiter(rate)
        # With a rate, a chunk is about a second of sending: leases stay short and rows are marked
        # (and the progress moves) as they go.
        size = CHUNK if not rate else max(1, min(CHUNK, int(rate)))
        lease_seconds = self._delivery_timeout + (size * WINDOW / rate if rate else 0) + 60
        flying: deque[_Chunk] = deque()  # sent, waiting for their delivery reports
        marking: deque[tuple[_Chunk, _Outcome, Future[None]]] = deque()  # handed over to be marked
        stop = False

        def settle(wait_for_all: bool) -> None:
            """Hand the chunks whose reports are all in over to be marked, and account for the marked
            ones in order; wait while the window is full (or for all). Once a chunk came back with
            nothing delivered, `stop`: the rest would fare the same."""
            nonlocal stop
            while flying or marking:
                producer.poll(0)
                while flying and flying[0].settled:
                    head = flying.popleft()
                    outcome = head.outcome()
                    marked = marker.submit(in_context(), self._mark, head, outcome, lease, actor, to_topic)
                    marking.append((head, outcome, marked))
                    stop = stop or (bool(outcome.failed) and not outcome.done)
                while marking and marking[0][2].done():
                    chunk, outcome, marked = marking.popleft()
                    marked.result()  # the marking thread's error, if it had one
                    self._account(outcome, report)
                    if progress is not None:
                        progress(chunk.size)
                if not wait_for_all and len(flying) + len(marking) < WINDOW:
                    return
                if flying:
                    producer.poll(0.01)  # delivery reports
                elif marking:
                    wait([marking[0][2]], timeout=0.05)

        def take(chunk_ids: list[int]) -> _Chunk:
            """On the taking thread: the chunk's rows, claimed for the lease (a short transaction)."""
            if not self._rows.lease_held(lease):
                raise DatabaseUnavailable(
                    "the replay lost its lease (its PostgreSQL connection dropped); the rows it did not "
                    "publish are still pending: run it again"
                )
            rows, claim = self._rows.take(
                flt.model_copy(update={"ids": tuple(chunk_ids)}),
                limit=len(chunk_ids),
                lease=lease,
                lease_seconds=lease_seconds,
            )
            return _Chunk(rows, claim, len(chunk_ids))

        # Takes and marks run on threads of their own, so that PostgreSQL claims the next chunks and
        # marks the last ones while this thread sends (benchmarks/README.md). Takes go in order;
        # marks may finish out of order, and are accounted for in order. The window counts a chunk
        # from its take until it is marked. (On an error, the takes and marks handed over still
        # finish before the lease is let go; a claim not sent dies with the lease.) Each runs in a
        # copy of this thread's context: the audit rows name the request or CLI run (`logs`).
        def in_context() -> Callable[..., Any]:
            return contextvars.copy_context().run

        taking: deque[Future[_Chunk]] = deque()
        starts = iter(range(0, len(ids), size))
        try:
            with (
                self._rows.lease() as lease,
                ThreadPoolExecutor(1, "replay-take") as taker,
                ThreadPoolExecutor(MARKERS, "replay-mark") as marker,
            ):
                while not stop:
                    while len(taking) + len(flying) + len(marking) < WINDOW:
                        start = next(starts, None)
                        if start is None:
                            break
                        taking.append(taker.submit(in_context(), take, ids[start : start + size]))
                    if not taking:
                        break
                    chunk = taking.popleft().result()
                    self._send(producer, raw, chunk, to_topic, limiter)
                    flying.append(chunk)
                    settle(wait_for_all=False)
                settle(wait_for_all=True)
        finally:
            producer.flush(5)
            raw.close()
        return report  # the service logs the outcome with the audit line

    def _send(
        self,
        producer: Producer,
        raw: RawPublisher,
        chunk: _Chunk,
        to_topic: str | None,
        limiter: RateLimiter,
    ) -> None:
        """Hand the chunk's rows to the producer."""
        delivered, failed = chunk.delivered, chunk.failed

        for row in chunk.rows:
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
        chunk.deadline = time.monotonic() + self._delivery_timeout + 5

    def _mark(self, chunk: _Chunk, outcome: _Outcome, lease: int, actor: str, to_topic: str | None) -> None:
        """On a marking thread: mark the rows the broker confirmed and end the chunk's claim (which
        frees the others), with the audit row."""
        if chunk.claim is None:
            return
        self._rows.finish(
            lease=lease,
            claim=chunk.claim,
            published=outcome.published,
            actor=actor,
            detail={"to_topic": to_topic, "failed": len(outcome.failed)},
        )

    def _account(self, outcome: _Outcome, report: ReplayReport) -> None:
        report.published_ids += outcome.done
        report.published += len(outcome.done)
        report.failed += len(outcome.failed)
        report.failures.update(outcome.failed)
        if self._metrics is not None:
            self._metrics.replay_published.inc(len(outcome.done))
            self._metrics.replay_failed.inc(len(outcome.failed))


def _reporter(dlq_id: int, delivered: set[int], failed: dict[int, str]) -> Callable[[Any, Any], None]:
    """The delivery callback of one row's message."""

    def report(err: Any, _msg: Any) -> None:
        if err is None:
            delivered.add(dlq_id)
        else:
            failed[dlq_id] = err.str()

    return report

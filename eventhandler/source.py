"""The Kafka side of the worker, `KafkaSource`: a thin confluent-kafka consumer handing out batches of
`Record`s, positions from PostgreSQL on assignment, pause/resume while a failure is retried, and
offsets committed to Kafka only for visibility.

The authoritative position of each partition is the `consumer_positions` row written in the same
transaction as the batch; the offsets committed to Kafka trail it and exist so that standard lag
tools work. Should PostgreSQL be unreachable when partitions are assigned, the partitions stay paused
until their positions can be read.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

from eventhandler.batch import TP, Record
from eventhandler.errors import BrokerUnavailable, TransientError
from eventhandler.librdkafka import fetch_headers, header_key
from eventhandler.logs import get_logger
from eventhandler.metrics import Metrics

PositionLoader = Callable[[Sequence[TP]], dict[TP, int]]

log = get_logger("eventhandler.source")
_ERROR_LOG_INTERVAL = 30.0
_PROBE_INTERVAL = 5.0
_WATERMARK_REFRESH_INTERVAL = 5.0
_WATERMARK_TIMEOUT = 1.0
_LAG_INTERVAL = 1.0


# `Message.headers()` returns a list holding a NULL key, with its UnicodeDecodeError still set, when a
# key is not UTF-8. Called as `message.headers()` in a hot loop, CPython's specialised call skips the
# check that turns that into an exception, and the next call into C fails instead; a call through the C
# API (as methodcaller makes it) checks the result and raises SystemError here, where it is handled.
_headers_of = operator.methodcaller("headers")


def is_incremental(config: dict[str, Any]) -> bool:
    """Whether the group's rebalances are incremental (cooperative) rather than eager."""
    if str(config.get("group.protocol", "classic")).lower() == "consumer":
        return True
    return "cooperative" in str(config.get("partition.assignment.strategy", ""))


class KafkaSource:
    def __init__(
        self,
        config: dict[str, Any],
        topics: Sequence[str],
        *,
        load_positions: PositionLoader,
        metrics: Metrics,
    ) -> None:
        self._config = dict(config)
        self.topics = list(topics)
        self._load_positions = load_positions
        self._metrics = metrics
        # told of every revocation before it takes effect (the worker sets it)
        self.on_revoked: Callable[[set[TP]], None] = lambda _: None
        self._client: Consumer | None = None
        self.assignment: set[TP] = set()
        self.positions: dict[TP, int] = {}  # next offset to process, as PostgreSQL has it
        self.high_watermarks: dict[TP, int] = {}  # asked of the broker while paused
        self.lags: dict[TP, int] = {}  # see `update_lag`, and `current_lags` for the scrape thread
        self._watermarks_at = 0.0
        self._lag_at = 0.0
        self.unpositioned: set[TP] = set()  # assigned, paused until PostgreSQL tells their position
        self.paused = False
        self.broker_error: str | None = None
        self.assigned_at = 0.0  # time.monotonic() of the last assignment
        # Under the KIP-848 protocol (`group.protocol=consumer`) the session timeout is the broker's
        # (`group.consumer.session.timeout.ms`, 45 s by default) and the client may not set it.
        self.session_timeout_ms = int(self._config.get("session.timeout.ms", 45000))
        self._error_logged: dict[int, float] = {}
        self._last_probe = 0.0
        # With cooperative-sticky, and always under KIP-848, rebalance callbacks carry only the
        # partitions that move, and must be answered with incremental_assign/incremental_unassign.
        self._incremental = is_incremental(self._config)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        config = self._config | {"error_cb": self._on_error, "logger": logging.getLogger("librdkafka")}
        self._client = Consumer(config)
        self._client.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except KafkaException as exc:
                log.warning("consumer_close_failed", error=str(exc))
            self._client = None

    @property
    def client(self) -> Consumer:
        if self._client is None:
            raise RuntimeError("the Kafka client is not started")
        return self._client

    # -- consuming ---------------------------------------------------------------------------------

    def consume(self, max_messages: int, timeout: float) -> list[Record]:
        if self.unpositioned:
            self.reposition()
        messages = self.client.consume(num_messages=max_messages, timeout=timeout)
        records: list[Record] = []
        append = records.append
        held: dict[TP, int] = {}  # partitions to read again from this offset
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_message_error(error)
                continue
            if held and (message.topic(), message.partition()) in held:
                continue
            try:
                headers: Any = _headers_of(message)
            except (SystemError, UnicodeDecodeError):  # a header key that is not UTF-8
                headers = self._raw_headers(message)
                if headers is None:
                    held[(message.topic(), message.partition())] = message.offset()  # type: ignore[index,assignment]
                    continue
            _, timestamp = message.timestamp()
            append(
                Record(
                    message.topic(),  # type: ignore[arg-type]  # set on every non-error message
                    message.partition(),  # type: ignore[arg-type]
                    message.offset(),  # type: ignore[arg-type]
                    message.key(),
                    message.value(),
                    headers,  # values are bytes as consumed
                    timestamp,
                )
            )
        for (topic, partition), offset in held.items():
            self.client.seek(TopicPartition(topic, partition, offset))
        if records:
            self.broker_error = None
        elif self.broker_error is not None:
            self._probe_broker()
        self.update_lag()
        return records

    def _raw_headers(self, message: Any) -> list[tuple[str, bytes | None]] | None:
        """The headers of a message whose keys the Python client cannot decode, read again through
        librdkafka (keys that are not UTF-8 kept byte for byte as lone surrogates); None when that
        fails, and the partition is then read again from this message."""
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        try:
            raw = fetch_headers(self._config, topic, partition, offset)
        except BrokerUnavailable as exc:
            log.warning(
                "raw_headers_unavailable", topic=topic, partition=partition, offset=offset, error=str(exc)
            )
            return None
        except Exception as exc:  # librdkafka's C API not usable here: process it without its headers
            log.error(
                "raw_headers_unreadable", topic=topic, partition=partition, offset=offset, error=str(exc)
            )
            return []
        log.info("raw_headers_read", topic=topic, partition=partition, offset=offset, headers=len(raw))
        return [(header_key(key), value) for key, value in raw]

    def _probe_broker(self) -> None:
        """An idle worker learns that the broker is back (librdkafka reports errors, not recoveries)."""
        now = time.monotonic()
        if now - self._last_probe < _PROBE_INTERVAL:
            return
        self._last_probe = now
        try:
            self.client.list_topics(timeout=2)
        except KafkaException:
            return
        self.broker_error = None

    def poll_while_paused(self, timeout: float) -> None:
        """Serve group membership and rebalance callbacks while processing is held."""
        self._refresh_watermarks()
        self.update_lag()
        message = self.client.poll(timeout)
        if message is not None and message.error() is None:
            # Fetched before the pause took effect: rewind so it is read again after resuming.
            self.client.seek(
                TopicPartition(message.topic(), message.partition(), message.offset())  # type: ignore[arg-type]
            )

    def commit_offsets(self, positions: dict[TP, int]) -> None:
        """Tell Kafka how far we are (asynchronously; PostgreSQL already has it durably)."""
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items() if (t, p) in self.assignment]
        for offset in offsets:
            self.positions[(offset.topic, offset.partition)] = offset.offset
        if offsets:
            try:
                self.client.commit(offsets=offsets, asynchronous=True)
            except KafkaException as exc:
                log.warning("kafka_commit_failed", error=str(exc))

    def _refresh_watermarks(self) -> None:
        """Paused partitions are not fetched, so librdkafka's cached high watermarks stop moving: while
        the worker holds (an outage), ask the broker every few seconds so the lag keeps growing."""
        now = time.monotonic()
        if now - self._watermarks_at < _WATERMARK_REFRESH_INTERVAL:
            return
        self._watermarks_at = now
        for topic, partition in sorted(self.assignment):
            try:
                _, high = self.client.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=_WATERMARK_TIMEOUT, cached=False
                )
            except KafkaException:
                return  # the broker is away too; the cached values stay
            self.high_watermarks[(topic, partition)] = high

    def current_lags(self) -> dict[TP, int]:
        """The last lag snapshot (read by the metrics scrape, on another thread)."""
        return self.lags

    def update_lag(self) -> None:
        """Recompute `lags`, at most once a `_LAG_INTERVAL`, on the loop's thread: confluent-kafka lets
        no other thread call into a consumer while `consume` waits, so a scrape only reads the result.

        Per assigned partition: high watermark minus the stored position, from the watermarks librdkafka
        keeps from its fetches (no request to the broker). A partition with no stored position yet
        counts from its low watermark, where `auto.offset.reset=earliest` starts."""
        now = time.monotonic()
        if now - self._lag_at < _LAG_INTERVAL or self._client is None:
            return
        self._lag_at = now
        lags: dict[TP, int] = {}
        for topic, partition in sorted(self.assignment):
            try:
                low, high = self._client.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            high = max(high, self.high_watermarks.get((topic, partition), -1))
            position = self.positions.get((topic, partition), low)
            if high >= 0 and position >= 0:
                lags[(topic, partition)] = max(0, high - position)
        self.lags = lags  # replaced whole: the scrape thread reads one snapshot or the next

    # -- pause / resume ------------------------------------------------------------------------------

    def pause_all(self) -> None:
        partitions = self._partitions(self.assignment)
        if partitions:
            self.client.pause(partitions)
        self.paused = True
        self._metrics.paused_partitions.set(len(partitions))

    def resume_all(self) -> None:
        resumable = self.assignment - self.unpositioned
        if resumable:
            self.client.resume(self._partitions(resumable))
        self.paused = False
        self._metrics.paused_partitions.set(len(self.unpositioned))

    def reposition(self) -> None:
        """Read the stored positions of partitions assigned while PostgreSQL was unreachable."""
        pending = sorted(self.unpositioned & self.assignment)
        try:
            positions = self._load_positions(pending)
        except TransientError:
            return
        for tp in pending:
            offset = positions.get(tp)
            if offset is not None:
                self.client.seek(TopicPartition(tp[0], tp[1], offset))
                self.positions[tp] = offset
        self.unpositioned -= set(pending)
        if not self.paused:
            self.client.resume(self._partitions(pending))
        self._metrics.paused_partitions.set(len(self.assignment) if self.paused else len(self.unpositioned))
        log.info("partitions_repositioned", partitions=len(pending))

    # -- rebalance callbacks (run inside consume/poll) -------------------------------------------------

    def _on_assign(self, client: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        try:
            positions = self._load_positions(tps)
            unknown: set[TP] = set()
        except TransientError as exc:
            log.warning("positions_unavailable", error=str(exc), partitions=len(tps))
            positions, unknown = {}, set(tps)
        for partition in partitions:
            partition.offset = positions.get((partition.topic, partition.partition), OFFSET_INVALID)
        self.positions.update(positions)
        if self._incremental:
            client.incremental_assign(partitions)
        else:
            client.assign(partitions)
        self.assignment |= set(tps)
        self.unpositioned |= unknown
        self.assigned_at = time.monotonic()
        self.broker_error = None
        hold = [p for p in partitions if self.paused or (p.topic, p.partition) in unknown]
        if hold:
            client.pause(hold)
        # librdkafka keeps a partition's pause across a revoke: one paused while a batch was held
        # (an outage, an open circuit) and assigned again would never deliver.
        flowing = [p for p in partitions if not (self.paused or (p.topic, p.partition) in unknown)]
        if flowing:
            client.resume(flowing)
        self._metrics.rebalances.labels(kind="assign").inc()
        self._metrics.assigned_partitions.set(len(self.assignment))
        log.info("partitions_assigned", partitions=sorted(f"{t}[{p}]" for t, p in tps), stored=len(positions))

    def _on_revoke(self, client: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, "revoke")
        if self._incremental:
            client.incremental_unassign(partitions)
        else:
            client.unassign()

    def _on_lost(self, client: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, "lost")

    def _drop(self, partitions: list[TopicPartition], kind: str) -> None:
        tps = {(p.topic, p.partition) for p in partitions}
        self.assignment -= tps
        self.unpositioned -= tps
        for tp in tps:
            self.positions.pop(tp, None)
            self.high_watermarks.pop(tp, None)
        self.lags = {tp: lag for tp, lag in self.lags.items() if tp not in tps}
        self.on_revoked(tps)
        self._metrics.rebalances.labels(kind=kind).inc()
        self._metrics.assigned_partitions.set(len(self.assignment))
        log.info("partitions_revoked", kind=kind, partitions=sorted(f"{t}[{p}]" for t, p in tps))

    def _on_error(self, error: KafkaError) -> None:
        self.broker_error = error.str()
        # librdkafka repeats a connection error every few milliseconds; one line per code per interval.
        now = time.monotonic()
        if error.fatal() or now - self._error_logged.get(error.code(), -1e9) >= _ERROR_LOG_INTERVAL:
            self._error_logged[error.code()] = now
            level = "error" if error.fatal() else "warning"
            getattr(log, level)("kafka_error", code=error.name(), error=error.str())

    def _on_message_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise BrokerUnavailable(error.str())
        now = time.monotonic()
        if now - self._error_logged.get(error.code(), -1e9) >= _ERROR_LOG_INTERVAL:
            self._error_logged[error.code()] = now  # e.g. a topic that does not exist: once per interval
            log.warning("kafka_message_error", code=error.name(), error=error.str())

    @staticmethod
    def _partitions(tps: set[TP] | Sequence[TP]) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in tps]

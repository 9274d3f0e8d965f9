"""The two baselines the worker is measured against, on the same topic in the same run.

- The raw ceiling: confluent-kafka `consume()` in batches plus the worker's own `Deserializer` (the
  same pydantic models), nothing else. No Python worker that validates its input can beat it.
- The naive worker: what one writes first — one message at a time, one upsert and one PostgreSQL
  commit per message, offsets auto-committed. Its guarantees are weaker (no ledger, no DLQ, no
  stored positions), which only makes it a kinder baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition

from benchmarks.probes import Clock
from benchmarks.services import unique
from eventhandler.events import Deserializer
from eventhandler.example.devices import DEVICE_READING, DEVICE_REGISTERED
from eventhandler.handlers.loading import load_registry

# One statement per reading: count it on its device and upsert the latest value (the same two
# effects the worker's projection has), then one commit.
NAIVE_READING = """
WITH counted AS (
    UPDATE devices SET reading_count = reading_count + 1, updated_at = now()
    WHERE device_id = %(device_id)s AND status = 'active'
    RETURNING device_id
)
INSERT INTO device_latest_readings (device_id, metric, value, unit, observed_at, event_id)
SELECT device_id, %(metric)s, %(value)s, %(unit)s, %(at)s, %(event_id)s FROM counted
ON CONFLICT (device_id, metric) DO UPDATE SET
    value = EXCLUDED.value, unit = EXCLUDED.unit, observed_at = EXCLUDED.observed_at,
    event_id = EXCLUDED.event_id
WHERE EXCLUDED.observed_at >= device_latest_readings.observed_at
"""
NAIVE_REGISTER = """
INSERT INTO devices (device_id, name, site, registered_at) VALUES (%(device_id)s, %(name)s, %(site)s, %(at)s)
ON CONFLICT (device_id) DO UPDATE SET name = EXCLUDED.name, site = EXCLUDED.site, updated_at = now()
"""


def _consumer(bootstrap: str, topic: str, partitions: int, **config: Any) -> Consumer:
    """Assigned, not subscribed: a baseline has no group to join, so nothing to subtract."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("bench-baseline"),
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
        | config
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    return consumer


def _deserializer() -> Deserializer:
    return Deserializer(load_registry([]).payload_models)


def raw_ceiling(
    bootstrap: str, topic: str, partitions: int, total: int, batch: int, timeout: float = 120
) -> Clock:
    """Consume `total` messages `batch` at a time and validate each one; no database."""
    deserialize = _deserializer()
    consumer = _consumer(bootstrap, topic, partitions, **{"enable.auto.commit": False})
    clock = Clock()
    deadline = time.monotonic() + timeout
    try:
        while clock.total < total and time.monotonic() < deadline:
            messages = consumer.consume(num_messages=batch, timeout=0.5)
            valid = 0
            for message in messages:
                if message.error() is None:
                    deserialize(message.value(), message.headers())  # type: ignore[arg-type]  # bytes as consumed
                    valid += 1
            if valid:
                clock.mark(valid)
    finally:
        consumer.close()
    if clock.total < total:
        raise RuntimeError(f"raw consumer read {clock.total} of {total} messages before its deadline")
    return clock


def naive_worker(
    bootstrap: str, topic: str, partitions: int, database_url: str, limit: int, timeout: float = 300
) -> Clock:
    """The first `limit` messages of the topic, one poll, one statement and one commit each."""
    deserialize = _deserializer()
    consumer = _consumer(bootstrap, topic, partitions, **{"enable.auto.commit": True})
    clock = Clock()
    deadline = time.monotonic() + timeout
    try:
        with psycopg.connect(database_url) as conn:
            handle = _naive_handler(conn)
            while clock.total < limit and time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if message is None or message.error() is not None:
                    continue
                handle(deserialize(message.value(), message.headers()))  # type: ignore[arg-type]
                conn.commit()
                clock.mark(1)
    finally:
        consumer.close()
    if clock.total < limit:
        raise RuntimeError(f"naive worker handled {clock.total} of {limit} messages before its deadline")
    return clock


def _naive_handler(conn: psycopg.Connection[Any]) -> Callable[[Any], None]:
    def handle(event: Any) -> None:
        data = event.data
        if event.type == DEVICE_READING:
            conn.execute(
                NAIVE_READING,
                {
                    "device_id": data.device_id,
                    "metric": data.metric,
                    "value": data.value,
                    "unit": data.unit,
                    "at": event.time,
                    "event_id": event.id,
                },
            )
        elif event.type == DEVICE_REGISTERED:
            conn.execute(
                NAIVE_REGISTER,
                {"device_id": data.device_id, "name": data.name, "site": data.site, "at": event.time},
            )

    return handle

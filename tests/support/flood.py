"""A systemic failure for the flood guard's tests: a stream whose every event fails alike, and its fix."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.support import kafka as k

DEVICES = 60
READINGS_EACH = 25
TOTAL = DEVICES * READINGS_EACH
MIN_FAILURES = 50  # the default threshold


def send_readings_for_unregistered_devices(bootstrap: str, topic: str) -> None:
    """A stream whose every event fails alike: readings of devices whose registrations are missing
    (as after a deploy that lost them), keyed by device, over all partitions."""
    producer = k.TestProducer(bootstrap)
    for n in range(READINGS_EACH):
        producer.send_events(topic, [k.reading(f"flood-{d}", value=n) for d in range(DEVICES)])
    producer.flush()


def register_the_devices(db: psycopg.Connection[Any]) -> None:
    """The fix: what the events need is there now."""
    db.execute(
        "INSERT INTO devices (device_id, name, status, reading_count)"
        " SELECT 'flood-' || n, 'repaired', 'active', 0 FROM generate_series(0, %s) AS n",
        (DEVICES - 1,),
    )

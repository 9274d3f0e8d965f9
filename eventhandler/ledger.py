"""The worker's own bookkeeping in PostgreSQL, written in each batch's transaction.

- `consumer_positions`: the next offset to read per partition. Because it commits together with the
  batch's projection writes and DLQ rows, a worker that restarts (or takes over a partition) resumes
  exactly after the last batch that took effect.
- `applied_events`: the (source, id) of every event applied, so a duplicate published by a producer
  retry or a replay is recognised and skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from eventhandler.db import translate_db_errors

CLAIM_EVENTS = """
INSERT INTO applied_events (consumer, event_source, event_id)
SELECT %s, * FROM unnest(%s::text[], %s::text[])
ON CONFLICT DO NOTHING
RETURNING event_source, event_id
"""
RELEASE_EVENTS = """
DELETE FROM applied_events
WHERE consumer = %s AND (event_source, event_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
"""
SAVE_POSITIONS = """
INSERT INTO consumer_positions (consumer, topic, partition, next_offset)
SELECT %s, * FROM unnest(%s::text[], %s::int[], %s::bigint[])
ON CONFLICT (consumer, topic, partition) DO UPDATE SET
    next_offset = EXCLUDED.next_offset, updated_at = now()
"""
LOAD_POSITIONS = """
SELECT topic, partition, next_offset FROM consumer_positions
WHERE consumer = %s AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[]))
"""

EventKey = tuple[str, str]  # (source, id): unique per CloudEvents 1.0


class Ledger:
    def __init__(self, consumer: str) -> None:
        self.consumer = consumer

    def claim(self, conn: psycopg.Connection[Any], keys: Sequence[EventKey]) -> set[EventKey]:
        """Record `keys` as applied; returns the ones that were new (the rest are duplicates).

        Claiming first, in the batch's transaction, also makes a concurrent duplicate wait for the
        transaction that claimed it, instead of both applying it.
        """
        if not keys:
            return set()
        with translate_db_errors():
            rows = conn.execute(
                CLAIM_EVENTS, (self.consumer, [k[0] for k in keys], [k[1] for k in keys])
            ).fetchall()
        return {(source, event_id) for source, event_id in rows}

    def release(self, conn: psycopg.Connection[Any], keys: Iterable[EventKey]) -> None:
        """Forget claims of events that failed after all, so a replay of them can apply."""
        keys = list(keys)
        if keys:
            with translate_db_errors():
                conn.execute(RELEASE_EVENTS, (self.consumer, [k[0] for k in keys], [k[1] for k in keys]))

    def save_positions(self, conn: psycopg.Connection[Any], positions: dict[tuple[str, int], int]) -> None:
        if positions:
            with translate_db_errors():
                conn.execute(
                    SAVE_POSITIONS,
                    (
                        self.consumer,
                        [t for t, _ in positions],
                        [p for _, p in positions],
                        list(positions.values()),
                    ),
                )

    def load_positions(
        self, conn: psycopg.Connection[Any], partitions: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        if not partitions:
            return {}
        with translate_db_errors():
            rows = conn.execute(
                LOAD_POSITIONS, (self.consumer, [t for t, _ in partitions], [p for _, p in partitions])
            ).fetchall()
        return {(topic, partition): offset for topic, partition, offset in rows}

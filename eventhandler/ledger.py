"""The worker's own bookkeeping in PostgreSQL, written in each batch's transaction.

- `consumer_positions`: the next offset to read per partition. Because it commits together with the
  batch's projection writes and DLQ rows, a worker that restarts (or takes over a partition) resumes
  exactly after the last batch that took effect.
- `applied_events`: a digest of (consumer, source, id) of every event applied, so a duplicate published
  by a producer retry or a replay is recognised and skipped. The 128-bit digest keeps the index small
  and the claim fast; it is computed here, so the SQL never sees the text twice.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import psycopg
import psycopg_pool

from eventhandler.db import classify, deadline, translate_db_errors
from eventhandler.errors import EventHandlerError, TransientError
from eventhandler.logs import get_logger

log = get_logger("eventhandler.ledger")

# The batch's keys arrive as one bytea of 16-byte digests (dumped once, not key by key), and the answer
# is one value: NULL when every key was new (the usual case), else the new ones (benchmarks/README.md).
CLAIM_EVENTS = """
WITH claimed AS (
    INSERT INTO applied_events (event_key, consumer)
    SELECT encode(substring(%(keys)b::bytea FROM 16 * i + 1 FOR 16), 'hex')::uuid, %(consumer)s
    FROM generate_series(0, %(count)s - 1) AS i
    ON CONFLICT DO NOTHING
    RETURNING event_key
)
SELECT CASE WHEN count(*) < %(count)s THEN coalesce(array_agg(uuid_send(event_key)), '{}') END FROM claimed
"""
RELEASE_EVENTS = """
DELETE FROM applied_events WHERE event_key = ANY(ARRAY(
    SELECT encode(substring(%(keys)b::bytea FROM 16 * i + 1 FOR 16), 'hex')::uuid
    FROM generate_series(0, %(count)s - 1) AS i
))
"""
SAVE_POSITIONS = """
INSERT INTO consumer_positions (consumer, topic, partition, next_offset)
SELECT %s, * FROM unnest(%b::text[], %b::int[], %b::bigint[])
ON CONFLICT (consumer, topic, partition) DO UPDATE SET
    next_offset = EXCLUDED.next_offset, updated_at = now()
"""
LOAD_POSITIONS = """
SELECT topic, partition, next_offset FROM consumer_positions
WHERE consumer = %s AND (topic, partition) IN (SELECT * FROM unnest(%b::text[], %b::int[]))
"""

# Never an event an open DLQ row holds (migration 0006): replaying that row must find it applied.
PRUNE = """
DELETE FROM applied_events WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM applied_events a
    WHERE consumer = %s AND applied_at < now() - make_interval(secs => %s)
      AND NOT EXISTS (
          SELECT 1 FROM dlq WHERE dlq.event_key = a.event_key AND dlq.status IN ('pending', 'replayed')
      )
    LIMIT %s
))
"""

EventKey = tuple[str, str]  # (source, id): unique per CloudEvents 1.0


def digest(consumer: str, key: EventKey) -> bytes:
    """The ledger's key of an event for a consumer group: 16 bytes of MD5 (a 128-bit digest, not for
    secrecy), stored as a `uuid`. Kept as bytes in Python: no UUID object per event."""
    text = f"{consumer}\x00{key[0]}\x00{key[1]}".encode("utf-8", "surrogatepass")
    return hashlib.md5(text, usedforsecurity=False).digest()


def _keys(keys: Sequence[bytes]) -> dict[str, Any]:
    """The keys as one bytea parameter, and how many there are."""
    return {"keys": b"".join(keys), "count": len(keys)}


class StoredPositions:
    """The consumed positions a worker resumes from, read when partitions are assigned. Whatever
    goes wrong is transient: the assignment is retried, never given up."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, ledger: Ledger, *, timeout: float) -> None:
        self._pool = pool
        self._ledger = ledger
        self._timeout = timeout

    def load(self, partitions: Any) -> dict[tuple[str, int], int]:
        try:
            with (
                translate_db_errors(),
                self._pool.connection(timeout=self._timeout) as conn,
                deadline(conn, self._timeout * 2),
            ):
                return self._ledger.load_positions(conn, list(partitions))
        except TransientError:
            raise
        except Exception as exc:
            raise TransientError(str(classify(exc))) from exc


class Ledger:
    def __init__(self, consumer: str) -> None:
        self.consumer = consumer

    def key(self, source: str, event_id: str) -> bytes:
        """The ledger key of an event for this consumer group (the worker computes it while decoding,
        off the transaction's path)."""
        return digest(self.consumer, (source, event_id))

    def claim(self, conn: psycopg.Connection[Any], keys: Sequence[bytes]) -> set[bytes]:
        """Record events (by `key`) as applied; returns the keys that were new (the rest are duplicates).

        Claiming first, in the batch's transaction, also makes a concurrent duplicate wait for the
        transaction that claimed it, instead of both applying it.
        """
        if not keys:
            return set()
        with translate_db_errors():
            row = conn.execute(CLAIM_EVENTS, _keys(keys) | {"consumer": self.consumer}).fetchone()
        assert row is not None  # an aggregate always answers one row
        return set(keys) if row[0] is None else set(row[0])  # NULL: every key was new

    def release(self, conn: psycopg.Connection[Any], keys: Sequence[bytes]) -> None:
        """Forget claims of events that failed after all, so a replay of them can apply."""
        if keys:
            with translate_db_errors():
                conn.execute(RELEASE_EVENTS, _keys(keys))

    def prune(self, conn: psycopg.Connection[Any], older_than_seconds: float, batch: int = 10_000) -> int:
        """Forget applied events older than the retention, a bounded batch at a time."""
        with translate_db_errors():
            return conn.execute(PRUNE, (self.consumer, older_than_seconds, batch)).rowcount

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


class LedgerPruner:
    """Keeps `applied_events` bounded: a duplicate older than the retention is no longer recognised,
    which is why the default (7 days) is far longer than any producer retry or replay takes."""

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool,
        ledger: Ledger,
        retention_seconds: float,
        interval: float = 600.0,
    ) -> None:
        self._pool = pool
        self._ledger = ledger
        self._retention = retention_seconds
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-pruner", daemon=True)

    def prune_once(self) -> int:
        total = 0
        try:
            while not self._stop.is_set():
                with self._pool.connection(timeout=10) as conn:
                    deleted = self._ledger.prune(conn, self._retention)
                total += deleted
                if deleted < 10_000:
                    break
        except (EventHandlerError, psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            log.warning("ledger_prune_failed", error=str(exc))
        if total:
            log.info("ledger_pruned", rows=total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.prune_once()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

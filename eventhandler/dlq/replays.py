"""A replay's hold on the rows it publishes.

A replay run holds a lease (a session advisory lock on a connection of its own); it claims a chunk of
rows for that lease in one short transaction (a row of `dlq_replay_claim` naming them: the DLQ rows
themselves are only read), publishes them with no transaction open, then, in another short one, marks
the rows the broker confirmed and ends the claim, which frees the rest, with the audit row. Two replays
never take the same row, and a replay that dies frees its rows with its session.

The statements are in `queries/dlq_replay.sql`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql

from eventhandler.db import own_connection, translate_db_errors
from eventhandler.dlq import rows
from eventhandler.dlq.rows import LEASE_CLASS, REPLAY
from eventhandler.librdkafka import header_key
from eventhandler.models import DLQFilter, OutgoingRow


class PostgresReplayRows:
    """The replayer's `ReplayRows` on a psycopg pool."""

    def __init__(self, pool: psycopg_pool.ConnectionPool) -> None:
        self._pool = pool

    def matching_ids(self, flt: DLQFilter, *, limit: int | None = None) -> list[int]:
        return rows.matching_ids(self._pool, flt, limit)

    @contextmanager
    def lease(self) -> Iterator[int]:
        """A lease for one replay run: a session advisory lock on a connection held for the run in
        autocommit (no transaction stays open on it), released when the block ends or the process dies.

        The connection is its own, not the pool's: concurrent replays (API requests) would otherwise
        hold every pooled connection and leave none for taking their rows."""
        with translate_db_errors(), own_connection(self._pool, autocommit=True) as conn:
            lease = 0
            try:
                while True:
                    lease = secrets.randbelow(2**31 - 2) + 1
                    row = conn.execute(
                        REPLAY["take_lease"], {"lease_class": LEASE_CLASS, "lease": lease}
                    ).fetchone()
                    if row and row[0]:
                        break
                yield lease
            finally:
                with suppress(psycopg.Error):  # a lost connection has released the lock already
                    conn.execute(REPLAY["release_lease"], {"lease_class": LEASE_CLASS, "lease": lease})

    def lease_held(self, lease: int) -> bool:
        """Whether the lease's session still holds it (a dropped connection has released it, and its
        rows are then free for another replayer)."""
        with translate_db_errors(), self._pool.connection() as conn:
            row = conn.execute(REPLAY["lease_held"], {"lease_class": LEASE_CLASS, "lease": lease}).fetchone()
        return bool(row and row[0])

    def take(
        self, flt: DLQFilter, *, limit: int, lease: int, lease_seconds: float
    ) -> tuple[list[OutgoingRow], int | None]:
        """Claim up to `limit` matching rows no live claim names, for `lease`, in one short
        transaction. Returns the rows and their claim (None: no row was free), which `finish` ends."""
        where, params = rows.where(flt, claim_free=True)
        query = sql.SQL(REPLAY["claim_rows"]).format(where=where)
        params |= {"limit": limit, "lease": lease, "lease_seconds": lease_seconds}
        lock = {"lease_class": LEASE_CLASS}
        with rows.transaction(self._pool) as conn:
            conn.execute(REPLAY["lock_claims"], lock)
            conn.execute(REPLAY["drop_dead_claims"], lock)
            claimed = conn.execute(query, params).fetchall()
        if not claimed:
            return [], None
        return [_outgoing(*r[1:]) for r in claimed], claimed[0][0]

    def finish(
        self,
        *,
        lease: int,
        claim: int,
        published: dict[str, list[int]],
        actor: str,
        detail: dict[str, Any],
    ) -> None:
        """After the publish: mark the rows the broker confirmed (`published`, by topic) and end the
        claim, which frees the others, with the audit row, in one short transaction."""
        ids = [dlq_id for topic_ids in published.values() for dlq_id in topic_ids]
        topics = [topic for topic, topic_ids in published.items() for _ in topic_ids]
        marks = {"claim": claim, "lease": lease, "ids": ids, "topics": topics}
        with rows.transaction(self._pool) as conn:
            # Planned for its arrays each time: a prepared statement's generic plan guesses ten
            # elements each and joins them row by row (120 ms a chunk of 1,000 instead of 20).
            conn.execute(REPLAY["mark_replayed"], marks, prepare=False)
            rows.audit(conn, actor, "replay", ids, detail)


def _outgoing(
    dlq_id: int,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    payload: bytes | None,
    edited: bytes | None,
    header_keys: list[str] | None,
    header_values: list[bytes | None] | None,
    header_keys_raw: list[bytes] | None,
    replay_count: int,
) -> OutgoingRow:
    """A taken row as it goes out (the header columns as `rows.entry` reads them)."""
    keys = (
        [header_key(bytes(k)) for k in header_keys_raw] if header_keys_raw is not None else header_keys or []
    )
    values = header_values or []
    return OutgoingRow(
        dlq_id,
        topic,
        partition,
        offset,
        None if key is None else bytes(key),
        None if payload is None else bytes(payload),
        None if edited is None else bytes(edited),
        [(k, None if v is None else bytes(v)) for k, v in zip(keys, values, strict=True)],
        replay_count,
    )

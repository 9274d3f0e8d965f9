"""The operators' side of the DLQ: reads (lists, rows, counts, error groups, depth) and changes
(resolve, discard, delete, purge), each change with its audit row in the same transaction.

The statements are in `queries/dlq_read.sql` and `queries/dlq_change.sql`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg_pool
from psycopg import sql
from psycopg.rows import dict_row

from eventhandler.db import deadline, translate_db_errors
from eventhandler.dlq import rows
from eventhandler.dlq.rows import CHANGE, ENTRY_COLUMNS, LEASE_CLASS, READ, REPLAY, SUMMARY_COLUMNS
from eventhandler.errors import InvalidOperation, NotFound
from eventhandler.models import (
    AuditEntry,
    DepthRow,
    DepthSnapshot,
    DLQEntry,
    DLQFilter,
    DLQSummary,
    FingerprintGroup,
    Status,
)

AUDITED_ROWS = 1000  # a delete's audit row names at most this many rows, and counts them all


class PostgresOperatorStore:
    """The operators' `OperatorStore` on a psycopg pool."""

    def __init__(self, pool: psycopg_pool.ConnectionPool) -> None:
        self._pool = pool

    # -- reading -----------------------------------------------------------------------------

    def list_rows(self, flt: DLQFilter, *, limit: int = 100, after_id: int | None = None) -> list[DLQSummary]:
        """Rows matching `flt` in dlq_id order, `limit` at a time after the cursor `after_id`."""
        where, params = rows.where(flt, after_id)
        query = sql.SQL(READ["list_rows"]).format(columns=SUMMARY_COLUMNS, where=where)
        with translate_db_errors(), self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            found = cur.execute(query, params | {"limit": limit}).fetchall()
        return [DLQSummary.model_validate(r) for r in found]

    def history(self, dlq_id: int) -> list[AuditEntry]:
        with translate_db_errors(), self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            found = cur.execute(READ["history"], {"id": dlq_id}).fetchall()
        return [AuditEntry.model_validate(r) for r in found]

    def matching_ids(self, flt: DLQFilter, *, limit: int | None = None) -> list[int]:
        return rows.matching_ids(self._pool, flt, limit)

    def count(self, flt: DLQFilter) -> int:
        return rows.count(self._pool, flt)

    def get(self, dlq_id: int) -> DLQEntry:
        query = sql.SQL(READ["get"]).format(columns=ENTRY_COLUMNS)
        with translate_db_errors(), self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(query, {"id": dlq_id}).fetchone()
        if row is None:
            raise NotFound(f"no DLQ row with id {dlq_id}")
        return rows.entry(row)

    def fingerprints(self, flt: DLQFilter) -> list[str]:
        """The failure groups among the rows `flt` matches."""
        where, params = rows.where(flt)
        query = sql.SQL(READ["fingerprints"]).format(where=where)
        with translate_db_errors(), self._pool.connection() as conn:
            return [r[0] for r in conn.execute(query, params).fetchall()]

    def entries(self, ids: Sequence[int], max_bytes: int | None = None) -> dict[int, DLQEntry]:
        """Whole rows by id (the ones that exist; see `rows.entries`)."""
        if not ids:
            return {}
        with translate_db_errors(), self._pool.connection() as conn:
            return rows.entries(conn, ids, max_bytes)

    def depth(self) -> list[DepthRow]:
        return self.depth_snapshot().rows

    def oldest_pending_age(self) -> dict[str, float]:
        """Seconds since the oldest pending row of each consumer failed."""
        return self.depth_snapshot().oldest_pending

    def depth_snapshot(self, timeout: float = 30.0) -> DepthSnapshot:
        """Depth and the oldest pending, replayed and parked ages in one go, given up after `timeout`
        seconds whatever happens (a silent network must not hang the metrics refresh)."""
        with (
            translate_db_errors(),
            self._pool.connection(timeout=timeout) as conn,
            deadline(conn, timeout),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            depth = [DepthRow.model_validate(r) for r in cur.execute(READ["depth"]).fetchall()]
            pending = [r.consumer for r in depth if r.status == "pending" and r.count]
            oldest = {
                r["consumer"]: float(r["age"])
                for r in cur.execute(READ["oldest_pending"], {"consumers": pending}).fetchall()
                if r["age"] is not None
            }
            replayed = [r.consumer for r in depth if r.status == "replayed" and r.count]
            oldest_replayed = {
                r["consumer"]: float(r["age"])
                for r in cur.execute(READ["oldest_replayed"], {"consumers": replayed}).fetchall()
                if r["age"] is not None
            }
            parked = [r.consumer for r in depth if r.status == "parked" and r.count]
            oldest_parked = {
                r["consumer"]: float(r["age"])
                for r in cur.execute(READ["oldest_parked"], {"consumers": parked}).fetchall()
                if r["age"] is not None
            }
            circuits = [
                (r["consumer"], r["fingerprint"], r["open"]) for r in cur.execute(READ["circuits"]).fetchall()
            ]
        return DepthSnapshot(depth, oldest, oldest_replayed, oldest_parked, circuits)

    def counts_by(self, column: str, flt: DLQFilter) -> list[tuple[str | None, str, int]]:
        """Row counts by (`column`, status): column is one of consumer, stage, event_type."""
        if column not in ("consumer", "stage", "event_type", "source_topic"):
            raise InvalidOperation(f"cannot group by {column!r}")
        where, params = rows.where(flt)
        query = sql.SQL(READ["count_by"]).format(column=sql.Identifier(column), where=where)
        with translate_db_errors(), self._pool.connection() as conn:
            return [(r[0], r[1], int(r[2])) for r in conn.execute(query, params).fetchall()]

    def fingerprint_groups(self, flt: DLQFilter, *, limit: int = 10) -> list[FingerprintGroup]:
        where, params = rows.where(flt)
        query = sql.SQL(READ["fingerprint_groups"]).format(where=where)
        with translate_db_errors(), self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            found = cur.execute(query, params | {"limit": limit}).fetchall()
            trends = {r["fingerprint"]: [0] * 24 for r in found}
            for trend in cur.execute(READ["group_trends"], {"fingerprints": list(trends)}).fetchall():
                if 0 <= trend["slot"] < 24:
                    trends[trend["fingerprint"]][trend["slot"]] = trend["count"]
        return [FingerprintGroup.model_validate(r | {"trend": trends[r["fingerprint"]]}) for r in found]

    def open_by_hour(self) -> list[int]:
        """Open rows (pending, parked, replayed) at the end of each of the last 24 hours, oldest first,
        from the rows' own times: no sampling, but rows purged since are not counted."""
        with translate_db_errors(), self._pool.connection() as conn:
            row = conn.execute(READ["open_now"]).fetchone()
            changes = conn.execute(READ["open_changes"]).fetchall()
        by_slot = {slot: (opened, closed) for slot, opened, closed in changes}
        counts, open_rows = [0] * 24, int(row[0]) if row else 0
        for slot in range(23, -1, -1):  # back from now: before an hour, its openings were not yet
            counts[slot] = open_rows
            opened, closed = by_slot.get(slot, (0, 0))
            open_rows = max(0, open_rows - int(opened) + int(closed))
        return counts

    # -- changing, each with its audit row in the same transaction ------------------------

    def _set_status(
        self,
        ids: Sequence[int],
        status: Status,
        from_statuses: Sequence[Status],
        actor: str,
        note: str | None,
    ) -> list[int]:
        with rows.transaction(self._pool) as conn:
            # no replay claims them meanwhile
            conn.execute(REPLAY["lock_claims"], {"lease_class": LEASE_CLASS})
            found = conn.execute(
                CHANGE["set_status"],
                {
                    "ids": list(ids),
                    "status": status,
                    "from_statuses": list(from_statuses),
                    "actor": actor,
                    "note": note,
                    "lease_class": LEASE_CLASS,
                },
            ).fetchall()
            changed = sorted(r[0] for r in found)
            if changed:  # a request that changed nothing is not a change
                action = status if status != "resolved" else "resolve"
                rows.audit(conn, actor, action, changed, {"note": note})
            return changed

    def resolve(self, ids: Sequence[int], *, actor: str, note: str | None = None) -> list[int]:
        """Mark rows resolved (the cause is fixed some other way); returns the ids changed: not those
        closed already, nor those a replay is publishing."""
        return self._set_status(ids, "resolved", ("pending", "replayed"), actor, note)

    def discard(self, ids: Sequence[int], *, actor: str, note: str | None = None) -> list[int]:
        """Give up on rows: they stay for the record but are never replayed by default. Returns the ids
        changed, as `resolve`."""
        return self._set_status(ids, "discarded", ("pending", "replayed"), actor, note)

    def edit(self, dlq_id: int, payload: bytes | None, *, actor: str, detail: dict[str, Any]) -> bool:
        """Keep `payload` beside the row's original bytes (None: drop the edit), with the audit row;
        False when the row is not pending (any more)."""
        with rows.transaction(self._pool) as conn:
            conn.execute(REPLAY["lock_claims"], {"lease_class": LEASE_CLASS})  # no replay claims it meanwhile
            changed = conn.execute(
                CHANGE["edit_payload"],
                {"id": dlq_id, "payload": payload, "actor": actor, "lease_class": LEASE_CLASS},
            ).fetchone()
            if changed:
                rows.audit(conn, actor, "edit", [dlq_id], detail)
            return changed is not None

    def audit(self, actor: str, action: str, ids: Sequence[int], detail: dict[str, Any]) -> None:
        """An audit row of its own (an operation whose changes are audited apart, e.g. a canary)."""
        with rows.transaction(self._pool) as conn:
            rows.audit(conn, actor, action, ids, detail)

    def delete(self, ids: Sequence[int], *, actor: str) -> list[int]:
        with rows.transaction(self._pool) as conn, conn.cursor(row_factory=dict_row) as cur:
            gone = cur.execute(CHANGE["delete_rows"], {"ids": list(ids)}).fetchall()
            deleted = sorted(r["dlq_id"] for r in gone)
            if deleted:
                rows.audit(conn, actor, "delete", deleted, _deleted_detail(gone))
            return deleted

    def purge(self, *, older_than_seconds: float, actor: str, consumer: str | None = None) -> list[int]:
        """Delete resolved and discarded rows last changed longer ago than the given age."""
        with rows.transaction(self._pool) as conn, conn.cursor(row_factory=dict_row) as cur:
            gone = cur.execute(
                CHANGE["purge"], {"older_than": f"{older_than_seconds} seconds", "consumer": consumer}
            ).fetchall()
            deleted = sorted(r["dlq_id"] for r in gone)
            if deleted:
                detail = _deleted_detail(gone) | {"older_than_seconds": older_than_seconds}
                rows.audit(conn, actor, "purge", deleted, detail)
            return deleted


def _deleted_detail(gone: list[dict[str, Any]]) -> dict[str, Any]:
    named = sorted(gone, key=lambda r: r["dlq_id"])[:AUDITED_ROWS]
    return {
        "count": len(gone),
        "rows": [{k: rows.clean_text(v) if isinstance(v, str) else v for k, v in r.items()} for r in named],
    }

"""The dead letter queue repository: the one way into and out of the `dlq` table.

The worker writes failures inside its batch transaction (so a DLQ row and the consumed position
commit together); operator commands use the pool. Driver errors leave as `TransientError` or
`PermanentError` (see `db.translate_db_errors`).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, LiteralString, Protocol

import psycopg
import psycopg_pool
import structlog
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from eventhandler import queries
from eventhandler.db import deadline, translate_db_errors
from eventhandler.errors import InvalidOperation, NotFound
from eventhandler.ledger import digest
from eventhandler.librdkafka import header_key, raw_header_key
from eventhandler.models import (
    DepthRow,
    DepthSnapshot,
    DLQEntry,
    DLQFilter,
    DLQSummary,
    FailedMessage,
    FingerprintGroup,
    Headers,
    ReplayOrigin,
    Status,
)

_WRITE = queries.load("dlq_write.sql")
RESERVE_IDS = _WRITE["reserve_ids"]
COPY_ROWS = _WRITE["copy_rows"]
COPY_HEADERLESS_ROWS = _WRITE["copy_headerless_rows"]
CREATE_STAGING = _WRITE["create_staging"]
CLEAR_STAGING = _WRITE["clear_staging"]
COPY_STAGING = _WRITE["copy_staging"]
UPSERT_STAGED = _WRITE["upsert_staged"]
INSERT_REPLAY_FAILURE = _WRITE["insert_replay_failure"]

# The binary COPY's types, in the column order of those statements and of `_copy_row`:
# consumer … message_key, then header_keys, header_values, header_keys_raw, then source_topic … event_key.
_HEAD_TYPES = ["text", "text", "text", "text", "bytea", "bytea"]
_HEADER_TYPES = ["text[]", "bytea[]", "bytea[]"]
_TAIL_TYPES = ["text", "int4", "int8", "timestamptz", "text", "text", "text", "text", "text", "text", "uuid"]
COPY_TYPES = _HEAD_TYPES + _HEADER_TYPES + _TAIL_TYPES
HEADERLESS_TYPES = _HEAD_TYPES + _TAIL_TYPES
# The parameter names of `insert_replay_failure`, in the same order.
_PARAM_KEYS = [
    "consumer",
    "event_id",
    "event_type",
    "event_source",
    "value",
    "key",
    "header_keys",
    "header_values",
    "header_keys_raw",
    "topic",
    "partition",
    "offset",
    "timestamp",
    "stage",
    "error_type",
    "error_message",
    "traceback",
    "fingerprint",
    "worker_version",
    "event_key",
]

# Only rows the replayed message matches: its origin (the original coordinates) and, when the row
# knows its event, the same event. A forged or stale `eventhandler-dlq-id` (after a restore, or
# TRUNCATE … RESTART IDENTITY) matches nothing.
RESOLVE_REPLAYED = """
UPDATE dlq SET status = 'resolved', resolved_at = now(), resolved_by = 'replay',
       resolution_note = 'processed successfully after replay', updated_at = now()
FROM unnest(%(ids)s::bigint[], %(topics)s::text[], %(partitions)s::int[], %(offsets)s::bigint[],
            %(sources)s::text[], %(event_ids)s::text[]) AS r(dlq_id, topic, part, off, source, event_id)
WHERE dlq.dlq_id = r.dlq_id AND dlq.consumer = %(consumer)s AND dlq.status IN ('pending', 'replayed')
  AND dlq.source_topic = r.topic AND dlq.source_partition = r.part AND dlq.source_offset = r.off
  AND (dlq.event_id IS NULL OR (dlq.event_id = r.event_id AND dlq.event_source = r.source))
RETURNING dlq.dlq_id
"""

_SUMMARY_COLUMNS = """
    dlq_id, consumer, event_id, event_type, source_topic, source_partition, source_offset, stage,
    error_type, error_message, fingerprint, status, retry_count, failure_count, replay_count,
    failed_at, last_failed_at, last_replayed_at, resolved_at, octet_length(event_payload) AS payload_size
"""
_ENTRY_COLUMNS = (
    _SUMMARY_COLUMNS
    + """,
    event_source, event_payload, message_key, header_keys, header_values, header_keys_raw,
    message_timestamp,
    error_traceback, replayed_to_topic, resolved_by, resolution_note, worker_version, updated_at
"""
)

SET_STATUS = """
UPDATE dlq SET status = %(status)s, resolved_at = now(), resolved_by = %(actor)s,
       resolution_note = %(note)s, updated_at = now()
WHERE dlq_id = ANY(%(ids)s) AND status = ANY(%(from_statuses)s)
RETURNING dlq_id
"""
# A delete returns what the row was, for its audit row: its identity, status and digests of its bytes.
DELETE_ROWS = """
DELETE FROM dlq WHERE dlq_id = ANY(%(ids)s)
RETURNING dlq_id, consumer, source_topic AS topic, source_partition AS partition, source_offset AS offset,
          event_id, status, encode(sha256(coalesce(event_payload, '')), 'hex') AS payload_sha256,
          event_payload IS NULL AS tombstone, encode(sha256(coalesce(message_key, '')), 'hex') AS key_sha256
"""
PURGE = """
DELETE FROM dlq
WHERE status IN ('resolved', 'discarded') AND updated_at < now() - %(older_than)s::interval
  AND (%(consumer)s::text IS NULL OR consumer = %(consumer)s)
RETURNING dlq_id, consumer, source_topic AS topic, source_partition AS partition, source_offset AS offset,
          event_id, status, encode(sha256(coalesce(event_payload, '')), 'hex') AS payload_sha256,
          event_payload IS NULL AS tombstone, encode(sha256(coalesce(message_key, '')), 'hex') AS key_sha256
"""
# Replay leases (migration 0005): the first key of the advisory lock a replayer holds while it runs;
# the second is the lease itself, stored in the rows it claimed.
LEASE_CLASS = 0x45484C31
TAKE_LEASE = "SELECT pg_try_advisory_lock(%(lease_class)s, %(lease)s)"
RELEASE_LEASE = "SELECT pg_advisory_unlock(%(lease_class)s, %(lease)s)"
LEASE_HELD = """
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
               AND classid = %(lease_class)s::oid AND objid = %(lease)s::oid)
"""
# A row is free to claim when no lease holds it: none, expired, or its replayer's session is gone.
LEASE_FREE = """(replay_lease IS NULL OR replay_lease_until < now() OR NOT EXISTS (
    SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
      AND classid = %(lease_class)s::oid AND objid = dlq.replay_lease::oid))"""
TAKE_ROWS = """
UPDATE dlq SET replay_lease = %(lease)s, replay_lease_until = now() + %(lease_seconds)s * interval '1 second',
       updated_at = now()
WHERE dlq_id = ANY(%(ids)s)
RETURNING now()
"""
# A row the worker changed since the claim (its replayed copy already succeeded or failed: updated_at
# moved) keeps the status the worker gave it; the replay is counted either way.
MARK_REPLAYED = """
UPDATE dlq SET
    status = CASE WHEN updated_at = %(claimed_at)s THEN 'replayed' ELSE status END,
    updated_at = CASE WHEN updated_at = %(claimed_at)s THEN now() ELSE updated_at END,
    replay_count = replay_count + 1, last_replayed_at = now(), replayed_to_topic = %(topic)s,
    replay_lease = NULL, replay_lease_until = NULL,
    -- a row replayed again is no longer resolved (the audit keeps who resolved it before)
    resolved_at = CASE WHEN updated_at = %(claimed_at)s THEN NULL ELSE resolved_at END,
    resolved_by = CASE WHEN updated_at = %(claimed_at)s THEN NULL ELSE resolved_by END,
    resolution_note = CASE WHEN updated_at = %(claimed_at)s THEN NULL ELSE resolution_note END
WHERE dlq_id = ANY(%(ids)s) AND replay_lease = %(lease)s
"""
RELEASE_ROWS = """
UPDATE dlq SET replay_lease = NULL, replay_lease_until = NULL
WHERE dlq_id = ANY(%(ids)s) AND replay_lease = %(lease)s
"""
RECORD_AUDIT = """
INSERT INTO dlq_audit (actor, action, dlq_ids, detail, request_id, client)
VALUES (%(actor)s, %(action)s, %(ids)s, %(detail)s, %(request_id)s, %(client)s)
"""
AUDITED_ROWS = 1000  # a delete's audit row names at most this many rows, and counts them all
DEPTH = "SELECT consumer, status, count(*) AS count FROM dlq GROUP BY consumer, status"
# The lowest pending dlq_id of a consumer is its oldest first failure (ids and failed_at both come at
# insert time; concurrent transactions blur that by one batch at most): one index probe per consumer.
OLDEST_PENDING = """
SELECT consumer, extract(epoch FROM now() - (
    SELECT failed_at FROM dlq WHERE dlq.consumer = c.consumer AND status = 'pending' ORDER BY dlq_id LIMIT 1
))::float8 AS age
FROM unnest(%(consumers)s::text[]) AS c(consumer)
"""
# Rows stay `replayed` until a worker processes their copy; one that never comes back (replayed to a
# topic no worker reads) is reported by its age. Replayed rows are few: the status index finds them.
OLDEST_REPLAYED = """
SELECT consumer, extract(epoch FROM now() - min(last_replayed_at))::float8 AS age
FROM dlq WHERE status = 'replayed' AND consumer = ANY(%(consumers)s::text[])
GROUP BY consumer
"""
# The sample message is the oldest row's, so that a view can redact it with that row's payload.
FINGERPRINT_GROUPS = """
SELECT g.fingerprint, g.stage, g.error_type, sample.error_message AS sample_message, g.sample_id,
       g.count, g.first_seen, g.last_seen
FROM (
    SELECT fingerprint, min(stage) AS stage, min(error_type) AS error_type, min(dlq_id) AS sample_id,
           count(*) AS count, min(failed_at) AS first_seen, max(last_failed_at) AS last_seen
    FROM dlq {where}
    GROUP BY fingerprint ORDER BY count(*) DESC, fingerprint LIMIT %(limit)s
) g
JOIN dlq sample ON sample.dlq_id = g.sample_id
ORDER BY g.count DESC, g.fingerprint
"""
COUNT_BY = "SELECT {column} AS key, status, count(*) AS count FROM dlq {where} GROUP BY 1, 2 ORDER BY 1, 2"


class DLQRepository(Protocol):
    """What the worker needs from a dead letter queue (the seam the unit tests fake)."""

    def record_failures(self, conn: psycopg.Connection[Any], failures: Sequence[FailedMessage]) -> list[int]:
        """Store failures inside the caller's transaction; returns their dlq_ids."""
        ...

    def resolve_replayed(
        self, conn: psycopg.Connection[Any], consumer: str, replays: Sequence[Replay]
    ) -> list[int]:
        """Mark rows whose replayed message now succeeded (and matches them), inside the caller's
        transaction."""
        ...


def _where(
    flt: DLQFilter, after_id: int | None = None, *, lease_free: bool = False
) -> tuple[sql.Composable, dict[str, Any]]:
    """The WHERE clause of a filter, from fixed fragments with bound parameters only (`lease_free`:
    only rows no replay lease holds; the caller binds `lease_class`)."""
    clauses: list[sql.Composable] = []
    params: dict[str, Any] = {}

    def add(fragment: LiteralString, **values: Any) -> None:
        clauses.append(sql.SQL(fragment))
        params.update(values)

    if flt.ids:
        add("dlq_id = ANY(%(f_ids)s)", f_ids=list(flt.ids))
    if flt.consumer is not None:
        add("consumer = %(f_consumer)s", f_consumer=flt.consumer)
    if flt.event_type is not None:
        add("event_type = %(f_event_type)s", f_event_type=flt.event_type)
    if flt.stage is not None:
        add("stage = %(f_stage)s", f_stage=flt.stage)
    if flt.statuses:
        add("status = ANY(%(f_statuses)s)", f_statuses=list(flt.statuses))
    if flt.since is not None:
        add("last_failed_at >= %(f_since)s", f_since=flt.since)
    if flt.until is not None:
        add("last_failed_at < %(f_until)s", f_until=flt.until)
    if flt.error_contains:
        escaped = flt.error_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        add("error_message ILIKE %(f_error)s", f_error=f"%{escaped}%")
    if flt.fingerprint is not None:
        add("fingerprint = %(f_fingerprint)s", f_fingerprint=flt.fingerprint)
    if flt.topic is not None:
        add("source_topic = %(f_topic)s", f_topic=flt.topic)
    if after_id is not None:
        add("dlq_id > %(f_after)s", f_after=after_id)
    if lease_free:
        add(LEASE_FREE)
    if not clauses:
        return sql.SQL(""), params
    return sql.SQL("WHERE ") + sql.SQL(" AND ").join(clauses), params


def _entry(row: dict[str, Any]) -> DLQEntry:
    raw_keys = row.pop("header_keys_raw")
    keys = row.pop("header_keys") or []
    if raw_keys is not None:  # a key that is not UTF-8: its bytes, as lone surrogates (`header_key`)
        keys = [header_key(bytes(raw)) for raw in raw_keys]
    values = row.pop("header_values") or []
    row["headers"] = [(k, None if v is None else bytes(v)) for k, v in zip(keys, values, strict=True)]
    for column in ("event_payload", "message_key"):
        if row[column] is not None:
            row[column] = bytes(row[column])
    return DLQEntry.model_validate(row)


def _deleted_detail(rows: list[dict[str, Any]]) -> dict[str, Any]:
    named = sorted(rows, key=lambda r: r["dlq_id"])[:AUDITED_ROWS]
    return {
        "count": len(rows),
        "rows": [{k: clean_text(v) if isinstance(v, str) else v for k, v in r.items()} for r in named],
    }


def clean_text(text: str | None) -> str | None:
    """Text PostgreSQL accepts: no NUL characters, no lone surrogates (they come from bad input)."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


Identity = tuple[str, str, int, int]  # (consumer, topic, partition, offset): one DLQ row per message


def _identity(failure: FailedMessage) -> Identity:
    return (failure.consumer, failure.topic, failure.partition, failure.offset)


def _event_key(failure: FailedMessage) -> uuid.UUID | None:
    if failure.event_id is None or failure.event_source is None:
        return None
    return digest(failure.consumer, (failure.event_source, failure.event_id))


def _copy_row(failure: FailedMessage, headers: bool = True) -> list[Any]:
    """A failure's column values in COPY order (`COPY_TYPES`; without the header columns:
    `HEADERLESS_TYPES`)."""
    head = [
        failure.consumer,
        clean_text(failure.event_id),
        clean_text(failure.event_type),
        clean_text(failure.event_source),
        failure.value,
        failure.key,
    ]
    tail = [
        failure.topic,
        failure.partition,
        failure.offset,
        failure.timestamp,
        failure.stage,
        failure.error_type,
        clean_text(failure.error_message),
        clean_text(failure.traceback),
        failure.fingerprint,
        failure.worker_version,
        # the ledger key of the event, which the ledger then keeps while this row is open
        failure.event_key or _event_key(failure),
    ]
    return [*head, *_header_columns(failure.headers), *tail] if headers else [*head, *tail]


def _header_columns(headers: Headers) -> list[Any]:
    """header_keys (as text), header_values, and header_keys_raw when a key does not survive as text."""
    keys = [clean_text(k) for k, _ in headers]
    lossy = any(shown != k for shown, (k, _) in zip(keys, headers, strict=True))
    raw = [raw_header_key(k) for k, _ in headers] if lossy else None
    return [keys, [v for _, v in headers], raw]


def _failure_params(failure: FailedMessage) -> dict[str, Any]:
    """A failure's values by the names the statements use."""
    params = dict(zip(_PARAM_KEYS, _copy_row(failure), strict=True))
    origin = failure.replay_of
    if origin is not None:
        params |= {
            "replay_of": origin.dlq_id,
            "origin_topic": origin.topic,
            "origin_partition": origin.partition,
            "origin_offset": origin.offset,
        }
    return params


Replay = tuple[ReplayOrigin, str, str]  # a replayed message that succeeded: origin, event source and id


class PostgresDLQRepository:
    """The `dlq` table on a psycopg pool."""

    def __init__(self, pool: psycopg_pool.ConnectionPool) -> None:
        self._pool = pool

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with translate_db_errors(), self._pool.connection() as conn, conn.transaction():
            yield conn

    # -- the worker's side, inside its batch transaction ------------------------------------

    def record_failures(self, conn: psycopg.Connection[Any], failures: Sequence[FailedMessage]) -> list[int]:
        ids: dict[int, int] = {}  # position in `failures` → dlq_id
        fresh: dict[Identity, list[int]] = {}  # message identity → its positions in `failures`
        replays: list[int] = []
        for position, failure in enumerate(failures):
            if failure.replay_of is None:
                fresh.setdefault(_identity(failure), []).append(position)
            else:
                replays.append(position)
        with translate_db_errors(), conn.cursor() as cur:
            if fresh:
                # The last failure of a message stands for it: one statement cannot update a row twice.
                stored = self._insert_fresh(cur, [failures[positions[-1]] for positions in fresh.values()])
                for dlq_id, positions in zip(stored, fresh.values(), strict=True):
                    for position in positions:
                        ids[position] = dlq_id
            if replays:
                cur.executemany(
                    INSERT_REPLAY_FAILURE, [_failure_params(failures[i]) for i in replays], returning=True
                )
                for position in replays:
                    row = cur.fetchone()
                    ids[position] = row[0] if row else -1
                    cur.nextset()
        return [ids[i] for i in range(len(failures))]

    @staticmethod
    def _insert_fresh(cur: psycopg.Cursor[Any], failures: list[FailedMessage]) -> list[int]:
        """One row per failure (updated, for a message seen before); their dlq_ids, in order."""
        reserved = cur.execute(RESERVE_IDS, (len(failures),)).fetchone()
        ids: list[int] = reserved[0] if reserved else []
        headers = any(failure.headers for failure in failures)
        try:
            with (
                cur.connection.transaction(),
                cur.copy(COPY_ROWS if headers else COPY_HEADERLESS_ROWS) as copy,
            ):
                copy.set_types(["int8", *(COPY_TYPES if headers else HEADERLESS_TYPES)])
                for dlq_id, failure in zip(ids, failures, strict=True):
                    copy.write_row([dlq_id, *_copy_row(failure, headers)])
            return ids
        except psycopg.errors.UniqueViolation:
            pass  # a message of the batch has a row already: upsert the batch instead
        with cur.connection.transaction():  # the staged rows live until the end of a transaction
            cur.execute(CREATE_STAGING)
            cur.execute(CLEAR_STAGING)
            with cur.copy(COPY_STAGING) as copy:
                copy.set_types(COPY_TYPES)
                for failure in failures:
                    copy.write_row(_copy_row(failure))
            rows = cur.execute(UPSERT_STAGED).fetchall()
        stored = {(c, t, p, o): dlq_id for dlq_id, c, t, p, o in rows}
        return [stored[_identity(failure)] for failure in failures]

    def resolve_replayed(
        self, conn: psycopg.Connection[Any], consumer: str, replays: Sequence[Replay]
    ) -> list[int]:
        if not replays:
            return []
        params = {
            "consumer": consumer,
            "ids": [origin.dlq_id for origin, _, _ in replays],
            "topics": [origin.topic for origin, _, _ in replays],
            "partitions": [origin.partition for origin, _, _ in replays],
            "offsets": [origin.offset for origin, _, _ in replays],
            "sources": [clean_text(source) for _, source, _ in replays],
            "event_ids": [clean_text(event_id) for _, _, event_id in replays],
        }
        with translate_db_errors():
            rows = conn.execute(RESOLVE_REPLAYED, params).fetchall()
            return [r[0] for r in rows]

    # -- reading -----------------------------------------------------------------------------

    def list_rows(self, flt: DLQFilter, *, limit: int = 100, after_id: int | None = None) -> list[DLQSummary]:
        """Rows matching `flt` in dlq_id order, `limit` at a time after the cursor `after_id`."""
        where, params = _where(flt, after_id)
        query = sql.SQL("SELECT {} FROM dlq {} ORDER BY dlq_id LIMIT %(limit)s").format(
            sql.SQL(_SUMMARY_COLUMNS),
            where,
        )
        with translate_db_errors(), self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(query, params | {"limit": limit}).fetchall()
        return [DLQSummary.model_validate(r) for r in rows]

    def matching_ids(self, flt: DLQFilter, *, limit: int | None = None) -> list[int]:
        """The ids of the rows matching `flt`, oldest first (NULL limit: all of them)."""
        where, params = _where(flt)
        query = sql.SQL("SELECT dlq_id FROM dlq {} ORDER BY dlq_id LIMIT %(limit)s").format(where)
        with translate_db_errors(), self._pool.connection() as conn:
            return [r[0] for r in conn.execute(query, params | {"limit": limit}).fetchall()]

    def count(self, flt: DLQFilter) -> int:
        where, params = _where(flt)
        query = sql.SQL("SELECT count(*) FROM dlq {}").format(where)
        with translate_db_errors(), self._pool.connection() as conn:
            row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0

    def get(self, dlq_id: int) -> DLQEntry:
        query = sql.SQL("SELECT {} FROM dlq WHERE dlq_id = %(id)s").format(sql.SQL(_ENTRY_COLUMNS))
        with translate_db_errors(), self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(query, {"id": dlq_id}).fetchone()
        if row is None:
            raise NotFound(f"no DLQ row with id {dlq_id}")
        return _entry(row)

    def fingerprints(self, flt: DLQFilter) -> list[str]:
        """The failure groups among the rows `flt` matches."""
        where, params = _where(flt)
        query = sql.SQL("SELECT DISTINCT fingerprint FROM dlq {}").format(where)
        with translate_db_errors(), self._pool.connection() as conn:
            return [r[0] for r in conn.execute(query, params).fetchall()]

    def entries(self, ids: Sequence[int]) -> dict[int, DLQEntry]:
        """Whole rows by id (the ones that exist)."""
        if not ids:
            return {}
        query = sql.SQL("SELECT {} FROM dlq WHERE dlq_id = ANY(%(ids)s)").format(sql.SQL(_ENTRY_COLUMNS))
        with translate_db_errors(), self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(query, {"ids": list(ids)}).fetchall()
        return {entry.dlq_id: entry for entry in map(_entry, rows)}

    def depth(self) -> list[DepthRow]:
        return self.depth_snapshot().rows

    def oldest_pending_age(self) -> dict[str, float]:
        """Seconds since the oldest pending row of each consumer failed."""
        return self.depth_snapshot().oldest_pending

    def depth_snapshot(self, timeout: float = 30.0) -> DepthSnapshot:
        """Depth, oldest pending age and oldest replayed age in one go, given up after `timeout`
        seconds whatever happens (a silent network must not hang the metrics refresh)."""
        with (
            translate_db_errors(),
            self._pool.connection(timeout=timeout) as conn,
            deadline(conn, timeout),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            rows = [DepthRow.model_validate(r) for r in cur.execute(DEPTH).fetchall()]
            pending = [r.consumer for r in rows if r.status == "pending" and r.count]
            oldest = {
                r["consumer"]: float(r["age"])
                for r in cur.execute(OLDEST_PENDING, {"consumers": pending}).fetchall()
                if r["age"] is not None
            }
            replayed = [r.consumer for r in rows if r.status == "replayed" and r.count]
            oldest_replayed = {
                r["consumer"]: float(r["age"])
                for r in cur.execute(OLDEST_REPLAYED, {"consumers": replayed}).fetchall()
                if r["age"] is not None
            }
        return DepthSnapshot(rows, oldest, oldest_replayed)

    def counts_by(self, column: str, flt: DLQFilter) -> list[tuple[str | None, str, int]]:
        """Row counts by (`column`, status): column is one of consumer, stage, event_type."""
        if column not in ("consumer", "stage", "event_type", "source_topic"):
            raise InvalidOperation(f"cannot group by {column!r}")
        where, params = _where(flt)
        query = sql.SQL(COUNT_BY).format(column=sql.Identifier(column), where=where)
        with translate_db_errors(), self._pool.connection() as conn:
            return [(r[0], r[1], int(r[2])) for r in conn.execute(query, params).fetchall()]

    def fingerprint_groups(self, flt: DLQFilter, *, limit: int = 10) -> list[FingerprintGroup]:
        where, params = _where(flt)
        query = sql.SQL(FINGERPRINT_GROUPS).format(where=where)
        with translate_db_errors(), self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(query, params | {"limit": limit}).fetchall()
        return [FingerprintGroup.model_validate(r) for r in rows]

    # -- operator changes, each with its audit row in the same transaction --------------------

    def _set_status(
        self,
        ids: Sequence[int],
        status: Status,
        from_statuses: Sequence[Status],
        actor: str,
        note: str | None,
    ) -> list[int]:
        with self._transaction() as conn:
            rows = conn.execute(
                SET_STATUS,
                {
                    "ids": list(ids),
                    "status": status,
                    "from_statuses": list(from_statuses),
                    "actor": actor,
                    "note": note,
                },
            ).fetchall()
            changed = sorted(r[0] for r in rows)
            if changed:  # a request that changed nothing is not a change
                self._audit(
                    conn, actor, status if status != "resolved" else "resolve", changed, {"note": note}
                )
            return changed

    def resolve(self, ids: Sequence[int], *, actor: str, note: str | None = None) -> list[int]:
        """Mark rows resolved (the cause is fixed some other way); returns the ids changed."""
        return self._set_status(ids, "resolved", ("pending", "replayed"), actor, note)

    def discard(self, ids: Sequence[int], *, actor: str, note: str | None = None) -> list[int]:
        """Give up on rows: they stay for the record but are never replayed by default."""
        return self._set_status(ids, "discarded", ("pending", "replayed"), actor, note)

    def delete(self, ids: Sequence[int], *, actor: str) -> list[int]:
        with self._transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(DELETE_ROWS, {"ids": list(ids)}).fetchall()
            deleted = sorted(r["dlq_id"] for r in rows)
            if deleted:
                self._audit(conn, actor, "delete", deleted, _deleted_detail(rows))
            return deleted

    def purge(self, *, older_than_seconds: float, actor: str, consumer: str | None = None) -> list[int]:
        """Delete resolved and discarded rows last changed longer ago than the given age."""
        with self._transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                PURGE, {"older_than": f"{older_than_seconds} seconds", "consumer": consumer}
            ).fetchall()
            deleted = sorted(r["dlq_id"] for r in rows)
            if deleted:
                detail = _deleted_detail(rows) | {"older_than_seconds": older_than_seconds}
                self._audit(conn, actor, "purge", deleted, detail)
            return deleted

    @staticmethod
    def _audit(
        conn: psycopg.Connection[Any], actor: str, action: str, ids: Sequence[int], detail: dict[str, Any]
    ) -> None:
        context = structlog.contextvars.get_contextvars()  # the API request or CLI run (see `logs`)
        conn.execute(
            RECORD_AUDIT,
            {
                "actor": actor,
                "action": action,
                "ids": list(ids),
                "detail": Jsonb(detail),
                "request_id": context.get("request_id"),
                "client": context.get("client"),
            },
        )

    # -- replay ------------------------------------------------------------------------------

    @contextmanager
    def replay_lease(self) -> Iterator[int]:
        """A lease for one replay run: a session advisory lock on a connection held for the run in
        autocommit (no transaction stays open on it), released when the block ends or the process dies.

        The connection is its own, not the pool's: concurrent replays (API requests) would otherwise
        hold every pooled connection and leave none for their claims."""
        with translate_db_errors(), self._lease_connection() as conn:
            lease = 0
            try:
                while True:
                    lease = secrets.randbelow(2**31 - 2) + 1
                    row = conn.execute(TAKE_LEASE, {"lease_class": LEASE_CLASS, "lease": lease}).fetchone()
                    if row and row[0]:
                        break
                yield lease
            finally:
                with suppress(psycopg.Error):  # a lost connection has released the lock already
                    conn.execute(RELEASE_LEASE, {"lease_class": LEASE_CLASS, "lease": lease})

    def _lease_connection(self) -> psycopg.Connection[Any]:
        conninfo, kwargs = self._pool.conninfo, self._pool.kwargs
        options = dict(kwargs() if callable(kwargs) else kwargs or {})
        return psycopg.connect(
            conninfo() if callable(conninfo) else conninfo, **(options | {"autocommit": True})
        )

    def lease_held(self, lease: int) -> bool:
        """Whether the lease's session still holds it (a dropped connection has released it, and its
        rows are then free for another replayer)."""
        with translate_db_errors(), self._pool.connection() as conn:
            row = conn.execute(LEASE_HELD, {"lease_class": LEASE_CLASS, "lease": lease}).fetchone()
        return bool(row and row[0])

    def claim(
        self, flt: DLQFilter, *, limit: int, lease: int, lease_seconds: float
    ) -> tuple[list[DLQEntry], Any]:
        """Take up to `limit` matching rows no other lease holds, for `lease`, in one short
        transaction. Returns the rows and the claim's time, which `settle_claim` needs."""
        where, params = _where(flt, lease_free=True)
        query = sql.SQL(
            "SELECT {} FROM dlq {} ORDER BY dlq_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
        ).format(sql.SQL(_ENTRY_COLUMNS), where)
        with self._transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(query, params | {"limit": limit, "lease_class": LEASE_CLASS}).fetchall()
            entries = [_entry(r) for r in rows]
            if not entries:
                return [], None
            taken = {"ids": [e.dlq_id for e in entries], "lease": lease, "lease_seconds": lease_seconds}
            claimed_at = conn.execute(TAKE_ROWS, taken).fetchone()
        return entries, claimed_at[0] if claimed_at else None

    def settle_claim(
        self,
        *,
        lease: int,
        claimed_at: Any,
        published: dict[str, list[int]],
        unpublished: Sequence[int],
        actor: str,
        detail: dict[str, Any],
    ) -> None:
        """After the publish: mark the rows the broker confirmed (by topic) and free the others, with
        the audit row, in one short transaction."""
        with self._transaction() as conn:
            for topic, ids in published.items():
                conn.execute(
                    MARK_REPLAYED, {"ids": ids, "topic": topic, "lease": lease, "claimed_at": claimed_at}
                )
            if unpublished:
                conn.execute(RELEASE_ROWS, {"ids": list(unpublished), "lease": lease})
            done = [dlq_id for ids in published.values() for dlq_id in ids]
            self._audit(conn, actor, "replay", done, detail)

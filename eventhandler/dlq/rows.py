"""What every part of the DLQ shares: a filter's WHERE clause, a row as a `DLQEntry`, text PostgreSQL
accepts, the audit row, and the column lists."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, LiteralString

import psycopg
import psycopg_pool
import structlog
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from eventhandler import queries
from eventhandler.db import translate_db_errors
from eventhandler.librdkafka import header_key
from eventhandler.models import DLQEntry, DLQFilter

READ = queries.load("dlq_read.sql")
CHANGE = queries.load("dlq_change.sql")
REPLAY = queries.load("dlq_replay.sql")

SUMMARY_COLUMNS = sql.SQL(READ["summary_columns"])
ENTRY_COLUMNS = sql.SQL(", ").join([SUMMARY_COLUMNS, sql.SQL(READ["detail_columns"])])
# The first key of a replay lease's advisory lock (dlq_replay.sql); the second is the lease itself.
LEASE_CLASS = 0x45484C31


def where(
    flt: DLQFilter, after_id: int | None = None, *, claim_free: bool = False
) -> tuple[sql.Composable, dict[str, Any]]:
    """The WHERE clause of a filter, from fixed fragments with bound parameters only (`claim_free`:
    only rows no replay claim names; see `queries/dlq_replay.sql`)."""
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
    if flt.payload_contains:
        add(
            "(position(convert_to(%(f_payload)s, 'UTF8') IN event_payload) > 0"
            " OR position(convert_to(%(f_payload)s, 'UTF8') IN edited_payload) > 0)",
            f_payload=flt.payload_contains,
        )
    if flt.fingerprint is not None:
        add("fingerprint = %(f_fingerprint)s", f_fingerprint=flt.fingerprint)
    if flt.topic is not None:
        add("source_topic = %(f_topic)s", f_topic=flt.topic)
    if after_id is not None:
        add("dlq_id > %(f_after)s", f_after=after_id)
    if claim_free:
        add(REPLAY["claim_free"])
    if not clauses:
        return sql.SQL(""), params
    return sql.SQL("WHERE ") + sql.SQL(" AND ").join(clauses), params


def entry(row: dict[str, Any]) -> DLQEntry:
    """A whole row (`ENTRY_COLUMNS`, as a dict) as the model operators see."""
    raw_keys = row.pop("header_keys_raw")
    keys = row.pop("header_keys") or []
    if raw_keys is not None:  # a key that is not UTF-8: its bytes, as lone surrogates (`header_key`)
        keys = [header_key(bytes(raw)) for raw in raw_keys]
    values = row.pop("header_values") or []
    row["headers"] = [(k, None if v is None else bytes(v)) for k, v in zip(keys, values, strict=True)]
    for column in ("event_payload", "message_key", "edited_payload"):
        if row[column] is not None:
            row[column] = bytes(row[column])
    return DLQEntry.model_validate(row)


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


def count(pool: psycopg_pool.ConnectionPool, flt: DLQFilter) -> int:
    where_clause, params = where(flt)
    with translate_db_errors(), pool.connection() as conn:
        row = conn.execute(sql.SQL(READ["count"]).format(where=where_clause), params).fetchone()
    return int(row[0]) if row else 0


def matching_ids(pool: psycopg_pool.ConnectionPool, flt: DLQFilter, limit: int | None) -> list[int]:
    """The ids of the rows matching `flt`, oldest first (no limit: all of them)."""
    where_clause, params = where(flt)
    query = sql.SQL(READ["matching_ids"]).format(where=where_clause)
    with translate_db_errors(), pool.connection() as conn:
        return [r[0] for r in conn.execute(query, params | {"limit": limit}).fetchall()]


def entries(
    conn: psycopg.Connection[Any], ids: Sequence[int], max_bytes: int | None = None
) -> dict[int, DLQEntry]:
    """Whole rows by id (the ones that exist; with `max_bytes`, whose payload and repair are each at
    most that long), on the caller's connection."""
    query = sql.SQL(READ["entries"]).format(columns=ENTRY_COLUMNS)
    with conn.cursor(row_factory=dict_row) as cur:
        found = cur.execute(query, {"ids": list(ids), "max_bytes": max_bytes}).fetchall()
    return {e.dlq_id: e for e in map(entry, found)}


@contextmanager
def transaction(pool: psycopg_pool.ConnectionPool) -> Iterator[psycopg.Connection[Any]]:
    with translate_db_errors(), pool.connection() as conn, conn.transaction():
        yield conn


def audit(
    conn: psycopg.Connection[Any], actor: str, action: str, ids: Sequence[int], detail: dict[str, Any]
) -> None:
    """The audit row of a change, in the change's transaction; the request or CLI run it came from is
    read from the log context (see `logs`)."""
    context = structlog.contextvars.get_contextvars()
    conn.execute(
        CHANGE["record_audit"],
        {
            "actor": actor,
            "action": action,
            "ids": list(ids),
            "detail": Jsonb(detail),
            "request_id": context.get("request_id"),
            "client": context.get("client"),
        },
    )

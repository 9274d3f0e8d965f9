"""The worker's writes to the DLQ, inside its batch transaction: a batch's failures as rows (a message
seen before updates its row), and replayed rows whose copy now took effect marked resolved.

The statements are in `queries/dlq_write.sql`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from eventhandler import queries
from eventhandler.db import translate_db_errors
from eventhandler.dlq import Replay
from eventhandler.dlq.rows import clean_text
from eventhandler.ledger import digest
from eventhandler.librdkafka import raw_header_key
from eventhandler.models import FailedMessage, Headers

WRITE = queries.load("dlq_write.sql")

# The binary COPY's types, in the column order of those statements and of `copy_row`:
# consumer … message_key, then header_keys, header_values, header_keys_raw, then source_topic … event_key.
_HEAD_TYPES = ["text", "text", "text", "text", "bytea", "bytea"]
_HEADER_TYPES = ["text[]", "bytea[]", "bytea[]"]
_TAIL_TYPES = ["text", "int4", "int8", "timestamptz", "text", "text", "text", "text", "text", "text", "uuid"]
COPY_TYPES = _HEAD_TYPES + _HEADER_TYPES + _TAIL_TYPES
HEADERLESS_TYPES = _HEAD_TYPES + _TAIL_TYPES


def _wire(types: list[str]) -> list[str]:
    """How the COPY sends each column: event_key, the uuid, as the ledger key's 16 bytes, which are a
    uuid's binary form (no UUID object per row: benchmarks/README.md)."""
    return ["bytea" if t == "uuid" else t for t in types]


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


Identity = tuple[str, str, int, int]  # (consumer, topic, partition, offset): one DLQ row per message


def _identity(failure: FailedMessage) -> Identity:
    return (failure.consumer, failure.topic, failure.partition, failure.offset)


def _event_key(failure: FailedMessage) -> bytes | None:
    """The ledger key of the failed event (the 16 bytes the `uuid` column stores)."""
    if failure.event_key is not None or failure.event_id is None or failure.event_source is None:
        return failure.event_key
    return digest(failure.consumer, (failure.event_source, failure.event_id))


def copy_row(failure: FailedMessage, headers: bool = True) -> list[Any]:
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
        _event_key(failure),
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
    params = dict(zip(_PARAM_KEYS, copy_row(failure), strict=True))
    if params["event_key"] is not None:  # a parameter, unlike a COPY field, is typed by its value
        params["event_key"] = uuid.UUID(bytes=params["event_key"])
    origin = failure.replay_of
    if origin is not None:
        params |= {
            "replay_of": origin.dlq_id,
            "origin_topic": origin.topic,
            "origin_partition": origin.partition,
            "origin_offset": origin.offset,
        }
    return params


def _sha256(value: bytes | None) -> bytes | None:
    return None if value is None else hashlib.sha256(value).digest()


class PostgresDLQWriter:
    """The worker's `DeadLetterWriter` on PostgreSQL (it keeps no connection: the batch's is passed in)."""

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
                    WRITE["insert_replay_failure"],
                    [_failure_params(failures[i]) for i in replays],
                    returning=True,
                )
                for position in replays:
                    row = cur.fetchone()
                    ids[position] = row[0] if row else -1
                    cur.nextset()
        return [ids[i] for i in range(len(failures))]

    @staticmethod
    def _insert_fresh(cur: psycopg.Cursor[Any], failures: list[FailedMessage]) -> list[int]:
        """One row per failure (updated, for a message seen before); their dlq_ids, in order."""
        reserved = cur.execute(WRITE["reserve_ids"], (len(failures),)).fetchone()
        ids: list[int] = reserved[0] if reserved else []
        headers = any(failure.headers for failure in failures)
        try:
            with (
                cur.connection.transaction(),
                cur.copy(WRITE["copy_rows" if headers else "copy_headerless_rows"]) as copy,
            ):
                copy.set_types(["int8", *_wire(COPY_TYPES if headers else HEADERLESS_TYPES)])
                for dlq_id, failure in zip(ids, failures, strict=True):
                    copy.write_row([dlq_id, *copy_row(failure, headers)])
            return ids
        except psycopg.errors.UniqueViolation:
            pass  # a message of the batch has a row already: upsert the batch instead
        with cur.connection.transaction():  # the staged rows live until the end of a transaction
            cur.execute(WRITE["create_staging"])
            cur.execute(WRITE["clear_staging"])
            with cur.copy(WRITE["copy_staging"]) as copy:
                copy.set_types(_wire(COPY_TYPES))
                for failure in failures:
                    copy.write_row(copy_row(failure))
            rows = cur.execute(WRITE["upsert_staged"]).fetchall()
        stored = {(c, t, p, o): dlq_id for dlq_id, c, t, p, o in rows}
        return [stored[_identity(failure)] for failure in failures]

    def open_replays(
        self, conn: psycopg.Connection[Any], consumer: str, failures: Sequence[FailedMessage]
    ) -> set[int]:
        replays = [(n, f, f.replay_of) for n, f in enumerate(failures) if f.replay_of is not None]
        if not replays:
            return set()
        params = {
            "consumer": consumer,
            "ids": [origin.dlq_id for _, _, origin in replays],
            "topics": [origin.topic for _, _, origin in replays],
            "partitions": [origin.partition for _, _, origin in replays],
            "offsets": [origin.offset for _, _, origin in replays],
            "sources": [clean_text(f.event_source) for _, f, _ in replays],
            "event_ids": [clean_text(f.event_id) for _, f, _ in replays],
            "digests": [_sha256(f.value) for _, f, _ in replays],
        }
        with translate_db_errors():
            return {replays[r[0] - 1][0] for r in conn.execute(WRITE["open_replays"], params)}

    def resolve_replayed(
        self, conn: psycopg.Connection[Any], consumer: str, replays: Sequence[Replay]
    ) -> list[int]:
        if not replays:
            return []
        params = {
            "consumer": consumer,
            "ids": [origin.dlq_id for origin, _, _, _ in replays],
            "topics": [origin.topic for origin, _, _, _ in replays],
            "partitions": [origin.partition for origin, _, _, _ in replays],
            "offsets": [origin.offset for origin, _, _, _ in replays],
            "sources": [clean_text(source) for _, source, _, _ in replays],
            "event_ids": [clean_text(event_id) for _, _, event_id, _ in replays],
            "digests": [_sha256(value) for _, _, _, value in replays],
        }
        with translate_db_errors():
            rows = conn.execute(WRITE["resolve_replayed"], params).fetchall()
            return [r[0] for r in rows]

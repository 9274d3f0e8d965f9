"""Per-key parking in the `dlq` table, inside the worker's batch transaction (the rules are in
`eventhandler.parking`; the statements in `queries/dlq_parking.sql`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from eventhandler import queries
from eventhandler.db import translate_db_errors
from eventhandler.dlq import rows
from eventhandler.dlq.rows import ENTRY_COLUMNS
from eventhandler.models import DLQEntry, Status
from eventhandler.parking import OpenKey

PARKING = queries.load("dlq_parking.sql")
RELEASE_LOCK_CLASS = 0x45485052  # the first key of the release's advisory lock ("EHPR")
RELEASED_NOTE = "released in order after the failure that blocked its key was closed"


class PostgresParkingStore:
    """The parking side of the worker's DLQ writes; every call takes the batch's connection."""

    def anything_open(self, conn: psycopg.Connection[Any], consumer: str) -> bool:
        """Whether any row of a parking topic is pending, replayed or parked."""
        with translate_db_errors():
            row = conn.execute(PARKING["anything_open"], {"consumer": consumer}).fetchone()
        return bool(row and row[0])

    def open_keys(
        self, conn: psycopg.Connection[Any], consumer: str, keys: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, OpenKey]:
        if not keys:
            return {}
        with translate_db_errors():
            found = conn.execute(PARKING["open_keys"], {"consumer": consumer, "keys": list(keys)}).fetchall()
        return {key: OpenKey(frozenset(blockers or ()), blocked_by) for key, blockers, blocked_by in found}

    def set_state(
        self,
        conn: psycopg.Connection[Any],
        states: Sequence[tuple[int, uuid.UUID, Status | None, int | None]],
    ) -> None:
        """(dlq_id, park_key, status or None to keep it, blocked_by) for rows this batch wrote."""
        if not states:
            return
        ids, keys, statuses, blocked_by = (list(column) for column in zip(*states, strict=True))
        params = {"ids": ids, "keys": keys, "statuses": statuses, "blocked_by": blocked_by}
        with translate_db_errors():
            conn.execute(PARKING["set_park_state"], params)

    def release_lock(self, conn: psycopg.Connection[Any], consumer: str) -> bool:
        """The group's release lock, to the end of the transaction (False: another worker releases)."""
        params = {"lock_class": RELEASE_LOCK_CLASS, "consumer": consumer}
        with translate_db_errors():
            row = conn.execute(PARKING["take_release_lock"], params).fetchone()
        return bool(row and row[0])

    def freed_keys(self, conn: psycopg.Connection[Any], consumer: str, *, limit: int) -> list[uuid.UUID]:
        with translate_db_errors():
            found = conn.execute(PARKING["freed_keys"], {"consumer": consumer, "limit": limit}).fetchall()
        return [key for (key,) in found]

    def parked_rows(
        self, conn: psycopg.Connection[Any], consumer: str, keys: Sequence[uuid.UUID], *, limit: int
    ) -> list[tuple[DLQEntry, uuid.UUID]]:
        """The parked rows of `keys`, oldest first, locked until the transaction ends."""
        if not keys:
            return []
        query = sql.SQL(PARKING["parked_rows"]).format(columns=ENTRY_COLUMNS)
        params = {"consumer": consumer, "keys": list(keys), "limit": limit}
        with translate_db_errors(), conn.cursor(row_factory=dict_row) as cur:
            found = cur.execute(query, params).fetchall()
        taken = []
        for row in found:
            key = row.pop("park_key")
            taken.append((rows.entry(row), key))
        return taken

    def mark_released(self, conn: psycopg.Connection[Any], ids: Sequence[int]) -> list[int]:
        if not ids:
            return []
        with translate_db_errors():
            found = conn.execute(
                PARKING["mark_released"], {"ids": list(ids), "note": RELEASED_NOTE}
            ).fetchall()
        return [dlq_id for (dlq_id,) in found]

    def reblock(self, conn: psycopg.Connection[Any], consumer: str, blockers: dict[uuid.UUID, int]) -> None:
        """Rows still parked behind an old blocker now wait for the key's new one."""
        if not blockers:
            return
        params = {"consumer": consumer, "keys": list(blockers), "blockers": list(blockers.values())}
        with translate_db_errors():
            conn.execute(PARKING["reblock"], params)

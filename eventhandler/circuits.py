"""The flood guard's circuits in PostgreSQL (`flood_circuit`): what workers write when they hold a
batch or a trial passes, what operators read and close. The rules are in `eventhandler.flood`; the
statements in `queries/circuits.sql`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from eventhandler import queries
from eventhandler.db import translate_db_errors
from eventhandler.dlq import rows
from eventhandler.errors import NotFound
from eventhandler.flood import Circuit
from eventhandler.models import CircuitState

CIRCUITS = queries.load("circuits.sql")
ERROR_CHARS = 2000  # of the first failure's error kept on the circuit (the DLQ rows have it whole)


class CircuitBoard(Protocol):
    """What the operators' service needs of the circuits (`PostgresCircuitStore`)."""

    def circuits(self, consumer: str | None = None, *, limit: int = 100) -> list[CircuitState]: ...
    def close_by_operator(
        self, consumer: str, fingerprint: str, *, seconds: float, actor: str, note: str | None
    ) -> CircuitState: ...


class PostgresCircuitStore:
    """The worker's `flood.CircuitStore` (each call takes the batch's connection), and the operators'
    reads and closes (on the pool given, when there is one)."""

    def __init__(self, pool: psycopg_pool.ConnectionPool | None = None) -> None:
        self._pool = pool

    # -- the worker -----------------------------------------------------------------------------

    def open_circuits(self, conn: psycopg.Connection[Any], consumer: str) -> dict[str, frozenset[str]]:
        with translate_db_errors():
            found = conn.execute(CIRCUITS["open_circuits"], {"consumer": consumer}).fetchall()
        return {fingerprint: frozenset(types) for fingerprint, types in found}

    def dead_letter_until(
        self, conn: psycopg.Connection[Any], consumer: str, fingerprints: Sequence[str]
    ) -> dict[str, float]:
        params = {"consumer": consumer, "fingerprints": list(fingerprints)}
        with translate_db_errors():
            found = conn.execute(CIRCUITS["dead_letter_until"], params).fetchall()
        return {fingerprint: float(seconds) for fingerprint, seconds in found}

    def hold(
        self, conn: psycopg.Connection[Any], consumer: str, circuit: Circuit, worker_id: str
    ) -> bool | None:
        """Open the circuit (or count one more trial), in a transaction of its own: True when this
        opened it, False when it was open already, None when an operator's close is in force."""
        sample = circuit.sample
        params = {
            "consumer": consumer,
            "fingerprint": circuit.fingerprint,
            "stage": sample.stage,
            "error_type": rows.clean_text(sample.error_type),
            "error_message": rows.clean_text(_cut(sample.error_message)),
            "event_types": sorted(rows.clean_text(t) or "" for t in circuit.event_types),
            "failures": circuit.failures,
            "messages": circuit.messages,
            "keys": circuit.keys,
            "topic": sample.topic,
            "partition": sample.partition,
            "offset": sample.offset,
            "worker": worker_id,
        }
        with translate_db_errors(), conn.transaction():
            row = conn.execute(CIRCUITS["hold"], params).fetchone()
        return None if row is None else not row[0]

    def close(
        self,
        conn: psycopg.Connection[Any],
        consumer: str,
        fingerprints: Sequence[str],
        worker_id: str,
        *,
        untried_for: float | None = None,
    ) -> list[str]:
        """Close circuits a trial passed (`untried_for`: only those no worker tried for that long)."""
        if not fingerprints:
            return []
        params: dict[str, Any] = {
            "consumer": consumer,
            "fingerprints": list(fingerprints),
            "worker": worker_id,
        }
        statement = CIRCUITS["close_tried"]
        if untried_for is not None:
            statement = CIRCUITS["close_untried"]
            params["untried_for"] = untried_for
        with translate_db_errors():
            return [fingerprint for (fingerprint,) in conn.execute(statement, params).fetchall()]

    # -- the operators --------------------------------------------------------------------------

    def circuits(self, consumer: str | None = None, *, limit: int = 100) -> list[CircuitState]:
        with (
            translate_db_errors(),
            self._operators().connection() as conn,
            conn.cursor(row_factory=dict_row) as cur,
        ):
            found = cur.execute(CIRCUITS["circuits"], {"consumer": consumer, "limit": limit}).fetchall()
        return [CircuitState.model_validate(row) for row in found]

    def close_by_operator(
        self, consumer: str, fingerprint: str, *, seconds: float, actor: str, note: str | None
    ) -> CircuitState:
        """Close a circuit and let its failure be dead-lettered for `seconds`, audited."""
        params = {
            "consumer": consumer,
            "fingerprint": fingerprint,
            "seconds": seconds,
            "actor": actor,
            "note": note,
        }
        with rows.transaction(self._operators()) as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(CIRCUITS["close_by_operator"], params).fetchone()
            if row is None:
                raise NotFound(f"no circuit of consumer {consumer!r} with fingerprint {fingerprint}")
            detail = {"consumer": consumer, "fingerprint": fingerprint, "dead_letter_seconds": seconds}
            rows.audit(conn, actor, "close_circuit", [], detail | {"note": note})
        return CircuitState.model_validate(row)

    def _operators(self) -> psycopg_pool.ConnectionPool:
        if self._pool is None:
            raise RuntimeError("this circuit store was built for a worker, without a pool")
        return self._pool


def _cut(text: str) -> str:
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"

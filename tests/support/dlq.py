"""The DLQ's three faces on one pool, as tests use them together."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg_pool

from eventhandler.dlq.operators import PostgresOperatorStore
from eventhandler.dlq.replays import PostgresReplayRows
from eventhandler.dlq.writer import PostgresDLQWriter


@dataclass
class DLQ:
    writer: PostgresDLQWriter
    operators: PostgresOperatorStore
    replays: PostgresReplayRows

    @classmethod
    def on(cls, pool: psycopg_pool.ConnectionPool) -> DLQ:
        return cls(PostgresDLQWriter(), PostgresOperatorStore(pool), PostgresReplayRows(pool))

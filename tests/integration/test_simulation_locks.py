"""A simulation meeting a row lock a worker holds, against the real PostgreSQL: it gives up with `Busy`
after its `LOCK_TIMEOUT`, and while it waits it holds a connection of its own, never the pool's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import psycopg_pool
import pytest

from eventhandler.app import build_service
from eventhandler.config import Settings
from eventhandler.errors import Busy
from eventhandler.models import DLQFilter
from eventhandler.service import DLQService
from eventhandler.simulate import LOCK_TIMEOUT, LOWER_LOCK_TIMEOUT
from tests.support import kafka as k
from tests.support.dlq import DLQ as DLQStore
from tests.support.factories import failed_event
from tests.support.waiting import wait_for
from tests.support.worker import scalar

# Another session of this database waiting for a lock (the simulation, once it meets the held row).
WAITING_FOR_A_LOCK = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'
"""


@pytest.fixture
def a_reading(
    make_settings: Callable[..., Settings], topic: str, db: psycopg.Connection[Any]
) -> Iterator[Callable[..., tuple[DLQService, psycopg_pool.ConnectionPool]]]:
    """A service whose DLQ holds one reading of the registered device `dev-1`: a simulation of it
    writes `dev-1`'s row."""
    pools: list[psycopg_pool.ConnectionPool] = []

    def make(**overrides: Any) -> tuple[DLQService, psycopg_pool.ConnectionPool]:
        settings = make_settings(**overrides)
        service, pool = build_service(settings)
        pools.append(pool)
        db.execute("INSERT INTO devices (device_id, name) VALUES ('dev-1', 'DEV-1')")
        reading = k.reading("dev-1")
        with pool.connection() as conn, conn.transaction():
            DLQStore.on(pool).writer.record_failures(
                conn, [failed_event(reading, consumer=settings.consumer_group, topic=topic)]
            )
        return service, pool

    yield make
    for pool in pools:
        pool.close()


def holding_the_device_row(db_url: str) -> psycopg.Connection[Any]:
    """A transaction that holds `dev-1`'s row locked (as a worker writing it does) until it ends."""
    holder = psycopg.connect(db_url)
    holder.execute("SELECT 1 FROM devices WHERE device_id = 'dev-1' FOR UPDATE")
    return holder


@pytest.mark.parametrize("statement_timeout", [30.0, 2.0], ids=["default", "below-LOCK_TIMEOUT"])
def test_a_simulation_that_waits_for_a_locked_row_answers_busy(
    statement_timeout: float,
    a_reading: Callable[..., tuple[DLQService, psycopg_pool.ConnectionPool]],
    db_url: str,
) -> None:
    """The lock wait ends as PostgreSQL's lock timeout (never as the statement timeout, however short
    that is), which the driver layer reports as a transient error caused by it: the operator is told a
    worker holds the rows (run it again), not that the database is unavailable."""
    service, _ = a_reading(db_statement_timeout_seconds=statement_timeout)
    with holding_the_device_row(db_url), pytest.raises(Busy, match="a worker holds rows") as busy:
        service.simulate(DLQFilter(), actor="test")
    causes = []
    cause = busy.value.__cause__
    while cause is not None:
        causes.append(type(cause))
        cause = cause.__cause__
    assert psycopg.errors.LockNotAvailable in causes


def test_a_simulation_waiting_for_a_lock_leaves_the_pool_to_other_requests(
    a_reading: Callable[..., tuple[DLQService, psycopg_pool.ConnectionPool]], db_url: str
) -> None:
    """With a pool of one connection, a request answers while a simulation waits for a row; once the
    row is free, the simulation completes."""
    service, pool = a_reading(db_pool_size=1, db_statement_timeout_seconds=30.0)
    assert pool.max_size == 1
    with ThreadPoolExecutor(1) as running, holding_the_device_row(db_url) as holder:
        simulation = running.submit(service.simulate, DLQFilter(), actor="test")
        with psycopg.connect(db_url, autocommit=True) as watcher:
            wait_for(
                lambda: watcher.execute(WAITING_FOR_A_LOCK).fetchone() == (1,) or simulation.done(),
                timeout=4,  # within the simulation's LOCK_TIMEOUT of 5 s
                message="the simulation to wait for the locked row",
            )
        assert not simulation.done()
        assert service.count(DLQFilter()) == 1  # the pool's one connection was free
        holder.rollback()
        assert simulation.result(timeout=10).outcomes["apply"] == 1


@pytest.mark.parametrize(
    ("lock_timeout", "statement_timeout", "expected"),
    [("0", "0", "5s"), ("0", "2s", "1s"), ("300ms", "0", "300ms"), ("1min", "1h", "5s"), ("0", "1ms", "1ms")],
)
def test_a_simulation_waits_for_a_lock_less_than_its_statement_may_run(
    db: psycopg.Connection[Any], lock_timeout: str, statement_timeout: str, expected: str
) -> None:
    # Whatever the connection came with (a pooler may drop its options: no lock timeout at all).
    with db.transaction():
        db.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
        db.execute(f"SET LOCAL statement_timeout = '{statement_timeout}'")
        db.execute(LOWER_LOCK_TIMEOUT, {"lock_timeout": LOCK_TIMEOUT})
        assert scalar(db, "SELECT current_setting('lock_timeout')") == expected

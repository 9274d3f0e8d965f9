from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import psycopg_pool
import pytest

from eventhandler.ledger import Ledger, LedgerPruner, digest
from tests.support.dlq import DLQ
from tests.support.factories import failed_message
from tests.support.worker import scalar


def test_claim_recognises_duplicates_and_release_forgets_failures(db: psycopg.Connection[Any]) -> None:
    ledger = Ledger("g")
    s1, s2, s3, other2 = (
        ledger.key("/s", "1"),
        ledger.key("/s", "2"),
        ledger.key("/s", "3"),
        ledger.key("/other", "2"),
    )
    assert len({s1, s2, s3, other2}) == 4
    with db.transaction():
        assert ledger.claim(db, [s1, s2]) == {s1, s2}
    with db.transaction():
        assert ledger.claim(db, [s2, s3, other2]) == {s3, other2}
        ledger.release(db, [s3])
    another = Ledger("another-group")
    assert another.key("/s", "1") != s1
    assert another.claim(db, [another.key("/s", "1")]) == {another.key("/s", "1")}  # per consumer group
    stored = {r[0] for r in db.execute("SELECT event_key FROM applied_events WHERE consumer = 'g'")}
    assert stored == {
        uuid.UUID(bytes=digest("g", key)) for key in [("/other", "2"), ("/s", "1"), ("/s", "2")]
    }


@pytest.mark.parametrize("first_commits", [True, False])
def test_a_concurrent_claim_of_the_same_event_waits_for_the_first(db_url: str, first_commits: bool) -> None:
    ledger = Ledger("g")
    shared, other = ledger.key("/s", "shared"), ledger.key("/s", "other")
    got: list[set[Any]] = []
    with psycopg.connect(db_url) as first, psycopg.connect(db_url) as second:
        first.execute("SET lock_timeout = '10s'")
        second.execute("SET lock_timeout = '10s'")
        first.commit()
        second.commit()
        with first.transaction(force_rollback=not first_commits):
            assert ledger.claim(first, [shared]) == {shared}

            def claim_in_second() -> None:
                with second.transaction():
                    got.append(ledger.claim(second, [other, shared]))

            waiter = threading.Thread(target=claim_in_second)
            waiter.start()
            waiter.join(0.5)
            assert waiter.is_alive(), "the second claim must wait for the first transaction"
        waiter.join(15)
    assert got == [{other} if first_commits else {other, shared}]


def test_positions_round_trip(db: psycopg.Connection[Any]) -> None:
    ledger = Ledger("g")
    ledger.save_positions(db, {("t", 0): 10, ("t", 1): 5})
    ledger.save_positions(db, {("t", 0): 12})
    assert ledger.load_positions(db, [("t", 0), ("t", 1), ("t", 2)]) == {("t", 0): 12, ("t", 1): 5}


def test_pruner_forgets_only_events_older_than_the_retention(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    ledger = Ledger("g")
    ledger.claim(db, [ledger.key("/s", str(i)) for i in range(25_000)])
    ledger.claim(db, [ledger.key("/s", "fresh")])
    other = Ledger("other")
    other.claim(db, [other.key("/s", "old-but-other-group")])
    db.execute(
        "UPDATE applied_events SET applied_at = now() - interval '8 days' WHERE event_key <> %s",
        (uuid.UUID(bytes=digest("g", ("/s", "fresh"))),),
    )
    with psycopg_pool.ConnectionPool(db_url, min_size=1, max_size=1) as pool:
        pruned = LedgerPruner(pool, ledger, retention_seconds=7 * 86400).prune_once()
    assert pruned == 25_000  # in bounded batches, until nothing old is left
    rows = db.execute("SELECT consumer, event_key FROM applied_events ORDER BY 1").fetchall()
    assert rows == [
        ("g", uuid.UUID(bytes=digest("g", ("/s", "fresh")))),
        ("other", uuid.UUID(bytes=digest("other", ("/s", "old-but-other-group")))),
    ]


@pytest.mark.parametrize("status", ["pending", "replayed"])
def test_the_pruner_keeps_an_event_an_open_dlq_row_holds_until_the_row_is_closed(
    db_url: str, db: psycopg.Connection[Any], status: str
) -> None:
    """Copy 1 of an event failed (its row waits for months); copy 2 was applied. Were the ledger to
    forget copy 2 after its retention, replaying the row would apply the event a second time."""
    ledger = Ledger("group-a")
    with psycopg_pool.ConnectionPool(db_url, min_size=1, max_size=2) as pool:
        repo = DLQ.on(pool)
        with pool.connection() as conn, conn.transaction():
            (dlq_id,) = repo.writer.record_failures(
                conn, [failed_message(event_source="/s", event_id="held")]
            )
        db.execute("UPDATE dlq SET status = %s WHERE dlq_id = %s", (status, dlq_id))
        held, other = ledger.key("/s", "held"), ledger.key("/s", "other")
        ledger.claim(db, [held, other])
        db.execute("UPDATE applied_events SET applied_at = now() - interval '30 days'")
        pruner = LedgerPruner(pool, ledger, retention_seconds=7 * 86400)

        assert pruner.prune_once() == 1
        assert [row[0].bytes for row in db.execute("SELECT event_key FROM applied_events").fetchall()] == [
            held
        ]
        with pool.connection() as conn, conn.transaction():  # the replayed copy arrives: a duplicate
            assert ledger.claim(conn, [held]) == set()

        assert repo.operators.resolve([dlq_id], actor="test", note="done") == [dlq_id]
        assert pruner.prune_once() == 1  # a closed row holds nothing
        assert scalar(db, "SELECT count(*) FROM applied_events") == 0


def test_open_rows_from_before_the_ledger_key_get_the_workers_key(db: psycopg.Connection[Any]) -> None:
    """Rows written before migration 0006 had no key, so the pruner could forget their events."""
    from eventhandler.migrate import migrations_dir

    failures = [
        failed_message(consumer="group-ü", event_source="/sö", event_id="é-1", offset=1),
        failed_message(consumer="group-ü", event_source="/s", event_id="closed", offset=2),
        failed_message(consumer="group-ü", event_source=None, event_id=None, offset=3),
    ]
    with (
        psycopg_pool.ConnectionPool(db.info.dsn, min_size=1, max_size=1) as pool,
        pool.connection() as conn,
        conn.transaction(),
    ):
        DLQ.on(pool).writer.record_failures(conn, failures)
    db.execute("UPDATE dlq SET event_key = NULL")
    db.execute("UPDATE dlq SET status = 'resolved' WHERE event_id = 'closed'")
    db.execute((migrations_dir() / "0008_backfill_event_keys.sql").read_text())

    keys = dict(db.execute("SELECT source_offset, event_key FROM dlq").fetchall())
    assert keys == {1: uuid.UUID(bytes=digest("group-ü", ("/sö", "é-1"))), 2: None, 3: None}

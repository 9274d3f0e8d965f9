from __future__ import annotations

from typing import Any

import psycopg
import psycopg_pool

from eventhandler.ledger import Ledger, LedgerPruner, digest


def test_claim_recognises_duplicates_and_release_forgets_failures(db: psycopg.Connection[Any]) -> None:
    ledger = Ledger("g")
    with db.transaction():
        assert ledger.claim(db, [("/s", "1"), ("/s", "2")]) == {("/s", "1"), ("/s", "2")}
    with db.transaction():
        assert ledger.claim(db, [("/s", "2"), ("/s", "3"), ("/other", "2")]) == {("/s", "3"), ("/other", "2")}
        ledger.release(db, [("/s", "3")])
    assert Ledger("another-group").claim(db, [("/s", "1")]) == {("/s", "1")}  # per consumer group
    stored = {r[0] for r in db.execute("SELECT event_key FROM applied_events WHERE consumer = 'g'")}
    assert stored == {digest("g", key) for key in [("/other", "2"), ("/s", "1"), ("/s", "2")]}


def test_positions_round_trip(db: psycopg.Connection[Any]) -> None:
    ledger = Ledger("g")
    ledger.save_positions(db, {("t", 0): 10, ("t", 1): 5})
    ledger.save_positions(db, {("t", 0): 12})
    assert ledger.load_positions(db, [("t", 0), ("t", 1), ("t", 2)]) == {("t", 0): 12, ("t", 1): 5}


def test_pruner_forgets_only_events_older_than_the_retention(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    ledger = Ledger("g")
    ledger.claim(db, [("/s", str(i)) for i in range(25_000)])
    ledger.claim(db, [("/s", "fresh")])
    Ledger("other").claim(db, [("/s", "old-but-other-group")])
    db.execute(
        "UPDATE applied_events SET applied_at = now() - interval '8 days' WHERE event_key <> %s",
        (digest("g", ("/s", "fresh")),),
    )
    with psycopg_pool.ConnectionPool(db_url, min_size=1, max_size=1) as pool:
        pruned = LedgerPruner(pool, ledger, retention_seconds=7 * 86400).prune_once()
    assert pruned == 25_000  # in bounded batches, until nothing old is left
    rows = db.execute("SELECT consumer, event_key FROM applied_events ORDER BY 1").fetchall()
    assert rows == [
        ("g", digest("g", ("/s", "fresh"))),
        ("other", digest("other", ("/s", "old-but-other-group"))),
    ]

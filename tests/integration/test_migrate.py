from __future__ import annotations

import subprocess
import sys
import threading
import time

import psycopg
import pytest

from eventhandler.errors import MigrationError
from eventhandler.migrate import Migration, apply_migrations, load_migrations
from tests.support.services import with_database


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def _migrate(url: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "EVENTHANDLER_DATABASE_URL": url, **settings}
    return subprocess.run(
        [sys.executable, "-m", "eventhandler", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_migrate_twice_on_an_empty_database(empty_db_url: str) -> None:
    first = _migrate(empty_db_url)
    assert first.returncode == 0, first.stderr
    assert f"applied {len(load_migrations())} migration(s)" in first.stdout
    assert {
        "dlq",
        "dlq_audit",
        "devices",
        "device_latest_readings",
        "consumer_positions",
        "applied_events",
        "schema_migrations",
    } <= _tables(empty_db_url)
    second = _migrate(empty_db_url)
    assert second.returncode == 0, second.stderr
    assert "applied 0 migration(s)" in second.stdout


def test_migrate_creates_a_missing_database(pg_admin_url: str) -> None:
    name = "eh_created_by_migrate_test"
    url = with_database(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
    try:
        result = _migrate(url)
        assert result.returncode == 0, result.stderr
        assert "dlq" in _tables(url)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_two_processes_migrating_at_once_apply_each_migration_once(empty_db_url: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(empty_db_url, autocommit=True) as conn:
                results.append(apply_migrations(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    applied = sorted(v for r in results for v in r)
    assert applied == sorted(m.version for m in load_migrations())
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(load_migrations()),)


def test_a_failing_migration_leaves_nothing_half_done(empty_db_url: str) -> None:
    broken = [
        Migration("0001_ok", "CREATE TABLE ok_table (id int)"),
        Migration("0002_broken", "CREATE TABLE half (id int); SELECT no_such_function()"),
    ]
    with (
        psycopg.connect(empty_db_url, autocommit=True) as conn,
        pytest.raises(MigrationError, match="0002_broken"),
    ):
        apply_migrations(conn, broken)
    tables = _tables(empty_db_url)
    assert "ok_table" in tables
    assert "half" not in tables


def test_an_edited_applied_migration_is_reported(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        apply_migrations(conn, [Migration("0001_x", "CREATE TABLE x (id int)")])
        with pytest.raises(MigrationError, match="changed after it was applied"):
            apply_migrations(conn, [Migration("0001_x", "CREATE TABLE x (id bigint)")])


def test_migrate_reports_an_unreachable_database_in_one_line() -> None:
    result = _migrate("postgresql://postgres@127.0.0.1:1/nothing")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: migrate failed:")


def test_migrate_beside_a_transaction_holding_the_table_waits_and_succeeds(empty_db_url: str) -> None:
    """A worker's or a replay's transaction on `dlq` makes the pending migration wait for its lock
    (in short tries, so as not to queue everyone behind it), not fail on the 1 s lock timeout."""
    migrations = load_migrations()
    # the pending ones start with the last that alters dlq's columns (an exclusive lock)
    first = max(i for i, m in enumerate(migrations) if "ALTER TABLE dlq ADD" in m.sql)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        apply_migrations(conn, migrations[:first])
    holding = threading.Event()

    def hold_dlq() -> None:
        with psycopg.connect(empty_db_url) as conn:
            conn.execute("LOCK TABLE dlq IN ROW EXCLUSIVE MODE")  # what a worker's batch holds
            holding.set()
            time.sleep(5)  # the transaction of the other process, not a wait for a condition

    holder = threading.Thread(target=hold_dlq)
    holder.start()
    assert holding.wait(10)
    started = time.monotonic()
    result = _migrate(empty_db_url, EVENTHANDLER_DB_STATEMENT_TIMEOUT_SECONDS="1")
    holder.join()
    assert result.returncode == 0, result.stderr
    pending = ", ".join(m.version for m in migrations[first:])
    assert f"applied {len(migrations) - first} migration(s): {pending}" in result.stdout
    assert time.monotonic() - started >= 4  # it did wait for the holder
    assert "migration_waiting_for_locks" in result.stderr

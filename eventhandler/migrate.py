"""Apply the migrations in version order, each in its own transaction, once: the engine's
(`migrations/*.sql`) and the example domain's (`eventhandler/example/migrations/*.sql`).

Two processes migrating at once serialize on an advisory lock; the second finds nothing to do.
A file whose content changed after it was applied is reported, not silently re-run.

Beside running workers and replays: a migration waits for a table lock at most `LOCK_WAIT_SECONDS` at a
time (a waiting `ALTER TABLE` queues every later lock on the table behind it, so it must not wait long)
and then tries again, until `LOCK_DEADLINE_SECONDS`; statements themselves have no time limit (an index
build may take a while), whatever the session's statement timeout.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from eventhandler.errors import MigrationError
from eventhandler.logs import get_logger

log = get_logger("eventhandler.migrate")

# pg_advisory_lock key: any constant unique to this application ("evhdlr" in ASCII).
_LOCK_KEY = 0x657668646C72

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text        PRIMARY KEY,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_APPLIED = "SELECT version, checksum FROM schema_migrations"
_SET_LOCK_WAIT = "SELECT set_config('lock_timeout', %s, true)"
_RECORD = "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)"


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """The packaged copy in a wheel install, else the repository's `migrations/` (editable install)."""
    packaged = importlib.resources.files("eventhandler").joinpath("migrations")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "migrations"


EXAMPLE_MIGRATIONS = Path(__file__).resolve().parent / "example" / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """The migrations of `directory`, else the engine's and the example domain's, in version order."""
    directories = [directory] if directory else [migrations_dir(), EXAMPLE_MIGRATIONS]
    files = sorted((path for d in directories for path in d.glob("*.sql")), key=lambda path: path.stem)
    if not files:
        raise MigrationError(f"no migrations found in {', '.join(map(str, directories))}")
    versions = [path.stem for path in files]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version in {', '.join(map(str, directories))}")
    return [Migration(path.stem, path.read_text(encoding="utf-8")) for path in files]


LOCK_WAIT_SECONDS = 3.0
LOCK_DEADLINE_SECONDS = 600.0


def apply_migrations(
    conn: psycopg.Connection[Any],
    migrations: list[Migration] | None = None,
    *,
    lock_deadline: float = LOCK_DEADLINE_SECONDS,
) -> list[str]:
    """Apply what is pending; returns the versions applied now. `conn` must be in autocommit mode."""
    migrations = migrations if migrations is not None else load_migrations()
    conn.execute("SET statement_timeout = 0")  # waiting for another migrator, or building an index
    conn.execute("SET lock_timeout = 0")
    conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        conn.execute(_CREATE_TABLE)
        applied = dict(conn.execute(_APPLIED).fetchall())
        done: list[str] = []
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version} changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            _apply_one(conn, migration, time.monotonic() + lock_deadline)
            done.append(migration.version)
        return done
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


def _apply_one(conn: psycopg.Connection[Any], migration: Migration, deadline: float) -> None:
    attempt = 0
    while True:
        attempt += 1
        try:
            with conn.transaction():
                conn.execute(_SET_LOCK_WAIT, (f"{int(LOCK_WAIT_SECONDS * 1000)}ms",))
                conn.execute(migration.sql.encode())
                conn.execute(_RECORD, (migration.version, migration.checksum))
            return
        except psycopg.errors.LockNotAvailable as exc:
            if time.monotonic() > deadline:
                why = f"could not get its locks in {attempt} attempts: {exc}".strip()
                raise MigrationError(f"migration {migration.version} {why}") from exc
            log.info("migration_waiting_for_locks", version=migration.version, attempt=attempt)
            time.sleep(min(5.0, 0.2 * attempt))
        except psycopg.Error as exc:
            raise MigrationError(f"migration {migration.version} failed: {exc}".strip()) from exc


def ensure_database(dsn: str, **connect_kwargs: Any) -> bool:
    """Create the database named in `dsn` if it does not exist; True when it was created."""
    params = conninfo_to_dict(dsn)
    name = params.get("dbname")
    if not name:
        return False
    admin_dsn = make_conninfo(dsn, dbname="postgres")
    with psycopg.connect(admin_dsn, autocommit=True, **connect_kwargs) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(name))))
        except psycopg.errors.DuplicateDatabase:
            return False  # another process created it between our check and our create
        return True

"""Apply `migrations/*.sql` in order, each in its own transaction, once.

Two processes migrating at once serialize on an advisory lock; the second finds nothing to do.
A file whose content changed after it was applied is reported, not silently re-run.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from eventhandler.errors import MigrationError

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


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    files = sorted(directory.glob("*.sql"))
    if not files:
        raise MigrationError(f"no migrations found in {directory}")
    return [Migration(path.stem, path.read_text(encoding="utf-8")) for path in files]


def apply_migrations(conn: psycopg.Connection[Any], migrations: list[Migration] | None = None) -> list[str]:
    """Apply what is pending; returns the versions applied now. `conn` must be in autocommit mode."""
    migrations = migrations if migrations is not None else load_migrations()
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
            try:
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute(_RECORD, (migration.version, migration.checksum))
            except psycopg.Error as exc:
                raise MigrationError(f"migration {migration.version} failed: {exc}".strip()) from exc
            done.append(migration.version)
        return done
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


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

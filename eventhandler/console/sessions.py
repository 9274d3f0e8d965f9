"""The console's sessions, in PostgreSQL: a browser signs in with a token once and holds a random
session value in an HttpOnly cookie; the token itself is never stored in the browser or here.

The table keeps the SHA-256 of the session value (not the value), the role, a digest of the token that
signed in (a session whose token is no longer configured is over: rotating a token signs its browsers
out), the session's CSRF token and its expiry. Any replica of the API reads the same sessions, and
signing out deletes the row: a copied cookie is dead from then on.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg_pool

from eventhandler.api.auth import Role
from eventhandler.db import translate_db_errors

SESSION_SECONDS = 8 * 3600

CREATE = """
INSERT INTO console_session (session_digest, role, token_digest, csrf_token, client, expires_at)
VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s))
"""
FIND = """
SELECT role, token_digest, csrf_token FROM console_session
WHERE session_digest = %s AND expires_at > now()
"""
DELETE = "DELETE FROM console_session WHERE session_digest = %s"
PURGE = "DELETE FROM console_session WHERE expires_at < now()"


@dataclass(frozen=True)
class Session:
    role: Role
    csrf_token: str

    @property
    def may_change(self) -> bool:
        return self.role == "admin"

    @property
    def actor(self) -> str:
        """Who the audit log names for a change made in the console."""
        return f"console:{self.role}"

    def csrf_ok(self, presented: str | None) -> bool:
        if presented is None or not presented.isascii():
            return False
        return hmac.compare_digest(presented.encode(), self.csrf_token.encode())


class SessionStore:
    def __init__(self, pool: psycopg_pool.ConnectionPool, *, seconds: int = SESSION_SECONDS) -> None:
        self._pool = pool
        self.seconds = seconds

    def create(self, role: Role, token_digest: bytes, client: str | None) -> str:
        """A new session; returns the cookie's value (shown once, to the browser)."""
        value = secrets.token_urlsafe(32)
        with translate_db_errors(), self._pool.connection() as conn:
            conn.execute(PURGE)
            conn.execute(
                CREATE, (_digest(value), role, token_digest, secrets.token_urlsafe(32), client, self.seconds)
            )
        return value

    def find(self, value: str | None, roles: Mapping[bytes, Role]) -> Session | None:
        """The live session a cookie names, with the role its token has now (`roles`: token digest →
        role); None when that token is no longer configured."""
        if not value or len(value) > 100 or not value.isascii():
            return None
        with translate_db_errors(), self._pool.connection() as conn:
            row = conn.execute(FIND, (_digest(value),)).fetchone()
        role = roles.get(bytes(row[1])) if row is not None else None
        return None if row is None or role is None else Session(role, row[2])

    def delete(self, value: str | None) -> None:
        if value and len(value) <= 100 and value.isascii():
            with translate_db_errors(), self._pool.connection() as conn:
                conn.execute(DELETE, (_digest(value),))


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()

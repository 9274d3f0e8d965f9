"""PostgreSQL access: the connection pool and the one place driver errors become ours.

Every repository goes through `translate_db_errors`, so the rest of the code only ever sees
`TransientError` (retry later) or `PermanentError` (the data itself is at fault).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from eventhandler.config import Settings
from eventhandler.errors import (
    DatabaseUnavailable,
    PermanentError,
    ProjectionFailure,
    SuspectFailure,
    TransientError,
)

# SQLSTATE classes where the data of one statement is at fault: retrying cannot help. Class 54
# (program limit exceeded) is one event's data too: an index row too large, a statement too complex.
_PERMANENT_CLASSES = ("22", "23", "54")
# Errors PostgreSQL answers with that may belong to the data or to the situation (see SuspectFailure).
_SUSPECT_STATES = {"57014", "XX000"}  # query_canceled (statement timeout), internal_error
# Errors raised by user code in PL/pgSQL (RAISE EXCEPTION) are deterministic too.
_PERMANENT_STATES = {"P0001"}


def is_permanent(exc: BaseException) -> bool:
    """True when PostgreSQL rejected the data itself (constraint, bad value), not the situation."""
    if isinstance(exc, psycopg.DataError | psycopg.IntegrityError):
        return True  # includes values psycopg itself refuses to send (a NUL character in text)
    if isinstance(exc, psycopg.Error) and exc.sqlstate:
        return exc.sqlstate[:2] in _PERMANENT_CLASSES or exc.sqlstate in _PERMANENT_STATES
    return isinstance(exc, UnicodeEncodeError)  # text that cannot be encoded for the server


def classify(exc: BaseException) -> Exception:
    """Map a driver exception to the project's exception (call as `raise classify(e) from e`)."""
    if isinstance(exc, TransientError | PermanentError):
        return exc
    if is_permanent(exc):
        return ProjectionFailure(error_text(exc))
    if isinstance(exc, psycopg.Error) and exc.sqlstate in _SUSPECT_STATES:
        return SuspectFailure(_first_line(exc))
    if isinstance(exc, psycopg_pool.PoolTimeout | psycopg.OperationalError | psycopg.InterfaceError):
        return DatabaseUnavailable(_first_line(exc))
    if isinstance(exc, pg_errors.SerializationFailure | pg_errors.DeadlockDetected):
        return TransientError(_first_line(exc))
    if isinstance(exc, psycopg.Error):
        # Missing tables, permissions, a server restart: the situation, not the event, is at fault.
        return TransientError(_first_line(exc))
    return exc if isinstance(exc, Exception) else TransientError(repr(exc))


def error_text(exc: BaseException) -> str:
    """What an error says, without the row's values: PostgreSQL's DETAIL ("Failing row contains
    (…)", "Key (…)=(…) already exists") carries the event's data, which belongs in the payload (where
    the admin API's redaction applies), not in an error message every reader sees and logs repeat."""
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        text = exc.diag.message_primary.strip()
        return f"{text} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else text
    return str(exc).strip() or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def own_connection(pool: psycopg_pool.ConnectionPool, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A connection of its own, configured like the pool's, for work that holds one for long (a
    replay's lease, a simulation): it would otherwise keep a pooled connection from the requests."""
    conninfo, kwargs = pool.conninfo, pool.kwargs
    options = dict(kwargs() if callable(kwargs) else kwargs or {})
    return psycopg.connect(
        conninfo() if callable(conninfo) else conninfo, **(options | {"autocommit": autocommit})
    )


@contextmanager
def translate_db_errors() -> Iterator[None]:
    try:
        yield
    except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
        raise classify(exc) from exc


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    timeout_ms = int(settings.db_statement_timeout_seconds * 1000)
    # A lock wait must end as a lock timeout (55P03, transient) before the statement timeout (57014,
    # suspect: isolated if it persists) can fire: a row someone holds locked is not the event's fault.
    lock_ms = max(1, timeout_ms // 2)
    return {
        "connect_timeout": max(1, int(settings.db_connect_timeout_seconds)),
        "options": f"-c statement_timeout={timeout_ms} -c lock_timeout={lock_ms}",
        "application_name": f"eventhandler/{settings.consumer_group}"[:63],
        # TCP keepalives turn a silent network black hole into an error instead of a hang.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": int(settings.db_connect_timeout_seconds * 1000) + timeout_ms,
    }


def create_pool(
    settings: Settings, *, min_size: int = 1, name: str = "eventhandler", open_now: bool = True
) -> psycopg_pool.ConnectionPool:
    """A pool that connects in the background: a worker starts (and reports not-ready) while
    PostgreSQL is down. `open_now=False`: the caller opens it (`pool.open(wait=False)`)."""
    pool = psycopg_pool.ConnectionPool(
        settings.dsn,
        min_size=min(min_size, settings.db_pool_size),
        max_size=settings.db_pool_size,
        kwargs=connection_kwargs(settings),
        timeout=settings.db_connect_timeout_seconds,
        name=name,
        open=False,
    )
    if open_now:
        pool.open(wait=False)
    return pool


class _Watchdog:
    """One daemon thread that runs the actions of passed deadlines.

    A `threading.Timer` per block started a thread per batch, and starting a thread waits for it to
    run: while another thread holds the GIL, 5.6 ms instead of 0.1 (benchmarks/README.md). Arming is a
    dict insert; the thread is woken only for a deadline earlier than its next wake-up."""

    IDLE_SECONDS = 1.0  # how long the thread sleeps when no deadline is nearer

    def __init__(self) -> None:
        self._tokens = itertools.count()
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        """Forget every deadline and the thread: in a forked child, the parent's deadlines are not its
        own, its thread does not exist, and its lock may have been held at the fork."""
        self._lock = threading.Condition()
        self._armed: dict[int, tuple[float, Callable[[], None]]] = {}
        self._fired: set[int] = set()  # tokens whose action ran, until their `disarm`
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # monotonic time the thread looks again

    def arm(self, seconds: float, action: Callable[[], None]) -> int:
        when = time.monotonic() + seconds
        with self._lock:
            token = next(self._tokens)
            self._armed[token] = (when, action)
            if self._thread is None or not self._thread.is_alive():
                try:
                    thread = threading.Thread(target=self._run, name="db-deadlines", daemon=True)
                    thread.start()
                except BaseException:
                    del self._armed[token]
                    raise
                self._thread, self._wake_at = thread, when
            elif when < self._wake_at:
                self._wake_at = when
                self._lock.notify()
        return token

    def disarm(self, token: int) -> bool:
        """Whether the deadline had passed (its action ran). Once this returns, it never will."""
        with self._lock:
            self._armed.pop(token, None)
            fired = token in self._fired
            self._fired.discard(token)
            return fired

    def _run(self) -> None:
        # Actions run under the lock (they are short and never block): once `disarm` returns, its
        # action has either run or never will, so a connection back in the pool is never broken late.
        while True:
            failures: list[BaseException] = []
            with self._lock:
                now = time.monotonic()
                for token in [token for token, (when, _) in self._armed.items() if when <= now]:
                    self._fired.add(token)
                    try:
                        self._armed.pop(token)[1]()
                    except BaseException as exc:  # the thread serves every deadline of the process
                        failures.append(exc)
                if not failures:
                    nearest = min((when for when, _ in self._armed.values()), default=now + self.IDLE_SECONDS)
                    self._wake_at = min(nearest, now + self.IDLE_SECONDS)
                    self._lock.wait(self._wake_at - now)
            for failure in failures:  # logged outside the lock: a slow log handler holds up no deadline
                logging.getLogger(__name__).error("deadline action failed", exc_info=failure)


_WATCHDOG = _Watchdog()


@contextmanager
def deadline(conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
    """Break the connection if the block takes longer than `seconds`.

    A server that silently stops answering (a network black hole) never trips the server-side
    statement timeout, and TCP keepalives may be answered by a middlebox; shutting the socket down
    makes the blocked call fail with an error the worker knows how to retry.
    """

    def expire() -> None:
        try:
            fd = os.dup(conn.pgconn.socket)
        except (OSError, psycopg.OperationalError):
            return
        with socket.socket(fileno=fd) as sock, suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    token = _WATCHDOG.arm(seconds, expire)
    try:
        yield
    finally:
        if _WATCHDOG.disarm(token):
            # It fired as the block ended: libpq may still call the connection good, and the pool
            # would hand its dead socket to the next caller.
            conn.close()

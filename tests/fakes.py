"""Fakes for unit tests: stand-ins for the seams the package talks through (a psycopg connection,
the DLQ repository), recording what was asked of them so tests can assert on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from eventhandler.models import FailedMessage

Rows = list[tuple[Any, ...]]
Answer = Callable[[str, Any], Rows]


@dataclass(frozen=True)
class Statement:
    query: str
    params: Any


class _Result:
    def __init__(self, rows: Rows) -> None:
        self._rows = rows

    def fetchall(self) -> Rows:
        return list(self._rows)

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None


class _Cursor:
    def __init__(self, conn: FakeConnection) -> None:
        self._conn = conn

    def execute(self, query: Any, params: Any = None) -> _Result:
        return self._conn.execute(query, params)

    def __enter__(self) -> _Cursor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class FakeConnection:
    """Records every `execute` (on the connection or a cursor); `answer(query, params)` gives the rows
    a statement returns (none by default)."""

    answer: Answer = lambda _query, _params: []
    statements: list[Statement] = field(default_factory=list)

    def execute(self, query: Any, params: Any = None) -> _Result:
        text = query if isinstance(query, str) else repr(query)
        self.statements.append(Statement(text, params))
        return _Result(self.answer(text, params))

    def cursor(self) -> _Cursor:
        return _Cursor(self)

    @contextmanager
    def pipeline(self) -> Iterator[None]:
        yield

    @contextmanager
    def transaction(self) -> Iterator[None]:
        yield

    def queries(self) -> list[str]:
        return [s.query for s in self.statements]

    def params_of(self, query: str) -> Any:
        """The parameters of the one statement whose text is `query`."""
        found = [s.params for s in self.statements if s.query == query]
        assert len(found) == 1, f"expected one execution of the statement, got {len(found)}"
        return found[0]


@dataclass
class FakeDLQRepository:
    """An in-memory `DLQRepository`: failures get ids in order; resolutions are recorded."""

    failures: list[FailedMessage] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)

    def record_failures(self, conn: Any, failures: Sequence[FailedMessage]) -> list[int]:
        start = len(self.failures) + 1
        self.failures.extend(failures)
        return list(range(start, start + len(failures)))

    def resolve_replayed(self, conn: Any, consumer: str, dlq_ids: Sequence[int]) -> list[int]:
        self.resolved.extend(dlq_ids)
        return list(dlq_ids)

"""Fakes for unit tests: stand-ins for the seams the package talks through, each declared as the
Protocol it fakes (mypy checks this module against them), recording what was asked of them so tests
can assert on it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from eventhandler.batch import TP, BatchResult, DecodedBatch, Record
from eventhandler.dlq import DeadLetterWriter, Replay
from eventhandler.errors import DatabaseUnavailable, SuspectFailure
from eventhandler.flood import Circuit, CircuitStore
from eventhandler.inflight import BatchWrites
from eventhandler.models import FailedMessage
from eventhandler.worker import Decoder, Reader

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
class FakeDeadLetterWriter(DeadLetterWriter):
    """An in-memory DLQ for the worker: failures get ids in order; resolutions are recorded."""

    failures: list[FailedMessage] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)

    def record_failures(self, conn: Any, failures: Sequence[FailedMessage]) -> list[int]:
        start = len(self.failures) + 1
        self.failures.extend(failures)
        return list(range(start, start + len(failures)))

    def open_replays(self, conn: Any, consumer: str, failures: Sequence[FailedMessage]) -> set[int]:
        """A replay of a row this fake stored is one of an open row."""
        return {
            n
            for n, f in enumerate(failures)
            if f.replay_of is not None and f.replay_of.dlq_id <= len(self.failures)
        }

    def resolve_replayed(self, conn: Any, consumer: str, replays: Sequence[Replay]) -> list[int]:
        ids = [origin.dlq_id for origin, *_ in replays]
        self.resolved.extend(ids)
        return ids


class FakeSource(Reader):
    """Kafka for the loop: `answers` are what consume() returns, one per call (a callable is called),
    then nothing; pauses, polls and offset commits are recorded."""

    def __init__(self, answers: list[Any] | None = None) -> None:
        self.topics = ["t"]
        self.session_timeout_ms = 45000
        self.assigned_at = 0.0
        self.paused = False
        self.assignment: set[TP] = {("t", 0), ("t", 1)}
        self.broker_error: str | None = None
        self.on_revoked: Callable[[set[TP]], None] = lambda _: None
        self.answers = answers or []
        self.timeouts: list[float] = []
        self.committed: list[dict[TP, int]] = []
        self.on_poll: list[Callable[[], None]] = []

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def consume(self, max_messages: int, timeout: float) -> list[Record]:
        self.timeouts.append(timeout)
        if not self.answers:
            time.sleep(timeout)
            return []
        answer = self.answers.pop(0)
        return list(answer() if callable(answer) else answer)

    def pause_all(self) -> None:
        self.paused = True

    def resume_all(self) -> None:
        self.paused = False

    def poll_while_paused(self, timeout: float) -> None:
        if self.on_poll:
            self.on_poll.pop(0)()

    def commit_offsets(self, positions: dict[TP, int]) -> None:
        self.committed.append(positions)


class FakeProcessor(Decoder):
    """Decodes nothing; writes fail while `down` is set, like PostgreSQL being away, and with a
    statement timeout while `suspect` is set unless they isolate."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay  # PostgreSQL at work
        self.down = False
        self.suspect = False
        self.isolations: list[bool] = []
        self.committed: list[list[tuple[str, int, int]]] = []

    def decode(self, records: list[Record]) -> DecodedBatch:
        return DecodedBatch(records)

    def write(self, conn: Any, batch: DecodedBatch, *, isolate_suspects: bool = False) -> BatchResult:
        time.sleep(self.delay)
        self.isolations.append(isolate_suspects)
        if self.down:
            raise DatabaseUnavailable("connection refused")
        if self.suspect and not isolate_suspects:
            raise SuspectFailure("canceling statement due to statement timeout")
        self.committed.append([(r.topic, r.partition, r.offset) for r in batch.records])
        return BatchResult(positions=batch.positions())


class FakeTransaction(BatchWrites):
    """The in-flight batch's transaction: straight into the processor, PostgreSQL answering a probe."""

    def __init__(self, processor: FakeProcessor) -> None:
        self.processor = processor

    def __call__(self, batch: DecodedBatch, *, isolate_suspects: bool = False) -> BatchResult:
        return self.processor.write(None, batch, isolate_suspects=isolate_suspects)

    def postgres_answers(self) -> bool:
        return True


@dataclass
class FakeCircuitStore(CircuitStore):
    """`flood_circuit` in memory: fingerprint → (open, event types, tried_at, dead_letter_until), on
    the clock the test gives."""

    clock: Callable[[], float] = time.monotonic
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    held: list[Circuit] = field(default_factory=list)

    def open_circuits(self, conn: Any, consumer: str) -> dict[str, frozenset[str]]:
        return {fp: row["event_types"] for fp, row in self.rows.items() if row["open"]}

    def dead_letter_until(self, conn: Any, consumer: str, fingerprints: Sequence[str]) -> dict[str, float]:
        now = self.clock()
        return {
            fp: self.rows[fp]["until"] - now
            for fp in fingerprints
            if fp in self.rows and self.rows[fp]["until"] > now
        }

    def hold(self, conn: Any, consumer: str, circuit: Circuit, worker_id: str) -> bool | None:
        row = self.rows.get(circuit.fingerprint)
        if row is not None and row["until"] > self.clock():
            return None  # an operator's close is in force
        self.held.append(circuit)
        was_open = row is not None and row["open"]
        self.rows[circuit.fingerprint] = {
            "open": True,
            "event_types": circuit.event_types,
            "tried_at": self.clock(),
            "until": 0.0,
        }
        return not was_open

    def close(
        self,
        conn: Any,
        consumer: str,
        fingerprints: Sequence[str],
        worker_id: str,
        *,
        untried_for: float | None = None,
    ) -> list[str]:
        closed = []
        for fp in fingerprints:
            row = self.rows.get(fp)
            if row is None or not row["open"]:
                continue
            if untried_for is not None and row["tried_at"] >= self.clock() - untried_for:
                continue
            row["open"] = False
            closed.append(fp)
        return closed

    def opened_elsewhere(self, fingerprint: str, event_types: frozenset[str] = frozenset()) -> None:
        """A circuit another worker opened just now."""
        self.rows[fingerprint] = {
            "open": True,
            "event_types": event_types,
            "tried_at": self.clock(),
            "until": 0.0,
        }

    def close_by_operator(self, fingerprint: str, seconds: float) -> None:
        self.rows[fingerprint].update(open=False, until=self.clock() + seconds)

"""Simulate a replay: what would the current code do with these DLQ rows, if they were replayed now?

The rows are turned into the messages a replay would publish (`replay.replay_message`: the payload,
edited when an operator repaired it, the key and the headers with the replay's own), and run through
the worker's own steps — the deserializer, the ledger's duplicate check, the handlers and the
projection writes (`pipeline.BatchProcessor`) — oldest first, as the worker would meet them, in one
PostgreSQL transaction that is always rolled back. Nothing is published and nothing changes.

While it runs, the simulation holds what it wrote (projection rows, ledger claims) like any
transaction: a worker writing the same rows waits for it (seconds for 10,000 rows; the benchmark
measures it). It never waits long for a worker in turn: a lock it cannot get within `LOCK_TIMEOUT`
ends it with `Busy`, and the operator runs it again.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
import psycopg_pool

from eventhandler import __version__
from eventhandler.batch import Record
from eventhandler.db import own_connection, translate_db_errors
from eventhandler.dlq import rows
from eventhandler.dlq.writer import PostgresDLQWriter
from eventhandler.errors import Busy, InvalidOperation, TransientError
from eventhandler.events import Deserializer, Event
from eventhandler.handlers import Registry
from eventhandler.ledger import Ledger
from eventhandler.models import DLQEntry, DLQFilter, Headers
from eventhandler.pipeline import BatchProcessor
from eventhandler.policy import FailurePolicy
from eventhandler.redaction import Redactor
from eventhandler.replay import replay_message

Outcome = Literal["apply", "fail", "duplicate", "skip"]
OUTCOMES: tuple[Outcome, ...] = ("apply", "fail", "duplicate", "skip")
CHUNK = 500  # rows read and run at a time, all in the one transaction
MAX_ROWS = 100_000  # one simulation holds its locks until it ends: a bound on how long that is
LOCK_TIMEOUT = "5s"
# The least of LOCK_TIMEOUT, the connection's own lock timeout and half its statement timeout (each when
# set; in ms, at least 1: 0 would mean none): a lock wait must end as a lock timeout (Busy), not as a
# statement timeout, also where a pooler dropped the connection's options.
LOWER_LOCK_TIMEOUT = """
SELECT set_config('lock_timeout', greatest(1, round(1000 * extract(epoch FROM least(
    %(lock_timeout)s::interval,
    nullif(current_setting('lock_timeout')::interval, '0'),
    nullif(current_setting('statement_timeout')::interval, '0') / 2))))::bigint::text, true)
"""


@dataclass
class RowPrediction:
    dlq_id: int
    fingerprint: str  # the row's error group now
    outcome: Outcome
    stage: str | None = None  # with "fail": the failure the replay would meet
    error_type: str | None = None
    error_message: str | None = None
    new_fingerprint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class GroupPrediction:
    """What a replay would do to one error group's selected rows."""

    fingerprint: str
    rows: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    new_errors: Counter[str] = field(default_factory=Counter)  # new fingerprint → rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "rows": self.rows,
            "outcomes": {o: self.outcomes[o] for o in OUTCOMES},
            "new_errors": dict(self.new_errors.most_common()),
        }


@dataclass
class Simulation:
    matched: int = 0
    rows: list[RowPrediction] = field(default_factory=list)
    code: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def outcomes(self) -> dict[str, int]:
        counts = Counter(r.outcome for r in self.rows)
        return {o: counts[o] for o in OUTCOMES}

    def groups(self) -> list[GroupPrediction]:
        """By the rows' error group now, largest first."""
        groups: dict[str, GroupPrediction] = {}
        for row in self.rows:
            group = groups.setdefault(row.fingerprint, GroupPrediction(row.fingerprint))
            group.rows += 1
            group.outcomes[row.outcome] += 1
            if row.new_fingerprint is not None:
                group.new_errors[row.new_fingerprint] += 1
        return sorted(groups.values(), key=lambda g: (-g.rows, g.fingerprint))

    def failures(self) -> list[dict[str, Any]]:
        """The failures the replay would meet, by their fingerprint, largest first, with a sample."""
        found: dict[str, dict[str, Any]] = {}
        for row in self.rows:
            if row.new_fingerprint is None:
                continue
            group = found.setdefault(
                row.new_fingerprint,
                {
                    "fingerprint": row.new_fingerprint,
                    "rows": 0,
                    "stage": row.stage,
                    "error_type": row.error_type,
                    "sample_message": row.error_message,
                    "sample_id": row.dlq_id,
                },
            )
            group["rows"] += 1
        return sorted(found.values(), key=lambda g: (-g["rows"], g["fingerprint"]))

    def as_dict(self) -> dict[str, Any]:
        return {
            "matched": self.matched,
            "outcomes": self.outcomes,
            "groups": [g.as_dict() for g in self.groups()],
            "failures": self.failures(),
            "rows": [r.as_dict() for r in self.rows],
            "code": self.code,
            "seconds": round(self.seconds, 3),
        }


def code_identity(registry: Registry, handlers: Sequence[str]) -> dict[str, Any]:
    """Which code a simulation ran: the package's version, `EVENTHANDLER_HANDLERS`, and per projection
    the SHA-256 of its module's source (two deployments with the same digests ran the same handlers)."""
    projections = {}
    for projection in registry.projections:
        module = inspect.getmodule(type(projection))
        try:
            source = inspect.getsource(module) if module is not None else ""
        except (OSError, TypeError):
            source = ""
        projections[projection.name] = {
            "module": module.__name__ if module is not None else None,
            "source_sha256": hashlib.sha256(source.encode()).hexdigest()[:16] if source else None,
        }
    return {"eventhandler": __version__, "handlers": list(handlers), "projections": projections}


class Simulator:
    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool,
        registry: Callable[[], Registry],
        *,
        handlers: Sequence[str] = (),
        skip_unknown: bool = False,
        redactor: Redactor | None = None,
    ) -> None:
        """`registry` loads the handlers on the first simulation: an operator's `dlq list` must not
        need the handler modules to import."""
        self._pool = pool
        self._load_registry = registry
        self._registry: Registry | None = None
        self._deserializer = Deserializer({})
        self._handlers = list(handlers)
        self._redactor = redactor or Redactor(())
        # The worker's policy, but a transient failure (a lock the simulation did not get, PostgreSQL
        # gone) ends the simulation instead of a retry: it says nothing about the rows.
        self._policy = FailurePolicy(skip_unknown=skip_unknown)
        self._processors: dict[str, BatchProcessor] = {}

    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._load_registry()
            self._deserializer = Deserializer(self._registry.payload_models)
        return self._registry

    def deserialize(self, value: bytes | None, headers: Headers) -> Event:
        """The current deserializer, of the handlers this process loaded (a repair is checked with it)."""
        self.registry()
        return self._deserializer(value, headers)

    def simulate(self, flt: DLQFilter, *, limit: int | None = None) -> Simulation:
        started = time.monotonic()
        ids = rows.matching_ids(self._pool, flt, MAX_ROWS + 1 if limit is None else min(limit, MAX_ROWS))
        if len(ids) > MAX_ROWS:
            raise InvalidOperation(f"more than {MAX_ROWS:,} rows match: narrow the filter, or give a limit")
        report = Simulation(matched=len(ids), code=code_identity(self.registry(), self._handlers))
        try:
            # A connection of its own, not the pool's: a simulation holds it for its whole run.
            with (
                translate_db_errors(),
                own_connection(self._pool) as conn,
                conn.transaction(force_rollback=True),
            ):
                conn.execute(LOWER_LOCK_TIMEOUT, {"lock_timeout": LOCK_TIMEOUT})
                for start in range(0, len(ids), CHUNK):
                    chunk = rows.entries(conn, ids[start : start + CHUNK])
                    # a row gone since the ids were read (deleted, purged) is not simulated
                    entries = [chunk[i] for i in ids[start : start + CHUNK] if i in chunk]
                    report.rows += self._run(conn, entries)
        except TransientError as exc:  # translate_db_errors wraps PostgreSQL's errors
            if isinstance(exc.__cause__, _WAITED):
                raise Busy(_BUSY) from exc
            raise
        except SystemExit as exc:  # a handler's: it must not end the process that runs the simulation
            raise InvalidOperation(f"a handler raised SystemExit({exc.code!r}); nothing changed") from None
        report.seconds = time.monotonic() - started
        return report

    def _run(self, conn: psycopg.Connection[Any], entries: list[DLQEntry]) -> list[RowPrediction]:
        """Each consumer's rows through its own processor (the ledger is per consumer group)."""
        by_consumer: dict[str, list[DLQEntry]] = {}
        for entry in entries:
            by_consumer.setdefault(entry.consumer, []).append(entry)
        predicted: dict[int, RowPrediction] = {}
        for consumer, selected in by_consumer.items():
            predicted |= self._run_consumer(conn, self._processor(consumer), selected)
        return [predicted[e.dlq_id] for e in entries]

    def _run_consumer(
        self, conn: psycopg.Connection[Any], processor: BatchProcessor, entries: list[DLQEntry]
    ) -> dict[int, RowPrediction]:
        records = [_as_replayed(entry) for entry in entries]
        of_record = {id(record): entry for record, entry in zip(records, entries, strict=True)}
        batch = processor.decode(records)
        applied, known, repeats, rejected, _late = processor.apply_in_order(
            conn, batch.events, isolate_suspects=False
        )
        predicted: dict[int, RowPrediction] = {}
        shown = self._redactor

        def put(record: Record, outcome: Outcome, **failure: Any) -> None:
            entry = of_record[id(record)]
            group = shown.fingerprint(entry.fingerprint)
            predicted[entry.dlq_id] = RowPrediction(entry.dlq_id, group, outcome, **failure)

        for decoded in applied:
            put(decoded.record, "apply")
        for decoded in (*known, *repeats):
            put(decoded.record, "duplicate")
        for rejection in (*batch.rejected, *rejected):
            failure, record = rejection.failure, rejection.record
            put(
                record,
                "fail",
                stage=failure.stage,
                error_type=failure.error_type,
                error_message=shown.entry_text(of_record[id(record)], failure.error_message),
                new_fingerprint=shown.fingerprint(failure.fingerprint),
            )
        for record in records:  # what decode skipped (an unknown type under unknown_event_policy=skip)
            if of_record[id(record)].dlq_id not in predicted:
                put(record, "skip")
        return predicted

    def _processor(self, consumer: str) -> BatchProcessor:
        if consumer not in self._processors:
            self._processors[consumer] = BatchProcessor(
                consumer_group=consumer,
                registry=self.registry(),
                ledger=Ledger(consumer),
                dlq=PostgresDLQWriter(),  # never written to: a simulation only reads its failures
                policy=self._policy,
            )
        return self._processors[consumer]


_WAITED = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)
_BUSY = (
    f"a worker holds rows the simulation needs (it waited up to {LOCK_TIMEOUT}); "
    "nothing changed: run it again"
)


def _as_replayed(entry: DLQEntry) -> Record:
    """A row as the message its replay would publish (at the row's own coordinates)."""
    value, headers = replay_message(entry)
    return Record(
        entry.source_topic,
        entry.source_partition,
        entry.source_offset,
        entry.message_key,
        value,
        headers,
        None if entry.message_timestamp is None else int(entry.message_timestamp.timestamp() * 1000),
    )

"""The flood guard: a systemic failure stops the line instead of flooding the dead letter queue.

A handler deployed with a bug, a renamed column or a producer gone wrong fails every event it sees;
dead-lettering them at full speed fills the DLQ with a million rows, each out of order with its key.
The guard tells such a failure from isolated poison by three numbers, for one fingerprint (stage,
error type, normalised message), over the committed batches of the last `window` seconds plus the
batch at hand:

- at least `min_failures` messages failed with it,
- they carry at least `min_keys` distinct Kafka keys (one broken entity is not a flood; a message
  without a key counts as a key of its own),
- and they are at least `ratio` of the messages read.

Then the fingerprint's circuit opens: the batch is rolled back and held as in an outage (positions do
not move, nothing is lost), the circuit is written to PostgreSQL (`flood_circuit`) where operators see
it, and the held batch is tried again every `probe_seconds` (half-open). A trial passes when fewer than
`ratio` of its own messages fail with the fingerprint — the fix was deployed, or what the events need
was repaired — and the circuit closes as the batch commits. An operator may close it instead
(`eventhandler circuit close`), choosing to dead-letter that failure for a while
(`dead_letter_until`); the worker reads it from PostgreSQL at its next trial.

Workers share the table, read again every probe interval: an operator's close reaches every worker,
and a circuit another worker opened is closed by a worker that applies events of the circuit's types
without that failure once no worker has tried it for `STALE_TRIALS` probe intervals (one that still
holds a batch for it may be failing). Each worker judges its own stream: one that starts, or takes
partitions over, while a circuit is open dead-letters fewer than `min_failures` before it holds too.

This module holds the rules and the window, with no I/O of its own: the statements are the store's
(`eventhandler.circuits`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from eventhandler.batch import TP, Decoded, DecodedBatch, Rejected
from eventhandler.errors import TransientError
from eventhandler.models import FailedMessage

STALE_TRIALS = 3  # a circuit no worker tried for this many probe intervals is held by nobody


@dataclass(frozen=True)
class Thresholds:
    window: float = 60.0
    min_failures: int = 50
    min_keys: int = 10
    ratio: float = 0.5
    probe_seconds: float = 30.0


@dataclass
class Group:
    """The failures of one fingerprint in a batch."""

    sample: FailedMessage  # the first, for what operators and the log line see
    count: int = 0
    keys: set[int] = field(default_factory=set)  # at most `min_keys` of them: that is all the rule asks
    event_types: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Circuit:
    """A fingerprint judged systemic, with the figures that judged it."""

    fingerprint: str
    sample: FailedMessage
    event_types: frozenset[str]
    failures: int  # in the window (or, on a trial, in the batch)
    messages: int
    keys: int


class CircuitOpen(TransientError):
    """A batch held because a failure in it is systemic. Not the batch's fault and not an outage:
    the same batch is tried again after `probe_seconds`."""

    def __init__(
        self, circuit: Circuit, probe_seconds: float, batch: tuple[frozenset[tuple[TP, int]], int]
    ) -> None:
        sample = circuit.sample
        # No error text and no fingerprint: readiness and retry lines show this, and both are
        # derived from payload values that redaction may hide.
        super().__init__(
            f"flood guard: {circuit.failures} of {circuit.messages} messages failed alike "
            f"({sample.stage}, {sample.error_type}; {circuit.keys}+ keys): circuit open, "
            f"trying again every {probe_seconds:g} s"
        )
        self.circuit = circuit
        self.probe_seconds = probe_seconds
        self.batch = batch  # the held batch's identity
        self.opened = False  # set once written: True when this hold opened the circuit
        self.exempted = False  # set once written: an operator closed it meanwhile (try again at once)


class CircuitStore(Protocol):
    """The worker's side of `flood_circuit` (`circuits.PostgresCircuitStore`)."""

    def open_circuits(self, conn: psycopg.Connection[Any], consumer: str) -> dict[str, frozenset[str]]: ...
    def dead_letter_until(
        self, conn: psycopg.Connection[Any], consumer: str, fingerprints: Sequence[str]
    ) -> dict[str, float]: ...
    def hold(
        self, conn: psycopg.Connection[Any], consumer: str, circuit: Circuit, worker_id: str
    ) -> bool | None: ...
    def close(
        self,
        conn: psycopg.Connection[Any],
        consumer: str,
        fingerprints: Sequence[str],
        worker_id: str,
        *,
        untried_for: float | None = None,
    ) -> list[str]: ...


@dataclass
class _Held:
    """The batch this worker holds, and the circuits it holds it for."""

    batch: tuple[frozenset[tuple[TP, int]], int]  # its partitions' next offsets and its size
    fingerprints: set[str]


@dataclass
class _Committed:
    """A committed batch as the window keeps it."""

    at: float
    messages: int
    failures: dict[str, tuple[int, frozenset[int]]]  # fingerprint → (count, up to min_keys keys)


@dataclass
class Verdict:
    """What a batch that may commit does to the circuits (`FloodGuard.committed` applies it)."""

    messages: int
    groups: dict[str, Group]
    trial: bool  # the held batch went through
    closing: list[str]  # circuits this batch's trial closes
    maybe_closing: list[str]  # open in the table, passed here: closed if no worker tries them
    exempted: list[str]  # closed by an operator meanwhile
    closed: list[str] = field(default_factory=list)  # what the store did close


class FloodGuard:
    def __init__(
        self,
        consumer: str,
        worker_id: str,
        store: CircuitStore,
        thresholds: Thresholds = Thresholds(),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.worker_id = worker_id
        self.store = store
        self.t = thresholds
        self.clock = clock
        self.open: dict[str, frozenset[str]] = {}  # open circuits (the table's, and ours) → event types
        self._held: _Held | None = None
        self._synced_at: float | None = None
        self._window: deque[_Committed] = deque()
        self._messages = 0  # in the window
        self._failures: dict[str, int] = {}  # in the window, by fingerprint
        self._exempt: dict[str, float] = {}  # fingerprint → clock() until which an operator lets it through

    # -- in the batch's transaction, before its DLQ rows are written ---------------------------

    def inspect(
        self,
        conn: psycopg.Connection[Any],
        batch: DecodedBatch,
        rejected: Sequence[Rejected],
        applied: Sequence[Decoded],
        *,
        untried: int = 0,
        replays: Collection[int] = (),
    ) -> Verdict:
        """Judge `batch`, whose `rejected` would be dead-lettered and `untried` events parked (not
        tried: their key is blocked); raises `CircuitOpen` when a failure is systemic (the caller
        rolls back and calls `hold`). A failed replay of an open row (its position in `rejected` in
        `replays`) is not judged: it adds no row, and an operator replaying a group before its fix must
        not stop the line. A message whose replay headers name no such row is an ordinary failure here."""
        now = self.clock()
        if self._synced_at is None or now - self._synced_at >= self.t.probe_seconds:
            self._sync(conn, now)
        self._expire(now)
        messages = max(len(batch.records) - untried, 0)
        trial = self._held is not None and self._held.batch == _identity(batch)
        if self._held is not None and not trial:
            self._held = None  # its partitions were revoked, or it was given up: nobody here holds it
        judged = (r for n, r in enumerate(rejected) if n not in replays)
        groups = _groups(judged, self.t.min_keys)
        systemic = [fp for fp, group in groups.items() if self._systemic(fp, group, messages, trial, now)]
        if systemic:  # an operator may have closed it meanwhile: the one read of the table a hold costs
            for fp, seconds in self.store.dead_letter_until(conn, self.consumer, systemic).items():
                self._exempt[fp] = now + seconds
            systemic = [fp for fp in systemic if self._exempt.get(fp, 0.0) <= now]
        if systemic:
            fp = max(systemic, key=lambda f: groups[f].count)
            circuit = self._circuit(fp, groups[fp], messages, trial)
            raise CircuitOpen(circuit, self.t.probe_seconds, _identity(batch))
        verdict = Verdict(messages, groups, trial, [], [], [])
        if self._held is not None and trial:
            verdict.closing = sorted(self._held.fingerprints)
        if self.open:
            applied_types = {d.event.type for d in applied}
            for fp, types in self.open.items():
                if self._exempt.get(fp, 0.0) > now:
                    verdict.exempted.append(fp)
                elif fp not in verdict.closing and (applied_types & types or (applied_types and not types)):
                    verdict.maybe_closing.append(fp)
        verdict.closed = self.store.close(conn, self.consumer, verdict.closing, self.worker_id)
        if verdict.maybe_closing:
            untried_for = STALE_TRIALS * self.t.probe_seconds
            verdict.closed += self.store.close(
                conn, self.consumer, verdict.maybe_closing, self.worker_id, untried_for=untried_for
            )
        return verdict

    def _systemic(self, fp: str, group: Group, messages: int, trial: bool, now: float) -> bool:
        if self._exempt.get(fp, 0.0) > now:
            return False
        if trial and self._held is not None and fp in self._held.fingerprints:
            # The held batch again: judged on its own messages, and it passes only well below the
            # ratio that opened it, so that a flood near the threshold does not open and close by turns.
            return group.count >= self.t.ratio / 2 * messages
        failures = group.count + self._failures.get(fp, 0)
        if failures < self.t.min_failures or failures < self.t.ratio * (messages + self._messages):
            return False
        keys = set(group.keys)
        for seen in self._window:
            if len(keys) >= self.t.min_keys:
                break
            if fp in seen.failures:
                keys.update(seen.failures[fp][1])
        return len(keys) >= self.t.min_keys

    def _circuit(self, fp: str, group: Group, messages: int, trial: bool) -> Circuit:
        if trial:
            failures, total, keys = group.count, messages, len(group.keys)
        else:
            failures = group.count + self._failures.get(fp, 0)
            total = messages + self._messages
            keys = self.t.min_keys
        return Circuit(fp, group.sample, frozenset(group.event_types), failures, total, keys)

    def _sync(self, conn: psycopg.Connection[Any], now: float) -> None:
        """The table's open circuits, read again every probe interval: closes by operators and by
        other workers' trials, and circuits other workers opened (ours stay while we hold them)."""
        found = self.store.open_circuits(conn, self.consumer)
        if self._held is not None:
            for fp in self._held.fingerprints:
                found.setdefault(fp, self.open.get(fp, frozenset()))
        self.open = found
        self._synced_at = now

    # -- after the transaction ------------------------------------------------------------------

    def hold(self, conn: psycopg.Connection[Any], held: CircuitOpen) -> None:
        """The batch was rolled back for `held`: write the circuit (its own transaction) and hold it."""
        circuit = held.circuit
        fp = circuit.fingerprint
        opened = self.store.hold(conn, self.consumer, circuit, self.worker_id)
        if opened is None:  # an operator closed it between our read and this write: it goes through
            now = self.clock()
            for exempt, seconds in self.store.dead_letter_until(conn, self.consumer, [fp]).items():
                self._exempt[exempt] = now + seconds
            held.exempted = True
            return
        held.opened = opened
        if self._held is None or self._held.batch != held.batch:
            self._held = _Held(held.batch, set())
        self._held.fingerprints.add(fp)
        self.open[fp] = circuit.event_types | self.open.get(fp, frozenset())

    def committed(self, verdict: Verdict) -> None:
        """The batch judged by `verdict` is durable: it joins the window, its circuits close."""
        for fp in (*verdict.closed, *verdict.exempted):
            self.open.pop(fp, None)
        if verdict.trial:
            self._held = None
        failures = {fp: (group.count, frozenset(group.keys)) for fp, group in verdict.groups.items()}
        self._window.append(_Committed(self.clock(), verdict.messages, failures))
        self._messages += verdict.messages
        for fp, (count, _) in failures.items():
            self._failures[fp] = self._failures.get(fp, 0) + count

    def _expire(self, now: float) -> None:
        window = self._window
        while window and window[0].at < now - self.t.window:
            gone = window.popleft()
            self._messages -= gone.messages
            for fp, (count, _) in gone.failures.items():
                left = self._failures[fp] - count
                if left:
                    self._failures[fp] = left
                else:
                    del self._failures[fp]
        for fp in [fp for fp, until in self._exempt.items() if until <= now]:
            del self._exempt[fp]


def _identity(batch: DecodedBatch) -> tuple[frozenset[tuple[TP, int]], int]:
    """What tells the held batch when it is tried again (a rebalance that took some of its partitions
    makes another batch of it)."""
    return frozenset(batch.positions().items()), len(batch.records)


def _groups(rejected: Iterable[Rejected], max_keys: int) -> dict[str, Group]:
    groups: dict[str, Group] = {}
    for r in rejected:
        failure = r.failure
        fp = failure.fingerprint
        group = groups.get(fp)
        if group is None:
            group = groups[fp] = Group(failure)
        group.count += 1
        if len(group.keys) < max_keys:
            record = r.record  # a message without a key is an entity of its own
            key = record.key or (record.topic, record.partition, record.offset)
            group.keys.add(hash(key))
        if failure.event_type is not None and len(group.event_types) < 20:
            group.event_types.add(failure.event_type)
    return groups

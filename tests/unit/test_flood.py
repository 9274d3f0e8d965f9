"""The flood guard's rules, without I/O: which failures are systemic, what a trial needs to pass, and
what an operator's close does (the PostgreSQL side is in tests/integration/test_flood_guard.py)."""

from __future__ import annotations

import itertools
import uuid
from typing import Any
from unittest.mock import patch

import pytest
from pydantic import BaseModel

from eventhandler.batch import Decoded, DecodedBatch, Record, Rejected
from eventhandler.errors import TransientError
from eventhandler.events import Event
from eventhandler.flood import STALE_TRIALS, Circuit, CircuitOpen, FloodGuard, Thresholds, Verdict
from eventhandler.metrics import Metrics
from eventhandler.models import FailedMessage, ReplayOrigin
from eventhandler.observer import MetricsObserver
from tests.fakes import FakeCircuitStore

THRESHOLDS = Thresholds(window=60, min_failures=50, min_keys=10, ratio=0.5, probe_seconds=30)
_offsets = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Data(BaseModel):
    n: int = 0


def record(key: bytes | None) -> Record:
    return Record("orders", 0, next(_offsets), key, b"{}", None)


def failure(error: str, key: bytes | None, event_type: str | None = "order.paid") -> Rejected:
    rec = record(key)
    message = FailedMessage(
        consumer="group",
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        stage="handler",
        error_type="HandlerFailure",
        error_message=error,
        worker_version="test",
        event_type=event_type,
    )
    return Rejected(rec, message)


def applied(n: int, event_type: str = "order.paid") -> list[Decoded]:
    return [
        Decoded(record(b"k%d" % i), Event(str(i), "/s", event_type, Data()), None, uuid.uuid4())
        for i in range(n)
    ]


def make_guard(store: FakeCircuitStore | None = None, clock: Clock | None = None) -> tuple[FloodGuard, Any]:
    clock = clock or Clock()
    store = store or FakeCircuitStore(clock=clock)
    return FloodGuard("group", "worker-1", store, THRESHOLDS, clock=clock), store


def batch_of(messages: int, rejected: list[Rejected], ok: list[Decoded] | None = None) -> DecodedBatch:
    """A batch of `messages` records: the rejected, the applied, and good ones to fill it up."""
    records = [r.record for r in rejected] + [d.record for d in ok or []]
    records += [record(b"fill-%d" % i) for i in range(messages - len(records))]
    return DecodedBatch(records)


def judge(
    guard: FloodGuard,
    batch: DecodedBatch,
    rejected: list[Rejected],
    ok: list[Decoded] | None = None,
    *,
    untried: int = 0,
    replays: frozenset[int] = frozenset(),
) -> Verdict:
    """A batch as the pipeline writes it: judged, then committed (the exception propagates)."""
    try:
        verdict = guard.inspect(None, batch, rejected, ok or [], untried=untried, replays=replays)  # type: ignore[arg-type]
    except CircuitOpen as held:
        guard.hold(None, held)  # type: ignore[arg-type]
        raise
    guard.committed(verdict)
    return verdict


def run(
    guard: FloodGuard, messages: int, rejected: list[Rejected], ok: list[Decoded] | None = None
) -> Verdict:
    """A new batch of `messages` with these failures and applied events."""
    return judge(guard, batch_of(messages, rejected, ok), rejected, ok)


def many_keys(n: int, error: str = "handler bug: column renamed") -> list[Rejected]:
    return [failure(error, b"key-%d" % i) for i in range(n)]


POISON_KINDS = [
    "not valid JSON: Expecting value",
    "not valid UTF-8",
    "id: Field required",
    "no handler for event type 'x'",
    "device 'ghost' is not registered",
    "the message is a tombstone",
    "specversion: Input should be '1.0'",
]


@pytest.mark.parametrize("every", [100, 10])
def test_isolated_poison_at_1_and_10_percent_never_trips(every: int) -> None:
    guard, store = make_guard()
    n = 0
    for _ in range(200):  # 200 batches of 500 messages, faster than the window: all of it counts
        rejected = []
        for _ in range(500):
            n += 1
            if n % every == 0:
                rejected.append(failure(POISON_KINDS[n % len(POISON_KINDS)], b"key-%d" % n))
        run(guard, 500, rejected)
    assert store.held == []


def test_one_poison_fingerprint_at_10_percent_never_trips() -> None:
    guard, store = make_guard()
    for _ in range(100):
        run(guard, 1000, many_keys(100, "not valid JSON"))
    assert store.held == []


def test_a_handler_that_fails_every_event_trips_after_fewer_than_min_failures_rows() -> None:
    guard, store = make_guard()
    dead_lettered = 0

    def batches() -> None:
        nonlocal dead_lettered
        for batch in range(100):
            rejected = [failure("handler bug", b"key-%d-%d" % (batch, i)) for i in range(7)]
            run(guard, 7, rejected)
            dead_lettered += len(rejected)

    with pytest.raises(CircuitOpen) as held:
        batches()
    assert dead_lettered < THRESHOLDS.min_failures
    assert held.value.opened
    assert len(store.held) == 1
    circuit = store.held[0]
    assert circuit.failures >= THRESHOLDS.min_failures
    assert circuit.keys >= THRESHOLDS.min_keys
    assert circuit.event_types == {"order.paid"}


def test_a_first_batch_that_fails_whole_is_held_before_any_row() -> None:
    guard, store = make_guard()
    with pytest.raises(CircuitOpen):
        run(guard, 5000, many_keys(5000))
    assert len(store.held) == 1


def test_failures_of_one_key_are_not_a_flood() -> None:
    guard, store = make_guard()
    for _ in range(50):
        run(guard, 100, [failure("device 'x' is not registered", b"device-x") for _ in range(100)])
    assert store.held == []


def test_failures_below_the_ratio_are_not_a_flood() -> None:
    guard, store = make_guard()
    for _ in range(50):
        run(guard, 100, many_keys(45))
    assert store.held == []


def test_failures_older_than_the_window_do_not_count() -> None:
    clock = Clock()
    guard, store = make_guard(clock=clock)
    for _ in range(20):
        run(guard, 4, many_keys(4))  # 4 a batch, 1 batch every 40 s: never 50 in a minute
        clock.now += 40
    assert store.held == []


def test_a_trial_holds_while_the_failure_lasts_and_closes_the_circuit_when_it_is_fixed() -> None:
    clock = Clock()
    guard, store = make_guard(clock=clock)
    failing = many_keys(200)
    held = batch_of(200, failing)
    with pytest.raises(CircuitOpen) as first:
        judge(guard, held, failing)
    fp = first.value.circuit.fingerprint
    clock.now += 30
    with pytest.raises(CircuitOpen) as trial:  # the same batch, not fixed
        judge(guard, held, failing)
    assert not trial.value.opened  # open already: one circuit_open line, not one per trial
    # on a trial the held batch is judged on its own messages, well below the ratio that opened it:
    # 40 % still holds, so that a flood near the threshold does not open and close by turns
    with pytest.raises(CircuitOpen):
        judge(guard, held, failing[:80])
    clock.now += 30
    verdict = judge(guard, held, failing[:3])  # fixed: a few isolated failures remain
    assert verdict.closed == [fp]
    assert not store.rows[fp]["open"]
    assert fp not in guard.open
    run(guard, 200, many_keys(20))  # closed: judged on the window again
    assert len(store.held) == 3


def test_a_batch_that_is_not_the_held_one_closes_nothing_it_did_not_try() -> None:
    """A rebalance took the held batch's partitions: the next batch is another one, and it must not
    close the circuit for the new owner of the failing partitions."""
    clock = Clock()
    guard, store = make_guard(clock=clock)
    failing = many_keys(200)
    with pytest.raises(CircuitOpen) as held:
        judge(guard, batch_of(200, failing), failing)
    fp = held.value.circuit.fingerprint
    verdict = run(guard, 50, [], applied(50, "device.reading"))
    assert verdict.closed == []
    assert store.rows[fp]["open"]


def test_an_operators_close_lets_the_failure_through_until_it_expires() -> None:
    clock = Clock()
    guard, store = make_guard(clock=clock)
    failing = many_keys(200)
    held = batch_of(200, failing)
    with pytest.raises(CircuitOpen) as first:
        judge(guard, held, failing)
    fp = first.value.circuit.fingerprint
    store.close_by_operator(fp, seconds=3600)
    clock.now += 30
    verdict = judge(guard, held, failing)  # dead-lettered, as the operator chose
    assert verdict.exempted == [fp]
    assert fp not in guard.open
    for _ in range(10):
        clock.now += 60
        run(guard, 200, many_keys(200))
    clock.now += 3600
    with pytest.raises(CircuitOpen):
        run(guard, 200, many_keys(200))


def test_an_operators_close_that_lands_while_a_trial_runs_is_not_undone_by_it() -> None:
    clock = Clock()
    guard, store = make_guard(clock=clock)
    failing = many_keys(200)
    held = batch_of(200, failing)
    with pytest.raises(CircuitOpen) as first:
        judge(guard, held, failing)
    fp = first.value.circuit.fingerprint
    clock.now += 30

    def read_before_the_close(*_: Any) -> dict[str, float]:
        store.close_by_operator(fp, seconds=3600)  # lands between the trial's read and its hold
        return {}

    with patch.object(store, "dead_letter_until", read_before_the_close), pytest.raises(CircuitOpen) as trial:
        judge(guard, held, failing)
    assert trial.value.exempted  # the hold found the close: the batch is tried again at once
    assert not store.rows[fp]["open"]
    assert judge(guard, held, failing).exempted == [fp]


def test_a_circuit_found_open_is_judged_on_the_window_like_any_failure() -> None:
    """One stray message alike must not stall a worker that starts while a circuit is open."""
    clock = Clock()
    store = FakeCircuitStore(clock=clock)
    fp = many_keys(1)[0].failure.fingerprint
    store.opened_elsewhere(fp, frozenset({"order.paid"}))
    guard, _ = make_guard(store, clock)
    run(guard, 1, many_keys(1))
    run(guard, 5, many_keys(5))
    with pytest.raises(CircuitOpen):
        run(guard, 100, many_keys(100))


def test_a_circuit_found_open_closes_only_when_its_events_apply_and_no_worker_tries_it() -> None:
    clock = Clock()
    store = FakeCircuitStore(clock=clock)
    fp = many_keys(1)[0].failure.fingerprint
    store.opened_elsewhere(fp, frozenset({"order.paid"}))
    guard, _ = make_guard(store, clock)
    assert run(guard, 10, [], applied(10, "device.reading")).closed == []  # not its events
    assert run(guard, 10, [], applied(10)).closed == []  # another worker tried it just now
    clock.now += STALE_TRIALS * THRESHOLDS.probe_seconds + 1
    assert run(guard, 10, [], applied(10)).closed == [fp]
    assert fp not in guard.open


def test_circuits_closed_elsewhere_are_forgotten_at_the_next_sync() -> None:
    clock = Clock()
    store = FakeCircuitStore(clock=clock)
    store.opened_elsewhere("0123456789abcdef")
    guard, _ = make_guard(store, clock)
    run(guard, 10, [])
    assert "0123456789abcdef" in guard.open
    store.rows["0123456789abcdef"]["open"] = False  # another worker's trial closed it
    clock.now += THRESHOLDS.probe_seconds
    run(guard, 10, [])
    assert guard.open == {}


def test_failed_replays_and_parked_events_are_not_judged_as_a_flood() -> None:
    guard, store = make_guard()
    copies = many_keys(200)
    for r in copies:
        r.failure.replay_of = ReplayOrigin(1, "orders", 0, 1)
    # an operator replaying a group before its fix: no new rows
    judge(guard, batch_of(200, copies), copies, replays=frozenset(range(200)))
    assert store.held == []
    # replay headers that name no open row (copied by a bridge, forged) make ordinary failures
    with pytest.raises(CircuitOpen):
        run(guard, 200, copies)
    # every order's placement failed, and the rest of each order's events parked behind it: of the
    # messages tried, every one failed
    guard, store = make_guard()
    placed = many_keys(100, "currency <str> is not accepted")
    with pytest.raises(CircuitOpen):
        judge(guard, batch_of(400, placed), placed, untried=300)


def test_a_held_batch_shows_its_circuit_and_is_not_a_dlq_write_error() -> None:
    metrics = Metrics()
    observer = MetricsObserver(metrics, "group")
    rejected = many_keys(3)
    batch = DecodedBatch([r.record for r in rejected], rejected=rejected)
    circuit = Circuit(rejected[0].failure.fingerprint, rejected[0].failure, frozenset(), 3, 3, 3)
    observer.retrying(CircuitOpen(circuit, 30, (frozenset(), 3)), 1, batch)
    labels = {"consumer": "group", "fingerprint": circuit.fingerprint}
    assert metrics.registry.get_sample_value("eventhandler_circuit_open", labels) == 1
    # the EventHandlerDLQWriteErrors alert is for rows PostgreSQL refused, not for a line held on purpose
    assert metrics.registry.get_sample_value("eventhandler_dlq_write_errors_total") == 0
    observer.retrying(TransientError("PostgreSQL is down"), 1, batch)
    assert metrics.registry.get_sample_value("eventhandler_dlq_write_errors_total") == 1

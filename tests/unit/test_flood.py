"""The flood guard's rules, without I/O: which failures are systemic, what a trial needs to pass, and
what an operator's close does (the PostgreSQL side is in tests/integration/test_flood_guard.py)."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from eventhandler.batch import Decoded, DecodedBatch, Record, Rejected
from eventhandler.errors import TransientError
from eventhandler.events import Event
from eventhandler.flood import STALE_TRIALS, Circuit, CircuitOpen, FloodGuard, Thresholds, Verdict
from eventhandler.metrics import Metrics
from eventhandler.models import FailedMessage
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


def run(
    guard: FloodGuard, messages: int, rejected: list[Rejected], ok: list[Decoded] | None = None
) -> Verdict:
    """One batch as the pipeline runs it: judged, then committed (the exception propagates)."""
    try:
        verdict = guard.inspect(None, messages, rejected, ok or [])  # type: ignore[arg-type]
    except CircuitOpen as held:
        guard.hold(None, held)  # type: ignore[arg-type]
        raise
    guard.committed(verdict)
    return verdict


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
    with pytest.raises(CircuitOpen) as first:
        run(guard, 200, many_keys(200))
    fp = first.value.circuit.fingerprint
    clock.now += 30
    with pytest.raises(CircuitOpen) as trial:  # the same batch, not fixed
        run(guard, 200, many_keys(200))
    assert not trial.value.opened  # open already: one circuit_open line, not one per trial
    # a trial is judged on its own messages: a few alike in a small batch still hold
    with pytest.raises(CircuitOpen):
        run(guard, 3, many_keys(2))
    clock.now += 30
    verdict = run(guard, 200, many_keys(3), applied(197))  # fixed: a few isolated failures remain
    assert verdict.closed == [fp]
    assert not store.rows[fp]["open"]
    assert fp not in guard.open
    run(guard, 200, many_keys(20))  # closed: judged on the window again
    assert len(store.held) == 3


def test_an_operators_close_lets_the_failure_through_until_it_expires() -> None:
    clock = Clock()
    guard, store = make_guard(clock=clock)
    with pytest.raises(CircuitOpen) as held:
        run(guard, 200, many_keys(200))
    fp = held.value.circuit.fingerprint
    store.close_by_operator(fp, seconds=3600)
    clock.now += 30
    verdict = run(guard, 200, many_keys(200))  # dead-lettered, as the operator chose
    assert verdict.exempted == [fp]
    assert fp not in guard.open
    for _ in range(10):
        clock.now += 60
        run(guard, 200, many_keys(200))
    clock.now += 3600
    with pytest.raises(CircuitOpen):
        run(guard, 200, many_keys(200))


def test_a_circuit_found_open_at_start_holds_the_first_batch_that_fails_alike() -> None:
    clock = Clock()
    store = FakeCircuitStore(clock=clock)
    fp = many_keys(1)[0].failure.fingerprint
    store.rows[fp] = {
        "open": True,
        "event_types": frozenset({"order.paid"}),
        "tried_at": clock.now,
        "until": 0.0,
    }
    guard, _ = make_guard(store, clock)
    with pytest.raises(CircuitOpen) as held:
        run(guard, 5, many_keys(5))  # far below min_failures: the circuit is open already
    assert not held.value.opened


def test_a_circuit_found_open_closes_only_when_its_events_apply_and_no_worker_tries_it() -> None:
    clock = Clock()
    store = FakeCircuitStore(clock=clock)
    fp = many_keys(1)[0].failure.fingerprint
    store.rows[fp] = {
        "open": True,
        "event_types": frozenset({"order.paid"}),
        "tried_at": clock.now,
        "until": 0.0,
    }
    guard, _ = make_guard(store, clock)
    assert run(guard, 10, [], applied(10, "device.reading")).closed == []  # not its events
    assert run(guard, 10, [], applied(10)).closed == []  # another worker tried it just now
    clock.now += STALE_TRIALS * THRESHOLDS.probe_seconds + 1
    assert run(guard, 10, [], applied(10)).closed == [fp]
    assert fp not in guard.open


def test_a_held_batch_shows_its_circuit_and_is_not_a_dlq_write_error() -> None:
    metrics = Metrics()
    observer = MetricsObserver(metrics, "group")
    rejected = many_keys(3)
    batch = DecodedBatch([r.record for r in rejected], rejected=rejected)
    circuit = Circuit(rejected[0].failure.fingerprint, rejected[0].failure, frozenset(), 3, 3, 3)
    observer.retrying(CircuitOpen(circuit, 30), 1, batch)
    labels = {"consumer": "group", "fingerprint": circuit.fingerprint}
    assert metrics.registry.get_sample_value("eventhandler_circuit_open", labels) == 1
    # the EventHandlerDLQWriteErrors alert is for rows PostgreSQL refused, not for a line held on purpose
    assert metrics.registry.get_sample_value("eventhandler_dlq_write_errors_total") == 0
    observer.retrying(TransientError("PostgreSQL is down"), 1, batch)
    assert metrics.registry.get_sample_value("eventhandler_dlq_write_errors_total") == 1

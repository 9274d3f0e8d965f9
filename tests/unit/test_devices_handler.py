"""The built-in device projection, in memory: `begin` loads the state of the batch's devices with one
query, `handle` applies events in order (or rejects one), `flush` writes the net result."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from eventhandler.errors import HandlerFailure, PermanentError
from eventhandler.events import Event
from eventhandler.example.devices import (
    ADD_READINGS,
    DECOMMISSION,
    DEVICE_DECOMMISSIONED,
    DEVICE_READING,
    DEVICE_REGISTERED,
    LOAD_STATUS,
    UPSERT_DEVICES,
    UPSERT_LATEST,
    DeviceDecommissioned,
    DeviceProjection,
    DeviceReading,
    DeviceRegistered,
)
from eventhandler.policy import Decision, FailurePolicy
from tests.fakes import FakeConnection

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
_ids = itertools.count(1)


def event(event_type: str, data: BaseModel, time: datetime | None = T0) -> Event:
    return Event(id=f"e-{next(_ids)}", source="/tests", type=event_type, data=data, time=time)


def registered(device_id: str, name: str = "N", site: str | None = "lab", **kw: Any) -> Event:
    return event(DEVICE_REGISTERED, DeviceRegistered(device_id=device_id, name=name, site=site), **kw)


def reading(device_id: str, value: float = 1.0, metric: str = "temperature", **kw: Any) -> Event:
    return event(
        DEVICE_READING, DeviceReading(device_id=device_id, metric=metric, value=value, unit="C"), **kw
    )


def decommissioned(device_id: str, **kw: Any) -> Event:
    return event(DEVICE_DECOMMISSIONED, DeviceDecommissioned(device_id=device_id), **kw)


def database(status: dict[str, str]) -> FakeConnection:
    """A connection whose `devices` table holds `status` (device_id → status)."""

    def answer(query: str, params: Any) -> list[tuple[Any, ...]]:
        if query == LOAD_STATUS:
            return [(d, status[d]) for d in params[0] if d in status]
        return []

    return FakeConnection(answer)


class Outcome:
    def __init__(self, conn: FakeConnection, rejected: dict[str, Exception]) -> None:
        self.conn = conn
        self.rejected = rejected

    def writes(self) -> list[str]:
        return [q for q in self.conn.queries() if q != LOAD_STATUS]

    def devices(self) -> dict[str, tuple[Any, ...]]:
        """UPSERT_DEVICES rows: device_id → (name, site, status, registered_at)."""
        ids, names, sites, statuses, times = self.conn.params_of(UPSERT_DEVICES)
        return {d: tuple(row) for d, *row in zip(ids, names, sites, statuses, times, strict=True)}

    def decommissioned(self) -> set[str]:
        return set(self.conn.params_of(DECOMMISSION)[0])

    def reading_counts(self) -> dict[str, int]:
        ids, counts = self.conn.params_of(ADD_READINGS)
        return dict(zip(ids, counts, strict=True))

    def latest(self) -> dict[tuple[str, str], tuple[Any, ...]]:
        """UPSERT_LATEST rows: (device_id, metric) → (value, unit, observed_at, event_id)."""
        ids, metrics, values, units, times, event_ids = self.conn.params_of(UPSERT_LATEST)
        rows = zip(ids, metrics, values, units, times, event_ids, strict=True)
        return {(d, m): tuple(rest) for d, m, *rest in rows}


def run(events: list[Event], status: dict[str, str] | None = None) -> Outcome:
    """One batch through the projection, as the pipeline drives it."""
    conn = database(status or {})
    batch = DeviceProjection().begin(conn, events)  # type: ignore[arg-type]
    rejected: dict[str, Exception] = {}
    for e in events:
        try:
            batch.handle(e)
        except Exception as exc:
            rejected[e.id] = exc
    batch.flush(conn)  # type: ignore[arg-type]
    return Outcome(conn, rejected)


# -- begin: one query for the batch's state ------------------------------------------------------------


def test_begin_loads_the_status_of_each_device_of_the_batch_once_in_one_query() -> None:
    events = [registered("a"), reading("a"), reading("b"), reading("a"), decommissioned("c")]
    conn = database({})
    DeviceProjection().begin(conn, events)  # type: ignore[arg-type]
    assert conn.queries() == [LOAD_STATUS]
    assert sorted(conn.statements[0].params[0]) == ["a", "b", "c"]


def test_an_empty_batch_touches_nothing() -> None:
    outcome = run([])
    assert outcome.conn.statements == []


# -- registration, readings, decommission ----------------------------------------------------------------


def test_registration_then_readings_in_one_batch_are_all_accepted() -> None:
    outcome = run([registered("a", name="Alpha", site="roof"), reading("a"), reading("a"), reading("a")])

    assert outcome.rejected == {}
    assert outcome.devices() == {"a": ("Alpha", "roof", "active", T0)}
    assert outcome.reading_counts() == {"a": 3}
    assert outcome.writes() == [UPSERT_DEVICES, ADD_READINGS, UPSERT_LATEST]  # devices before their readings


def test_a_reading_for_a_device_registered_earlier_is_accepted() -> None:
    outcome = run([reading("a", value=2.0)], {"a": "active"})
    assert outcome.rejected == {}
    assert outcome.reading_counts() == {"a": 1}
    assert UPSERT_DEVICES not in outcome.writes()


def test_a_reading_for_an_unknown_device_is_a_handler_failure() -> None:
    ghost = reading("ghost")
    outcome = run([ghost])

    error = outcome.rejected[ghost.id]
    assert isinstance(error, HandlerFailure)
    assert isinstance(error, PermanentError)
    assert FailurePolicy().decide(error, "projection") is Decision.DEAD_LETTER
    assert str(error) == "device 'ghost' is not registered"
    assert outcome.writes() == []


def test_a_reading_before_its_registration_in_the_same_batch_is_rejected_and_later_ones_accepted() -> None:
    early = reading("a")
    outcome = run([early, registered("a"), reading("a")])
    assert list(outcome.rejected) == [early.id]
    assert outcome.reading_counts() == {"a": 1}


def test_a_reading_for_a_decommissioned_device_is_a_handler_failure() -> None:
    late = reading("old")
    outcome = run([late], {"old": "decommissioned"})
    error = outcome.rejected[late.id]
    assert isinstance(error, HandlerFailure)
    assert str(error) == "device 'old' is decommissioned"
    assert outcome.writes() == []


def test_a_reading_after_a_decommission_in_the_same_batch_is_rejected_one_before_is_counted() -> None:
    before, after = reading("a"), reading("a")
    outcome = run([before, decommissioned("a"), after], {"a": "active"})
    assert list(outcome.rejected) == [after.id]
    assert outcome.reading_counts() == {"a": 1}
    assert outcome.decommissioned() == {"a"}


def test_decommission_after_registration_in_the_same_batch_registers_it_decommissioned() -> None:
    outcome = run([registered("a", name="Alpha"), reading("a"), decommissioned("a")])
    assert outcome.rejected == {}
    assert outcome.devices()["a"][2] == "decommissioned"
    assert outcome.reading_counts() == {"a": 1}
    assert DECOMMISSION not in outcome.writes()  # the upsert already carries the status


def test_decommission_of_a_device_registered_earlier_is_one_update() -> None:
    outcome = run([decommissioned("a"), decommissioned("b")], {"a": "active", "b": "active"})
    assert outcome.rejected == {}
    assert outcome.writes() == [DECOMMISSION]
    assert outcome.decommissioned() == {"a", "b"}


def test_decommission_of_an_unknown_device_is_a_handler_failure() -> None:
    ghost = decommissioned("ghost")
    outcome = run([ghost])
    assert isinstance(outcome.rejected[ghost.id], HandlerFailure)
    assert str(outcome.rejected[ghost.id]) == "device 'ghost' is not registered"


def test_registering_again_after_a_decommission_reactivates_the_device() -> None:
    outcome = run([decommissioned("a"), registered("a", name="Again"), reading("a")], {"a": "active"})
    assert outcome.rejected == {}
    assert outcome.devices()["a"][:3] == ("Again", "lab", "active")
    assert DECOMMISSION not in outcome.writes()
    assert outcome.reading_counts() == {"a": 1}


def test_a_second_registration_in_the_batch_wins() -> None:
    outcome = run([registered("a", name="First", site="x"), registered("a", name="Second", site=None)])
    assert outcome.devices()["a"][:3] == ("Second", None, "active")


def test_a_registration_without_time_uses_the_batch_time() -> None:
    before = datetime.now(UTC)
    outcome = run([registered("a", time=None)])
    at = outcome.devices()["a"][3]
    assert before <= at <= datetime.now(UTC)


# -- readings: counts and the latest value ---------------------------------------------------------------


def test_reading_counts_are_summed_per_device_in_one_statement() -> None:
    events = [reading("a"), reading("b"), reading("a", metric="humidity"), reading("a")]
    outcome = run(events, {"a": "active", "b": "active"})
    assert outcome.reading_counts() == {"a": 3, "b": 1}
    assert outcome.writes().count(ADD_READINGS) == 1


def test_rejected_readings_are_not_counted() -> None:
    outcome = run([reading("a"), reading("ghost"), reading("a")], {"a": "active"})
    assert outcome.reading_counts() == {"a": 2}
    assert ("ghost", "temperature") not in outcome.latest()


def test_latest_reading_keeps_the_newest_time_whatever_the_order() -> None:
    newest = reading("a", value=3.0, time=T0 + timedelta(minutes=5))
    events = [
        reading("a", value=1.0, time=T0),
        newest,
        reading("a", value=2.0, time=T0 + timedelta(minutes=1)),  # arrives late, is older
    ]
    outcome = run(events, {"a": "active"})
    assert outcome.latest() == {("a", "temperature"): (3.0, "C", newest.time, newest.id)}
    assert outcome.reading_counts() == {"a": 3}  # every reading counts, even the stale one


def test_latest_reading_with_equal_times_takes_the_later_event() -> None:
    first, second = reading("a", value=1.0), reading("a", value=2.0)
    outcome = run([first, second], {"a": "active"})
    assert outcome.latest()[("a", "temperature")][3] == second.id


def test_latest_reading_is_kept_per_device_and_metric() -> None:
    events = [
        reading("a", value=1.0, metric="temperature"),
        reading("a", value=50.0, metric="humidity"),
        reading("b", value=7.0, metric="temperature"),
    ]
    outcome = run(events, {"a": "active", "b": "active"})
    assert {k: v[0] for k, v in outcome.latest().items()} == {
        ("a", "temperature"): 1.0,
        ("a", "humidity"): 50.0,
        ("b", "temperature"): 7.0,
    }


def test_flush_writes_a_fixed_number_of_statements_whatever_the_batch_size() -> None:
    devices = [f"d{i}" for i in range(50)]
    events = [registered(d) for d in devices]
    events += [reading(d, value=float(i)) for i in range(20) for d in devices]
    events += [decommissioned(d) for d in devices[:10]]
    outcome = run(events, {"old": "active"})
    assert outcome.rejected == {}
    assert outcome.writes() == [UPSERT_DEVICES, ADD_READINGS, UPSERT_LATEST]
    assert sum(outcome.reading_counts().values()) == 1000


def test_handling_is_in_memory_until_flush() -> None:
    conn = database({"a": "active"})
    batch = DeviceProjection().begin(conn, [reading("a")])  # type: ignore[arg-type]
    batch.handle(reading("a"))
    batch.handle(registered("b"))
    assert conn.queries() == [LOAD_STATUS]


def test_the_projection_declares_the_model_of_each_built_in_type() -> None:
    assert DeviceProjection.payload_models == {
        DEVICE_REGISTERED: DeviceRegistered,
        DEVICE_READING: DeviceReading,
        DEVICE_DECOMMISSIONED: DeviceDecommissioned,
    }


def test_flush_writes_rows_in_key_order_so_two_workers_cannot_deadlock() -> None:
    """Two batches touching the same devices in opposite orders take their row locks in one order."""
    devices = [f"d{i:02}" for i in range(30)]
    for order in (devices, devices[::-1]):
        events = [registered(d) for d in order] + [reading(d, metric=m) for d in order for m in ("t", "h")]
        outcome = run(events + [decommissioned(d) for d in order[:5]], {})
        assert outcome.conn.params_of(UPSERT_DEVICES)[0] == devices
        ids, metrics, *_ = outcome.conn.params_of(UPSERT_LATEST)
        assert list(zip(ids, metrics, strict=True)) == sorted((d, m) for d in devices for m in ("t", "h"))
        assert list(outcome.reading_counts()) == devices
    outcome = run([decommissioned(d) for d in devices[::-1]], dict.fromkeys(devices, "active"))
    assert outcome.conn.params_of(DECOMMISSION)[0] == devices

"""`eventhandler replay --simulate` against the real services: it predicts, it changes nothing, and a
real replay then does what it predicted."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

import psycopg
import pytest
from pydantic import BaseModel

from eventhandler import simulate as simulate_module
from eventhandler.app import build_service
from eventhandler.config import Settings
from eventhandler.errors import InvalidOperation
from eventhandler.example.devices import DeviceReading
from eventhandler.handlers import Registry
from eventhandler.models import DLQFilter
from eventhandler.simulate import Simulator
from tests.conftest import settings_env
from tests.support import kafka as k
from tests.support.cli import cli_json, run_cli
from tests.support.dlq import DLQ as DLQStore
from tests.support.factories import failed_event, failed_message
from tests.support.worker import run_until_idle, scalar

WOULD_FAIL = 3


@pytest.fixture
def producer(kafka_bootstrap: str) -> k.TestProducer:
    return k.TestProducer(kafka_bootstrap)


def database(db: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """Every row of every table and every sequence's position, as text: a simulation must leave all
    of it as it was."""
    tables = [
        f"{schema}.{name}"
        for schema, name in db.execute(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        ).fetchall()
    ]
    snapshot = {
        table: sorted(row[0] for row in db.execute(f"SELECT t::text FROM {table} t").fetchall())
        for table in tables
    }
    for (sequence,) in db.execute("SELECT schemaname || '.' || sequencename FROM pg_sequences").fetchall():
        snapshot[sequence] = [str(db.execute(f"SELECT last_value, is_called FROM {sequence}").fetchone())]
    assert "public.dlq" in snapshot
    assert "public.applied_events" in snapshot
    return snapshot


def simulate(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = run_cli(env, "replay", "--simulate", *args, "--json")
    assert result.returncode in (0, WOULD_FAIL), result.stderr
    return result.returncode, json.loads(result.stdout)


def open_rows(db: psycopg.Connection[Any]) -> dict[int, tuple[str, str]]:
    return dict(
        (dlq_id, (status, fingerprint))
        for dlq_id, status, fingerprint in db.execute(
            "SELECT dlq_id, status, fingerprint FROM dlq"
        ).fetchall()
    )


def test_simulate_predicts_failure_before_the_fix_and_success_after_and_the_replay_agrees(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    settings = make_settings()
    env = settings_env(settings)
    producer.send_events(topic, [k.registered("known"), k.reading("known")])
    producer.send_events(topic, [k.reading("late-device", value=i) for i in range(5)])
    producer.send(topic, b"\xfe not json")
    producer.flush()
    run_until_idle(settings, idle=2)
    rows = open_rows(db)
    assert len(rows) == 6
    readings = [
        i for (i,) in db.execute("SELECT dlq_id FROM dlq WHERE stage = 'handler' ORDER BY dlq_id").fetchall()
    ]
    (poison,) = set(rows) - set(readings)

    # Before the fix: every row would fail again, each with the error it has now; nothing changes.
    before = database(db)
    code, predicted = simulate(env)
    assert database(db) == before
    assert code == WOULD_FAIL
    assert predicted["matched"] == 6
    assert predicted["outcomes"] == {"apply": 0, "fail": 6, "duplicate": 0, "skip": 0}
    by_id = {row["dlq_id"]: row for row in predicted["rows"]}
    assert all(by_id[i]["new_fingerprint"] == rows[i][1] for i in rows)
    assert {g["fingerprint"]: g["outcomes"]["fail"] for g in predicted["groups"]} == {
        rows[readings[0]][1]: 5,
        rows[poison][1]: 1,
    }
    assert predicted["code"]["eventhandler"]
    assert predicted["code"]["projections"]["devices"]["source_sha256"]

    # A replay now does what the simulation said: the readings come back with the predicted error.
    first = cli_json(env, "replay", "--event-type", "device.reading", "--yes")
    assert first["published"] == 5
    run_until_idle(settings, idle=2)
    after_replay = open_rows(db)
    assert {after_replay[i] for i in readings} == {("pending", by_id[readings[0]]["new_fingerprint"])}

    # The fix (the device registers); one reading was applied in the meantime by its producer again.
    producer.send_events(topic, [k.registered("late-device")])
    producer.flush()
    run_until_idle(settings, idle=2)
    payload = scalar(db, "SELECT event_payload FROM dlq WHERE dlq_id = %s", readings[0])
    producer.send(topic, payload)
    producer.flush()
    run_until_idle(settings, idle=2)

    before = database(db)
    code, predicted = simulate(env)
    assert database(db) == before
    assert code == WOULD_FAIL  # the poison message still would
    by_id = {row["dlq_id"]: row["outcome"] for row in predicted["rows"]}
    assert by_id == {readings[0]: "duplicate", **{i: "apply" for i in readings[1:]}, poison: "fail"}

    ok, only_readings = simulate(env, "--event-type", "device.reading")
    assert ok == 0
    assert only_readings["outcomes"]["apply"] == 4

    # And the replay agrees again: four readings applied, the duplicate resolved without a second
    # effect, the poison message pending as predicted.
    count_before = db.execute("SELECT reading_count FROM devices WHERE device_id = 'late-device'").fetchone()
    assert count_before == (1,)
    cli_json(env, "replay", "--yes")
    run_until_idle(settings, idle=2)
    final = open_rows(db)
    assert {final[i][0] for i in readings} == {"resolved"}
    assert final[poison] == ("pending", rows[poison][1])
    assert db.execute("SELECT reading_count FROM devices WHERE device_id = 'late-device'").fetchone() == (5,)


@pytest.mark.parametrize("chunk", [1, 500])
def test_simulate_keeps_each_rows_effects_for_the_rows_after_it(
    chunk: int,
    monkeypatch: pytest.MonkeyPatch,
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    db: psycopg.Connection[Any],
) -> None:
    """A replay applies rows oldest first, each seeing the ones before it: a registration among the
    rows makes the readings after it apply, in the simulation as in the replay, however the rows are
    read (one at a time or all together)."""
    monkeypatch.setattr(simulate_module, "CHUNK", chunk)
    settings = make_settings()
    # A registration that failed once (its row written as the worker would have written it) …
    service, pool = build_service(settings)
    registration = k.registered("dev-1")
    with pool.connection() as conn, conn.transaction():
        DLQStore.on(pool).writer.record_failures(
            conn,
            [
                failed_event(
                    registration,
                    consumer=settings.consumer_group,
                    topic=topic,
                    offset=1_000_000,
                    headers=[],
                    stage="projection",
                    error_type="ProjectionFailure",
                    error_message="canceling statement due to lock timeout",
                )
            ],
        )
    # … and two readings of its device that failed after it.
    producer.send_events(topic, [k.reading("dev-1", value=1), k.reading("dev-1", value=2)])
    producer.flush()
    run_until_idle(settings, idle=2)
    before = database(db)
    try:
        simulation = service.simulate(DLQFilter(), actor="test")
    finally:
        pool.close()
    assert database(db) == before
    assert [row.outcome for row in simulation.rows] == ["apply", "apply", "apply"]

    cli_json(settings_env(settings), "replay", "--yes")
    run_until_idle(settings, idle=2)
    assert db.execute("SELECT status, count(*) FROM dlq GROUP BY status").fetchall() == [("resolved", 3)]
    assert db.execute("SELECT reading_count FROM devices WHERE device_id = 'dev-1'").fetchone() == (2,)


class Exiting:
    """A projection whose handler ends the process it runs in."""

    name = "exiting"
    payload_models: ClassVar[dict[str, type[BaseModel]]] = {"device.reading": DeviceReading}

    def begin(self, conn: Any, events: Any) -> Exiting:
        return self

    def handle(self, event: Any) -> None:
        raise SystemExit(3)

    def flush(self, conn: Any) -> None:
        pass


def test_a_handler_that_raises_system_exit_ends_the_simulation_not_the_process(
    make_settings: Callable[..., Settings], topic: str, db: psycopg.Connection[Any]
) -> None:
    settings = make_settings()
    service, pool = build_service(settings)
    try:
        with pool.connection() as conn, conn.transaction():
            DLQStore.on(pool).writer.record_failures(
                conn,
                [
                    failed_message(
                        consumer=settings.consumer_group, topic=topic, value=k.structured(k.reading("d"))
                    )
                ],
            )
        service.simulator = Simulator(pool, lambda: Registry([Exiting()]))
        before = database(db)
        with pytest.raises(InvalidOperation, match="SystemExit"):
            service.simulate(DLQFilter(), actor="test")
        assert database(db) == before
    finally:
        pool.close()

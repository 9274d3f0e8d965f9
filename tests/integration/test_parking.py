"""Per-key parking against the real PostgreSQL, one batch at a time as the worker writes it: later
events of a key with an open failure are parked in order, and released in order once it is closed."""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest

from eventhandler.batch import BatchResult, Record
from eventhandler.cli.render import status_text
from eventhandler.config import Settings
from eventhandler.db import create_pool, translate_db_errors
from eventhandler.dlq.parking import PostgresParkingStore
from eventhandler.dlq.writer import PostgresDLQWriter
from eventhandler.events import origin_header
from eventhandler.handlers.loading import load_registry
from eventhandler.ledger import Ledger
from eventhandler.models import DLQFilter
from eventhandler.parking import Parking, ParkingStep
from eventhandler.pipeline import BatchProcessor
from eventhandler.policy import FailurePolicy
from tests.conftest import settings_env
from tests.support import kafka as k
from tests.support.cli import cli_json
from tests.support.dlq import DLQ
from tests.support.waiting import wait_for
from tests.support.worker import kill9, scalar, spawn_worker, threaded_worker

GROUP = "parking-test"
TOPIC = "orders"


@pytest.fixture
def pool(db_url: str) -> Iterator[psycopg_pool.ConnectionPool]:
    made = create_pool(Settings(database_url=db_url, db_pool_size=2))
    made.wait()
    yield made
    made.close()


class Stream:
    """Messages of one partition of the parking topic, each batch written as the worker writes it."""

    def __init__(self, pool: psycopg_pool.ConnectionPool) -> None:
        self.pool = pool
        self.offsets = itertools.count()
        rules = Parking(GROUP, {TOPIC: ""})
        self.processor = BatchProcessor(
            consumer_group=GROUP,
            registry=load_registry([]),
            ledger=Ledger(GROUP),
            dlq=PostgresDLQWriter(),
            policy=FailurePolicy(),
            parking=ParkingStep(rules, PostgresParkingStore()),
        )

    def record(
        self, key: str, event: dict[str, Any], headers: list[tuple[str, bytes | None]] | None = None
    ) -> Record:
        return Record(TOPIC, 0, next(self.offsets), key.encode(), json.dumps(event).encode(), headers)

    def write(self, *records: Record) -> BatchResult:
        with translate_db_errors(), self.pool.connection() as conn:
            return self.processor.write(conn, self.processor.decode(list(records)))


def rows(db: psycopg.Connection[Any]) -> dict[int, tuple[str, int | None, int]]:
    """offset → (status, blocked_by's offset, failure count) of every DLQ row."""
    found = db.execute(
        """SELECT d.source_offset, d.status, b.source_offset, d.failure_count
           FROM dlq d LEFT JOIN dlq b ON b.dlq_id = d.blocked_by ORDER BY d.source_offset"""
    ).fetchall()
    return {offset: (status, blocker, failures) for offset, status, blocker, failures in found}


def count_of(db: psycopg.Connection[Any], device: str) -> int | None:
    row = db.execute("SELECT reading_count FROM devices WHERE device_id = %s", (device,)).fetchone()
    return None if row is None else row[0]


def test_a_failure_parks_the_later_events_of_its_key_and_other_keys_flow(
    pool: psycopg_pool.ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    stream = Stream(pool)
    result = stream.write(
        stream.record("k-ok", k.registered("ok")),  # 0
        stream.record("k-d", k.reading("d")),  # 1: d is not registered: fails, blocks k-d
        stream.record("k-ok", k.reading("ok")),  # 2: applied
        stream.record("k-d", k.registered("d")),  # 3: would fix it, but comes after: parked
        stream.record("k-d", k.reading("d")),  # 4: parked
    )
    assert rows(db) == {1: ("pending", None, 1), 3: ("parked", 1, 1), 4: ("parked", 1, 1)}
    assert len(result.parked) == 2
    listed = {row.source_offset: row for row in DLQ.on(pool).operators.list_rows(DLQFilter())}
    assert listed[1].parked_behind == 2  # what operators see: "pending, 2 parked"
    assert listed[3].blocked_by == listed[4].blocked_by == listed[1].dlq_id
    assert status_text(listed[1]) == "pending, 2 parked"
    assert status_text(listed[3]) == f"parked behind #{listed[1].dlq_id}"
    assert DLQ.on(pool).operators.get(listed[1].dlq_id).parked_behind == 2
    assert count_of(db, "ok") == 1
    assert count_of(db, "d") is None  # its registration waits behind the failure
    stream.write(stream.record("k-d", k.reading("d")), stream.record("k-ok", k.reading("ok")))  # 5, 6
    assert rows(db)[5] == ("parked", 1, 1)
    assert count_of(db, "ok") == 2


def test_closing_the_blocker_releases_the_parked_events_in_order_each_once(
    pool: psycopg_pool.ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    stream = Stream(pool)
    stream.write(
        stream.record("k-d", k.reading("d", event_id="r1")),  # 0: blocks
        stream.record("k-d", k.registered("d", event_id="reg")),  # 1: parked
        stream.record("k-d", k.reading("d", event_id="r2")),  # 2: parked
    )
    (blocker,) = DLQ.on(pool).operators.matching_ids(DLQFilter(statuses=("pending",)))
    assert DLQ.on(pool).operators.discard([blocker], actor="test", note="the reading is lost") == [blocker]
    result = stream.write()  # the next batch (even an empty one) releases what nothing blocks any more
    assert len(result.released) == 2
    assert rows(db) == {0: ("discarded", None, 1), 1: ("resolved", 0, 1), 2: ("resolved", 0, 1)}
    assert count_of(db, "d") == 1  # registered, then one reading: in order, once
    assert stream.write().released == []  # nothing is released twice


def test_a_replay_of_the_blocker_that_succeeds_releases_its_key_in_the_same_transaction(
    pool: psycopg_pool.ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    stream = Stream(pool)
    stream.write(stream.record("reg", k.registered("other")))  # 0
    stream.write(
        stream.record("k-d", k.reading("d", event_id="r1", value=1)),  # 1: blocks
        stream.record("k-d", k.reading("d", event_id="r2", value=2)),  # 2: parked
    )
    (blocker_id,) = db.execute("SELECT dlq_id FROM dlq WHERE status = 'pending'").fetchone() or ()
    stream.write(stream.record("fix", k.registered("d")))  # 3: another key registers d (the fix)
    replayed = stream.record(
        "k-d", k.reading("d", event_id="r1", value=1), origin_header(blocker_id, TOPIC, 0, 1)
    )  # 4: the blocker's own replay: not parked behind itself
    result = stream.write(replayed, stream.record("k-d", k.reading("d", event_id="r3", value=3)))  # 5
    assert result.resolved == [blocker_id]
    statuses = rows(db)
    assert statuses[1][0] == "resolved"
    assert statuses[2][0] == "resolved"
    assert statuses[5] == ("resolved", 1, 1)  # parked behind the replay, released right after it
    assert count_of(db, "d") == 3
    value = db.execute("SELECT value FROM device_latest_readings WHERE device_id = 'd'").fetchone()
    assert value == (3.0,)  # the last reading of the key is the last one applied


def test_a_released_event_that_fails_blocks_its_key_again_and_the_rest_stay_parked(
    pool: psycopg_pool.ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    stream = Stream(pool)
    stream.write(
        stream.record("k-d", k.reading("d", event_id="r1")),  # 0: blocks
        stream.record("k-d", k.reading("d", event_id="r2")),  # 1: parked; still fails when released
        stream.record("k-d", k.registered("d", event_id="reg")),  # 2: parked
    )
    DLQ.on(pool).operators.discard(
        [row for (row,) in db.execute("SELECT dlq_id FROM dlq WHERE source_offset = 0")], actor="t"
    )
    stream.write()
    assert rows(db) == {0: ("discarded", None, 1), 1: ("pending", None, 2), 2: ("parked", 1, 1)}
    assert count_of(db, "d") is None


def test_events_after_a_failure_of_their_key_in_the_same_batch_do_not_take_effect(
    pool: psycopg_pool.ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    stream = Stream(pool)
    stream.write(stream.record("reg", k.registered("d")))  # 0
    stream.write(
        stream.record("k-d", k.reading("d", value=1)),  # 1: applied
        stream.record("k-d", k.reading("nobody")),  # 2: fails (unregistered)
        stream.record("k-d", k.reading("d", value=3)),  # 3: must not be applied after 2's failure
    )
    assert rows(db) == {2: ("pending", None, 1), 3: ("parked", 2, 1)}
    assert count_of(db, "d") == 1


def test_the_real_worker_parks_through_kafka_and_releases_what_an_operator_unblocks_while_idle(
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    db_url: str,
) -> None:
    producer = k.TestProducer(kafka_bootstrap)
    for event in (
        k.reading("d", event_id="r1"),
        k.registered("d", event_id="reg"),
        k.reading("d", event_id="r2"),
    ):
        producer.send(topic, k.structured(event), key="k-d", partition=0)
    producer.send(topic, k.structured(k.registered("free")), key="k-free", partition=1)
    producer.flush()
    settings = make_settings(parking=[topic])
    with threaded_worker(settings) as worker:
        wait_for(lambda: worker.app.worker.stats.consumed >= 4, timeout=60, message="all four consumed")
        statuses = dict(
            db.execute("SELECT source_offset, status FROM dlq WHERE source_partition = 0").fetchall()
        )
        assert statuses == {0: "pending", 1: "parked", 2: "parked"}
        assert count_of(db, "free") == 0  # another key flowed on
        operators = DLQ.on(worker.app.pool).operators
        group = settings.consumer_group
        sample = worker.app.metrics.registry.get_sample_value
        wait_for(
            lambda: sample("eventhandler_dlq_depth", {"consumer": group, "status": "parked"}) == 2,
            message="parked depth in the metrics",
        )
        wait_for(
            lambda: (sample("eventhandler_dlq_oldest_parked_age_seconds", {"consumer": group}) or 0) > 0,
            message="oldest parked age in the metrics",
        )
        (blocker,) = operators.matching_ids(DLQFilter(statuses=("pending",)))
        operators.discard([blocker], actor="test", note="lost reading")
        # nothing new arrives: the idle worker releases the key on its own
        wait_for(lambda: count_of(db, "d") == 1, timeout=30, message="the parked events released")
        wait_for(lambda: worker.app.worker.stats.released == 2, message="released counted")
        assert worker.app.worker.stats.parked == 2
        assert sample("eventhandler_events_released_total") == 2
    statuses = dict(db.execute("SELECT source_offset, status FROM dlq WHERE source_partition = 0").fetchall())
    assert statuses == {0: "discarded", 1: "resolved", 2: "resolved"}


# -- the invariant, through the real broker, with kill -9 and rebalances --------------------------------------

ORDERS = 120


def order_events(n: int) -> list[dict[str, Any]]:
    """An order's life; every fifth is in a currency the shop does not accept yet."""
    order_id = f"order-{n}"
    currency = "CHF" if n % 5 == 0 else "EUR"
    return [
        k.cloud_event("order.placed", {"order_id": order_id, "total": 10.0, "currency": currency}),
        k.cloud_event("order.paid", {"order_id": order_id, "amount": 10.0, "currency": currency}),
        k.cloud_event("order.shipped", {"order_id": order_id}),
    ]


@pytest.mark.slow
def test_order_keeps_through_kill_9_and_rebalances_and_parked_events_take_effect_once_in_order(
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    tmp_path: Any,
    spawned: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    """For every parked key, the projection ends equal to applying that key's events in partition
    order, each once — with a worker killed while events park, a rebalance, and another kill while
    the parked events are released."""
    producer = k.TestProducer(kafka_bootstrap)
    sent: dict[str, list[dict[str, Any]]] = {}
    for n in range(ORDERS):
        sent[f"order-{n}"] = events = order_events(n)
        for event in events:
            producer.send(topic, k.structured(event), key=f"order-{n}")  # one key, one partition: in order
    producer.flush()
    total = sum(len(events) for events in sent.values())
    bad = [order_id for order_id, events in sent.items() if events[0]["data"]["currency"] == "CHF"]
    settings = make_settings(
        parking=[topic], handlers=["eventhandler.example.orders"], batch_max_messages=7, flood_guard=False
    )
    env = settings_env(settings)
    consumed = "SELECT coalesce(sum(next_offset), 0) FROM consumer_positions"

    first = spawned(spawn_worker(env, log_path=str(tmp_path / "first.log")))
    wait_for(lambda: scalar(db, consumed) >= total // 3, timeout=60, message="a third consumed")
    kill9(first)
    second = spawned(spawn_worker(env, log_path=str(tmp_path / "second.log")))
    spawned(spawn_worker(env, log_path=str(tmp_path / "third.log")))  # joins: a rebalance
    wait_for(lambda: scalar(db, consumed) == total, timeout=90, message="everything consumed")
    statuses = dict(
        db.execute("SELECT event_type, array_agg(DISTINCT status) FROM dlq GROUP BY event_type").fetchall()
    )
    # each bad order's placement failed, and its payment and shipment wait behind it
    assert statuses == {"order.placed": ["pending"], "order.paid": ["parked"], "order.shipped": ["parked"]}
    assert scalar(db, "SELECT count(*) FROM dlq") == 3 * len(bad)
    assert scalar(db, "SELECT count(*) FROM order_lifecycle") == ORDERS - len(bad)

    db.execute("INSERT INTO order_currencies (code) VALUES ('CHF')")  # the fix
    replayed = cli_json(env, "replay", "--consumer", settings.consumer_group, "--yes")
    assert replayed["published"] == len(bad)
    kill9(second)  # while the blockers' copies are applied and their keys released
    spawned(spawn_worker(env, log_path=str(tmp_path / "fourth.log")))

    def shipped() -> int:
        return int(scalar(db, "SELECT count(*) FROM order_lifecycle WHERE status = 'shipped'"))

    try:
        wait_for(lambda: shipped() == ORDERS, timeout=120, message="every order shipped")
    except AssertionError:
        dlq = db.execute(
            "SELECT event_type, status, error_message, count(*) FROM dlq GROUP BY 1, 2, 3 ORDER BY 1, 2"
        ).fetchall()
        orders = db.execute("SELECT status, history, count(*) FROM order_lifecycle GROUP BY 1, 2").fetchall()
        raise AssertionError(f"not every order shipped; DLQ: {dlq}; orders: {orders}") from None
    wait_for(
        lambda: scalar(db, "SELECT count(*) FROM dlq WHERE status <> 'resolved'") == 0,
        timeout=30,
        message="every row resolved",
    )
    for order_id, history, event_ids in db.execute(
        "SELECT order_id, history, event_ids FROM order_lifecycle"
    ).fetchall():
        events = sent[order_id]
        assert history == [e["type"] for e in events], order_id
        assert event_ids == [e["id"] for e in events], order_id  # each once, in partition order

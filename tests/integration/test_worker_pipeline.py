"""The worker against a real broker and PostgreSQL: every failure point lands in the DLQ, byte for byte,
and the good events around bad ones are all applied."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from eventhandler.config import Settings
from eventhandler.events import DLQ_ID_HEADER, ORIGIN_HEADER, origin_header
from eventhandler.logs import configure_logging
from eventhandler.observer import LOGGED_DLQ_IDS
from tests.conftest import unique
from tests.support import kafka as k
from tests.support.poison import POISON, Headers
from tests.support.rawkafka import produce_raw
from tests.support.worker import run_until_idle, scalar

LARGE_MESSAGES = 4 * 1024 * 1024


@pytest.fixture
def producer(kafka_bootstrap: str) -> k.TestProducer:
    return k.TestProducer(kafka_bootstrap, **{"message.max.bytes": LARGE_MESSAGES})


def test_poison_corpus_each_gives_one_exact_dlq_row_and_good_events_are_applied(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    kafka_bootstrap: str,
    db: psycopg.Connection[Any],
) -> None:
    assert len(POISON) >= 20
    # Apache Kafka refuses messages over 1 MB unless the topic allows them, as a deployment that
    # expects large messages configures it.
    topic = unique("large").replace("_", "-")
    k.create_topic(kafka_bootstrap, topic, partitions=4, config={"max.message.bytes": str(LARGE_MESSAGES)})
    for partition in range(4):
        for device in range(5):
            producer.send(topic, k.structured(k.registered(f"dev-{partition}-{device}")), partition=partition)
    sent: dict[str, tuple[bytes | None, bytes, Headers]] = {}
    good = 0
    for index, (name, value, headers, _, _) in enumerate(POISON):
        key = f"poison-{name}".encode()
        # every poison message is surrounded by good events on the same partition
        for device in range(5):
            reading = k.reading(f"dev-{index % 4}-{device}", value=index)
            producer.send(topic, k.structured(reading), key=key, partition=index % 4)
            good += 1
        producer.send(
            topic, value, key=key, headers=[*headers, ("poison", name.encode())], partition=index % 4
        )
        sent[name] = (value, key, [*headers, ("poison", name.encode())])
    producer.flush()

    stats = run_until_idle(make_settings(topics=[topic]), idle=2)

    assert stats.failed == len(POISON)
    rows = db.execute(
        "SELECT event_payload, message_key, header_keys, header_values, stage, error_message FROM dlq"
    ).fetchall()
    assert len(rows) == len(POISON)
    by_name = {}
    for value, key, header_keys, header_values, stage, error in rows:
        headers = list(
            zip(header_keys, [None if v is None else bytes(v) for v in header_values], strict=True)
        )
        name = dict(headers)["poison"].decode()  # type: ignore[union-attr]
        assert name not in by_name, f"{name} has two DLQ rows"
        by_name[name] = (None if value is None else bytes(value), bytes(key), headers, stage, error)
    for name, _, _, stage, fragment in POISON:
        value, key, headers, got_stage, error = by_name[name]
        assert (value, key, headers) == sent[name], f"{name}: DLQ row is not the original message"
        assert got_stage == stage, f"{name}: stage {got_stage}, error {error}"
        assert fragment in error, f"{name}: {error!r}"
    assert scalar(db, "SELECT sum(reading_count) FROM devices") == good
    assert scalar(db, "SELECT count(*) FROM devices") == 20


def test_events_from_the_cloudevents_sdk_are_read_in_both_bindings(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    from cloudevents.core.bindings import kafka as ce_kafka
    from cloudevents.core.v1.event import CloudEvent

    def sdk_event(event_type: str, data: dict[str, Any]) -> CloudEvent:
        return CloudEvent(
            attributes={
                "type": event_type,
                "source": "/sdk",
                "id": f"sdk-{event_type}-{data.get('value', 0)}",
                "datacontenttype": "application/json",
            },
            data=data,
        )

    registered = ce_kafka.to_structured_event(
        sdk_event("device.registered", {"device_id": "sdk-1", "name": "SDK"})
    )
    producer.send(topic, registered.value, key=b"sdk-1", headers=list(registered.headers.items()))
    for value in range(3):
        message = ce_kafka.to_binary_event(
            sdk_event("device.reading", {"device_id": "sdk-1", "metric": "t", "value": value})
        )
        producer.send(topic, message.value, key=b"sdk-1", headers=list(message.headers.items()))
    structured = ce_kafka.to_structured_event(
        sdk_event("device.reading", {"device_id": "sdk-1", "metric": "h", "value": 9})
    )
    producer.send(topic, structured.value, key=b"sdk-1", headers=list(structured.headers.items()))
    producer.flush()

    stats = run_until_idle(make_settings(), idle=2)

    assert stats.failed == 0, db.execute("SELECT error_message FROM dlq").fetchall()
    assert db.execute("SELECT name, reading_count FROM devices WHERE device_id = 'sdk-1'").fetchone() == (
        "SDK",
        4,
    )
    latest = dict(db.execute("SELECT metric, value FROM device_latest_readings").fetchall())
    assert latest == {"t": 2.0, "h": 9.0}


def test_a_reading_before_its_device_is_registered_is_a_handler_failure(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    early = k.reading("late-1", value=7)
    producer.send_events(topic, [early, k.registered("late-1"), k.reading("late-1", value=8)])
    producer.flush()

    run_until_idle(make_settings(), idle=2)

    row = db.execute(
        "SELECT stage, error_type, error_message, event_id, event_type, error_traceback FROM dlq"
    ).fetchone()
    assert row is not None
    assert row[:5] == (
        "handler",
        "HandlerFailure",
        "device 'late-1' is not registered",
        early["id"],
        "device.reading",
    )
    assert "Traceback" in row[5]
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'late-1'") == 1


def test_dead_letters_are_logged_one_line_per_failure_group_per_batch(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    for n in range(60):  # two failure groups, interleaved, over several batches
        producer.send(topic, b"{not json " + str(n).encode(), partition=0)
        producer.send(topic, k.structured(k.reading(f"ghost-{n}")), partition=0)
    producer.flush()
    logs = io.StringIO()
    configure_logging("info", "json", stream=logs)

    # Every message fails (two keyless groups of 60): a flood the guard would hold; this test is
    # about the log lines of dead-lettering, so the guard is off.
    stats = run_until_idle(make_settings(batch_max_messages=50, flood_guard=False), idle=2)

    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    dead = [line for line in lines if line["event"] == "events_dead_lettered"]
    batches = [line for line in lines if line["event"] == "batch_committed" and line["failed"]]
    assert stats.failed == 120
    assert len(batches) >= 3
    assert len(dead) <= 2 * len(batches), "a line per failure group and batch, not per message"
    assert sum(line["count"] for line in dead) == 120
    groups = dict(db.execute("SELECT fingerprint, count(*) FROM dlq GROUP BY fingerprint").fetchall())
    logged: Counter[str] = Counter()
    for line in dead:
        logged[line["fingerprint"]] += line["count"]
        assert line["level"] == "warning"
        assert len(line["dlq_ids"]) == min(line["count"], LOGGED_DLQ_IDS)
        first = db.execute(
            "SELECT stage, error_type, error_message, source_offset, fingerprint FROM dlq WHERE dlq_id = %s",
            (line["dlq_ids"][0],),
        ).fetchone()
        assert first == (
            line["stage"],
            line["error_type"],
            line["error"],
            line["offset"],
            line["fingerprint"],
        )
    assert logged == Counter(groups)
    assert {line["stage"] for line in dead} == {"deserialize", "handler"}


def test_a_kafka_timestamp_no_datetime_can_hold_does_not_stop_a_dead_letter(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    kafka_bootstrap: str,
    db: psycopg.Connection[Any],
) -> None:
    far, normal = 2**62, 1_700_000_000_000  # a producer may set any 64-bit CreateTime
    # Apache Kafka 4 refuses a CreateTime more than an hour ahead unless the topic allows it
    # (message.timestamp.after.max.ms); a topic that does lets any 64-bit value through.
    topic = unique("far-future").replace("_", "-")
    k.create_topic(
        kafka_bootstrap, topic, partitions=4, config={"message.timestamp.after.max.ms": str(2**63 - 1)}
    )
    producer.send(topic, b"{not json", key=b"far", timestamp_ms=far, partition=0)
    producer.send(topic, b"{not json", key=b"normal", timestamp_ms=normal, partition=0)
    producer.send(topic, k.structured(k.registered("far-1")), timestamp_ms=far, partition=0)
    producer.flush()

    stats = run_until_idle(make_settings(topics=[topic]), idle=2)

    assert (stats.failed, stats.applied) == (2, 1)
    rows = dict(db.execute("SELECT message_key, message_timestamp FROM dlq").fetchall())
    assert rows == {b"far": None, b"normal": datetime.fromtimestamp(normal / 1000, UTC)}
    assert scalar(db, "SELECT count(*) FROM devices WHERE device_id = 'far-1'") == 1


def test_a_projection_failure_sends_only_that_event_to_the_dlq(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    events = [k.registered(f"p-{i}") for i in range(50)]
    bad = k.registered("p-bad", name="nul \u0000 in name")
    events.insert(25, bad)
    events += [k.reading(f"p-{i}") for i in range(50)]
    for event in events:
        producer.send(topic, k.structured(event), partition=0)
    producer.flush()

    run_until_idle(make_settings(), idle=2)

    assert db.execute("SELECT stage, event_id FROM dlq").fetchall() == [("projection", bad["id"])]
    assert scalar(db, "SELECT count(*) FROM devices") == 50
    assert scalar(db, "SELECT sum(reading_count) FROM devices") == 50


def test_a_duplicate_event_takes_effect_once(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    reading = k.reading("dup-1")
    producer.send_events(topic, [k.registered("dup-1"), reading, reading])
    producer.flush()
    first = run_until_idle(make_settings(), idle=2)
    producer.send_events(topic, [reading])  # a later duplicate, e.g. a producer retry
    producer.flush()
    second = run_until_idle(make_settings(), idle=2)

    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'dup-1'") == 1
    assert first.duplicates + second.duplicates == 2
    assert scalar(db, "SELECT count(*) FROM dlq") == 0


def test_duplicates_are_told_from_failures_whatever_the_handler_says_now(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    registered, reading = k.registered("dup-2"), k.reading("dup-2", value=1)
    producer.send_events(topic, [registered, reading, k.decommissioned("dup-2")])
    producer.flush()
    first = run_until_idle(make_settings(), idle=2)
    # Later duplicates: the reading would now fail (its device is decommissioned), and a repeated
    # registration sits in the same batch as a new reading it must not resurrect the device for.
    producer.send_events(topic, [reading, registered, k.reading("dup-2", value=2)])
    producer.flush()
    second = run_until_idle(make_settings(), idle=2)

    assert (first.applied, first.failed) == (3, 0)
    assert (second.duplicates, second.applied, second.failed) == (2, 0, 1)
    row = db.execute("SELECT stage, error_message FROM dlq").fetchall()
    assert row == [("handler", "device 'dup-2' is decommissioned")]  # only the new reading failed
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'dup-2'") == 1
    assert scalar(db, "SELECT status FROM devices WHERE device_id = 'dup-2'") == "decommissioned"


def test_unknown_types_can_be_skipped_by_policy(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    producer.send_events(topic, [k.cloud_event("order.created", {"id": 1}), k.registered("u-1")])
    producer.flush()
    run_until_idle(make_settings(unknown_event_policy="skip"), idle=2)
    assert scalar(db, "SELECT count(*) FROM dlq") == 0
    assert scalar(db, "SELECT count(*) FROM devices") == 1


def test_positions_are_stored_with_the_batch_and_a_restart_reads_nothing_twice(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    group: str,
    db: psycopg.Connection[Any],
) -> None:
    producer.send_events(
        topic, [k.registered("r-1")] + [k.reading("r-1") for _ in range(100)] + [k.reading("nobody")]
    )
    producer.flush()
    run_until_idle(make_settings(), idle=2)
    positions = dict(
        db.execute(
            "SELECT partition, next_offset FROM consumer_positions WHERE consumer = %s", (group,)
        ).fetchall()
    )
    assert sum(positions.values()) == 102
    # a second worker in the same group resumes from PostgreSQL's positions: nothing is re-read
    stats = run_until_idle(make_settings(), idle=2)
    assert stats.consumed == 0
    assert scalar(db, "SELECT reading_count FROM devices") == 100
    assert scalar(db, "SELECT failure_count FROM dlq") == 1


def test_the_cooperative_sticky_assignor_works_too(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    producer.send_events(topic, [k.registered("coop-1"), *[k.reading("coop-1") for _ in range(50)]])
    producer.flush()
    options = k.TEST_CONSUMER_OPTIONS | {"partition.assignment.strategy": "cooperative-sticky"}
    stats = run_until_idle(make_settings(kafka_consumer_options=options), idle=2)
    assert stats.consumed == 51
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'coop-1'") == 50


def _replay_copy(db: psycopg.Connection[Any], dlq_id: int) -> tuple[bytes, bytes | None, k.Headers]:
    """What a replay publishes for a row: its original bytes plus the headers naming the row."""
    value, key, names, values, topic, partition, offset = db.execute(
        "SELECT event_payload, message_key, header_keys, header_values, source_topic, source_partition,"
        " source_offset FROM dlq WHERE dlq_id = %s",
        (dlq_id,),
    ).fetchone()
    headers: k.Headers = [(n, None if v is None else bytes(v)) for n, v in zip(names, values, strict=True)]
    headers += origin_header(dlq_id, topic, partition, offset)
    return bytes(value), None if key is None else bytes(key), headers


@pytest.mark.parametrize("fixed", [False, True])
def test_two_copies_of_a_replay_in_one_batch_resolve_the_row_only_if_the_event_took_effect(
    fixed: bool,
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    db: psycopg.Connection[Any],
) -> None:
    """An unknown delivery outcome (or two clicks on retry) puts two copies of a replay in one batch:
    the first copy's outcome is the row's, whatever the second copy, an in-batch duplicate, says."""
    producer.send(topic, k.structured(k.reading("twice-1", value=1.0)), key=b"twice-1", partition=0)
    producer.flush()
    run_until_idle(make_settings(), idle=1)
    (dlq_id,) = [row[0] for row in db.execute("SELECT dlq_id FROM dlq").fetchall()]
    if fixed:
        producer.send(topic, k.structured(k.registered("twice-1")), key=b"twice-1", partition=0)
    value, key, headers = _replay_copy(db, dlq_id)
    for _ in range(2):
        producer.send(topic, value, key=key, headers=headers, partition=0)
    producer.flush()

    # a long batch wait: the first consume gathers both copies (and the fix), as the defect needs
    stats = run_until_idle(make_settings(batch_max_wait_seconds=2.0), idle=1)

    assert stats.batches == 1
    status, retry_count = db.execute(
        "SELECT status, retry_count FROM dlq WHERE dlq_id = %s", (dlq_id,)
    ).fetchone()
    if fixed:
        assert status == "resolved"
        assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'twice-1'") == 1
    else:
        assert (status, retry_count) == ("pending", 1)
        assert scalar(db, "SELECT count(*) FROM dlq") == 1


def test_a_value_postgresql_cannot_index_is_a_projection_failure_not_a_stall(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    """A metric name of 8,000 random characters makes its index row too large (SQLSTATE 54000): that
    event goes to the DLQ, the rest of its batch is applied, and the partition moves on."""
    producer.send(topic, k.structured(k.registered("wide-1")), partition=0)
    huge = k.reading("wide-1", metric=os.urandom(4000).hex())
    producer.send(topic, k.structured(huge), partition=0)
    for n in range(5):
        producer.send(topic, k.structured(k.reading("wide-1", value=n)), partition=0)
    producer.flush()

    stats = run_until_idle(make_settings(), idle=2)

    rows = db.execute("SELECT stage, event_id, error_message FROM dlq").fetchall()
    assert [(stage, event_id) for stage, event_id, _ in rows] == [("projection", huge["id"])]
    assert "index row" in rows[0][2]
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'wide-1'") == 5
    assert stats.retries == 0  # deterministic: dead-lettered at once, not retried


@pytest.mark.parametrize(
    "forgery", ["id only", "other coordinates", "beyond the column types", "a NUL in the topic"]
)
def test_a_forged_replay_header_neither_resolves_nor_overwrites_the_row_it_names(
    forgery: str,
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    db: psycopg.Connection[Any],
) -> None:
    producer.send(topic, k.structured(k.reading("victim-1")), key=b"victim-1", partition=0)
    producer.flush()
    run_until_idle(make_settings(), idle=1)
    ((dlq_id, offset),) = db.execute("SELECT dlq_id, source_offset FROM dlq").fetchall()
    if forgery == "id only":
        forged = [(DLQ_ID_HEADER, str(dlq_id).encode())]
    elif forgery == "beyond the column types":  # once stalled every partition: the SQL cast failed
        forged = origin_header(99999999999999999999, topic, 0, offset)
    elif forgery == "a NUL in the topic":  # once stalled every partition: PostgreSQL text holds no NUL
        forged = [(DLQ_ID_HEADER, str(dlq_id).encode()), (ORIGIN_HEADER, f"{topic}\x00:0:{offset}".encode())]
    else:
        forged = origin_header(dlq_id, topic, 0, offset + 1000)
    # a good event and a bad one, both naming the row: each is an ordinary message
    producer.send(topic, k.structured(k.registered("other-1")), headers=forged, partition=1)
    producer.send(topic, b"{not json", headers=forged, partition=1)
    producer.flush()

    stats = run_until_idle(make_settings(), idle=1)

    assert (stats.applied, stats.failed) == (1, 1)
    status, retry_count, error = db.execute(
        "SELECT status, retry_count, error_message FROM dlq WHERE dlq_id = %s", (dlq_id,)
    ).fetchone()
    assert (status, retry_count) == ("pending", 0)
    assert "not registered" in error
    assert scalar(db, "SELECT count(*) FROM dlq") == 2  # the bad message got a row of its own


def test_a_header_key_that_is_not_utf8_neither_crashes_the_worker_nor_loses_the_message(
    make_settings: Callable[..., Settings], kafka_bootstrap: str, topic: str, db: psycopg.Connection[Any]
) -> None:
    """confluent-kafka raises SystemError from Message.headers() on such a key (librdkafka, Java and Go
    clients write them); the worker read nothing past it and crashed, and so did every worker after it."""
    good = k.structured(k.registered("raw-1"))
    produce_raw(kafka_bootstrap, topic, 0, good, b"raw-1", [(b"trace\xff\xfe", b"\x00\x01"), (b"ok", None)])
    produce_raw(kafka_bootstrap, topic, 0, b"{not json", b"raw-2", [(b"\xc3\x28 bad", b"v")])
    producer = k.TestProducer(kafka_bootstrap)
    producer.send(topic, k.structured(k.reading("raw-1")), partition=0)
    producer.flush()

    stats = run_until_idle(make_settings(), idle=2)

    assert (stats.applied, stats.failed) == (2, 1)
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'raw-1'") == 1
    value, key, header_keys, header_values = db.execute(
        "SELECT event_payload, message_key, header_keys_raw, header_values FROM dlq"
    ).fetchone()
    assert (bytes(value), bytes(key)) == (b"{not json", b"raw-2")
    assert ([bytes(k) for k in header_keys], [bytes(v) for v in header_values]) == ([b"\xc3\x28 bad"], [b"v"])
    assert scalar(db, "SELECT sum(next_offset) FROM consumer_positions") == 3  # nothing held back

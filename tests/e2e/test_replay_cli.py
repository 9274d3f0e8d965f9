"""Replay from the command line, with the loop closed by the worker: real broker, real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import structlog

from eventhandler import replay as replay_module
from eventhandler.app import build_service
from eventhandler.config import Settings
from eventhandler.dlq.rows import LEASE_CLASS
from eventhandler.errors import DatabaseUnavailable
from eventhandler.events import DLQ_ID_HEADER, ORIGIN_HEADER, REPLAY_COUNT_HEADER
from eventhandler.librdkafka import fetch_headers
from eventhandler.models import DLQFilter
from tests.conftest import settings_env
from tests.support import kafka as k
from tests.support.cli import cli_json, consume_all, run_cli
from tests.support.rawkafka import produce_raw
from tests.support.waiting import wait_for
from tests.support.worker import run_until_idle, scalar, threaded_worker


@pytest.fixture
def producer(kafka_bootstrap: str) -> k.TestProducer:
    return k.TestProducer(kafka_bootstrap)


def statuses(db: psycopg.Connection[Any]) -> dict[str, int]:
    return dict(db.execute("SELECT status, count(*) FROM dlq GROUP BY status").fetchall())


def seed_unregistered_readings(producer: k.TestProducer, topic: str, settings: Settings, count: int) -> None:
    """`count` readings for a device nobody registered yet, run through the worker into the DLQ."""
    producer.send_events(topic, [k.reading("late-device", value=i) for i in range(count)])
    producer.flush()
    run_until_idle(settings, idle=2)


def test_the_full_story_fix_the_cause_then_replay(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    settings = make_settings()
    env = settings_env(settings)
    producer.send_events(
        topic, [k.registered("ok-1"), k.reading("ok-1"), k.cloud_event("device.reading", "nope")]
    )
    seed_unregistered_readings(producer, topic, settings, 5)
    assert statuses(db) == {"pending": 6}

    # the cause is fixed: the device gets registered
    producer.send_events(topic, [k.registered("late-device")])
    producer.flush()
    run_until_idle(settings, idle=2)

    report = cli_json(env, "replay", "--event-type", "device.reading", "--stage", "handler", "--yes")
    assert (report["matched"], report["published"], report["failed"]) == (5, 5, 0)
    assert statuses(db) == {"pending": 1, "replayed": 5}

    run_until_idle(settings, idle=2)
    assert statuses(db) == {"pending": 1, "resolved": 5}
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'late-device'") == 5
    assert (
        scalar(db, "SELECT count(*) FROM dlq WHERE resolved_by = 'replay' AND resolved_at IS NOT NULL") == 5
    )
    audit = db.execute("SELECT actor, action, cardinality(dlq_ids) FROM dlq_audit").fetchall()
    assert len(audit) == 1
    assert audit[0][0].startswith("cli:")
    assert audit[0][1:] == ("replay", 5)


def test_dry_run_changes_nothing(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    settings = make_settings()
    seed_unregistered_readings(producer, topic, settings, 3)
    before = db.execute("SELECT * FROM dlq ORDER BY dlq_id").fetchall()
    result = cli_json(settings_env(settings), "replay", "--dry-run")
    assert result["matched"] == 3
    assert result["dry_run"] is True
    assert db.execute("SELECT * FROM dlq ORDER BY dlq_id").fetchall() == before
    assert scalar(db, "SELECT count(*) FROM dlq_audit") == 0


def test_replay_republishes_byte_for_byte_with_dlq_headers(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    kafka_bootstrap: str,
    db: psycopg.Connection[Any],
) -> None:
    settings = make_settings()
    headers = [("trace", b"\xff\x00abc"), ("dup", b"1"), ("dup", b"2")]
    producer.send(topic, b"\xfe\xff not even utf-8", key=b"\x00key", headers=headers)
    producer.flush()
    run_until_idle(settings, idle=2)
    ((dlq_id, partition, offset),) = db.execute(
        "SELECT dlq_id, source_partition, source_offset FROM dlq"
    ).fetchall()
    target = f"{topic}-replayed"
    k.create_topic(kafka_bootstrap, target, partitions=1)

    report = cli_json(settings_env(settings), "replay", "--id", str(dlq_id), "--to-topic", target, "--yes")
    assert report["published"] == 1

    (message,) = consume_all(kafka_bootstrap, target, 1)
    assert message.value() == b"\xfe\xff not even utf-8"
    assert message.key() == b"\x00key"
    assert message.headers() == [
        *headers,
        (DLQ_ID_HEADER, str(dlq_id).encode()),
        (ORIGIN_HEADER, f"{topic}:{partition}:{offset}".encode()),  # the row's own message, not the copy's
        (REPLAY_COUNT_HEADER, b"1"),
    ]
    assert scalar(db, "SELECT replayed_to_topic FROM dlq") == target


def test_header_keys_that_are_not_utf8_are_kept_and_replayed_byte_for_byte(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    kafka_bootstrap: str,
    db: psycopg.Connection[Any],
) -> None:
    """The Python client can neither read nor write such keys; the DLQ once kept them as escaped text
    and replay could not publish them."""
    settings = make_settings()
    env = settings_env(settings)
    headers = [(b"trace\xff\xfe", b"\x00\x01"), (b"ok", None), (b"\xc3\x28", b"")]
    produce_raw(kafka_bootstrap, topic, 0, b"\xfe{not json", b"\x00raw\xff", headers)
    produce_raw(kafka_bootstrap, topic, 0, k.structured(k.reading("raw-device")), b"raw-device", headers)
    run_until_idle(settings, idle=2)
    (garbage, unregistered) = [row for (row,) in db.execute("SELECT dlq_id FROM dlq ORDER BY source_offset")]

    # every view shows the row (the key that is not text as base64 or \xNN), none crashes
    shown = cli_json(env, "dlq", "show", str(garbage))
    assert [key for key, _ in shown["headers"]] == ["trace\\xff\\xfe", "ok", "\\xc3("]

    target = f"{topic}-replayed"
    k.create_topic(kafka_bootstrap, target, partitions=1)
    report = cli_json(env, "replay", "--id", str(garbage), "--to-topic", target, "--yes")
    assert (report["published"], report["failed"]) == (1, 0)
    assert fetch_headers({"bootstrap.servers": kafka_bootstrap}, target, 0, 0) == [
        *headers,
        (DLQ_ID_HEADER.encode(), str(garbage).encode()),
        (ORIGIN_HEADER.encode(), f"{topic}:0:0".encode()),
        (REPLAY_COUNT_HEADER.encode(), b"1"),
    ]
    (message,) = consume_all(kafka_bootstrap, target, 1)
    assert (message.value(), message.key()) == (b"\xfe{not json", b"\x00raw\xff")

    # the loop closes: once the device exists, the replayed reading resolves its row
    producer.send_events(topic, [k.registered("raw-device")])
    producer.flush()
    run_until_idle(settings, idle=2)
    report = cli_json(env, "replay", "--id", str(unregistered), "--yes")
    assert (report["published"], report["failed"]) == (1, 0)
    run_until_idle(settings, idle=2)
    assert statuses(db) == {"replayed": 1, "resolved": 1}
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'raw-device'") == 1


def test_a_poison_row_replayed_comes_back_pending_with_retry_count_one(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    settings = make_settings()
    producer.send(topic, b"{broken json")
    producer.flush()
    run_until_idle(settings, idle=2)
    assert cli_json(settings_env(settings), "replay", "--yes")["published"] == 1
    run_until_idle(settings, idle=2)
    row = db.execute("SELECT status, retry_count, replay_count, failure_count FROM dlq").fetchall()
    assert row == [("pending", 1, 1, 2)]


def test_two_replays_at_once_publish_each_row_once(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    kafka_bootstrap: str,
    db: psycopg.Connection[Any],
) -> None:
    settings = make_settings()
    seed_unregistered_readings(producer, topic, settings, 300)
    target = f"{topic}-twice"
    k.create_topic(kafka_bootstrap, target, partitions=1)
    env = settings_env(settings)
    results: list[subprocess.CompletedProcess[str]] = []

    def replay() -> None:
        results.append(run_cli(env, "replay", "--to-topic", target, "--yes", "--json", "--rate", "400"))

    threads = [threading.Thread(target=replay) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    import json

    published = [json.loads(r.stdout)["published_ids"] for r in results]
    assert not set(published[0]) & set(published[1])
    assert sorted(published[0] + published[1]) == sorted(r[0] for r in db.execute("SELECT dlq_id FROM dlq"))
    messages = consume_all(kafka_bootstrap, target, 300)
    ids = [dict(m.headers())[DLQ_ID_HEADER] for m in messages]
    assert len(ids) == len(set(ids)) == 300


def test_replays_at_once_on_a_pool_of_one_connection_do_not_starve(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    """Each replay's lease held a pooled connection for the whole run: with `EVENTHANDLER_DB_POOL_SIZE=1`
    no claim could get one, and four API replays at once exhausted the default pool of four."""
    settings = make_settings(db_pool_size=1)
    seed_unregistered_readings(producer, topic, settings, 40)
    service, pool = build_service(settings)
    reports: list[Any] = []
    try:

        def replay(offset: int) -> None:
            ids = tuple(range(offset * 10 + 1, offset * 10 + 11))
            reports.append(service.replay(DLQFilter(ids=ids), actor="test"))

        threads = [threading.Thread(target=replay, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        pool.close()
    assert sorted(report.published for report in reports) == [10, 10, 10, 10]
    assert statuses(db) == {"replayed": 40}


def test_a_replay_that_loses_its_lease_stops_before_its_next_chunk(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dropped lease connection frees the replay's rows for another replayer: going on would let
    both publish them. (One chunk in flight at a time here, so that "the next chunk" is one not yet
    taken; with a window, the chunks already sent are marked, and no other is taken.)"""
    settings = make_settings()
    seed_unregistered_readings(producer, topic, settings, 6)
    monkeypatch.setattr(replay_module, "CHUNK", 2)
    monkeypatch.setattr(replay_module, "WINDOW", 1)
    service, pool = build_service(settings)

    def drop_the_lease(_done: int) -> None:
        db.execute(
            # the timeout makes it wait until the backend is gone: before that its lock is still held
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_locks"
            " WHERE locktype = 'advisory' AND classid = %s",
            (LEASE_CLASS,),
        )

    try:
        with pytest.raises(DatabaseUnavailable, match="lost its lease"):
            service.replay(DLQFilter(), actor="test", progress=drop_the_lease)
    finally:
        pool.close()
    assert statuses(db) == {"replayed": 2, "pending": 4}


def test_a_replay_killed_midway_and_rerun_loses_nothing(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    kafka_bootstrap: str,
    db: psycopg.Connection[Any],
) -> None:
    settings = make_settings()
    seed_unregistered_readings(producer, topic, settings, 400)
    producer.send_events(topic, [k.registered("late-device")])
    producer.flush()
    env = settings_env(settings)
    slow = subprocess.Popen(
        [sys.executable, "-m", "eventhandler", "replay", "--yes", "--rate", "100"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(
        lambda: scalar(db, "SELECT count(*) FROM dlq WHERE status = 'replayed'") >= 200,
        timeout=60,
        message="the replay to be part-way",
    )
    os.killpg(slow.pid, signal.SIGKILL)
    slow.wait(timeout=30)
    part_way = statuses(db)
    assert 0 < part_way.get("pending", 0) < 400

    rerun = cli_json(env, "replay", "--yes")
    assert rerun["published"] == part_way["pending"]
    assert statuses(db) == {"replayed": 400}

    run_until_idle(settings, idle=2)  # the worker applies them, duplicates of an unknown outcome once
    assert statuses(db) == {"resolved": 400}
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'late-device'") == 400


def test_rate_holds_within_twenty_percent(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, kafka_bootstrap: str
) -> None:
    settings = make_settings()
    seed_unregistered_readings(producer, topic, settings, 120)
    target = f"{topic}-rate"
    k.create_topic(kafka_bootstrap, target, partitions=1)
    assert (
        cli_json(settings_env(settings), "replay", "--to-topic", target, "--rate", "40", "--yes")["published"]
        == 120
    )
    stamps = sorted(m.timestamp()[1] for m in consume_all(kafka_bootstrap, target, 120))
    achieved = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000)
    assert 32 <= achieved <= 48, f"achieved {achieved:.1f}/s for --rate 40"


def test_filters_select_exactly_the_right_rows(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    settings = make_settings()
    producer.send_events(topic, [k.reading("ghost-a"), k.reading("ghost-b")])
    producer.send(topic, b"not json")
    producer.send_events(topic, [k.decommissioned("ghost-c")])
    producer.flush()
    run_until_idle(settings, idle=2)
    env = settings_env(settings)

    def matched(*args: str) -> set[int]:
        return set(cli_json(env, "replay", "--dry-run", *args)["ids"])

    rows = dict(db.execute("SELECT error_message, dlq_id FROM dlq").fetchall())
    a, b = rows["device 'ghost-a' is not registered"], rows["device 'ghost-b' is not registered"]
    c = rows["device 'ghost-c' is not registered"]
    bad = next(v for key, v in rows.items() if "JSON" in key)
    assert matched() == {a, b, c, bad}
    assert matched("--stage", "deserialize") == {bad}
    assert matched("--event-type", "device.reading") == {a, b}
    assert matched("--error-contains", "GHOST-B") == {b}
    assert matched("--id", str(a), "--id", str(c)) == {a, c}
    assert matched("--limit", "2") == set(sorted([a, b, c, bad])[:2])  # oldest first
    assert matched("--since", "1h") == {a, b, c, bad}
    assert matched("--until", "1h") == set()
    assert matched("--consumer", "someone-else") == set()
    fingerprint = scalar(db, "SELECT fingerprint FROM dlq WHERE dlq_id = %s", a)
    assert matched("--fingerprint", fingerprint) == {a, b, c}  # one error group: ids normalised away
    assert matched("--status", "resolved", "--force") == set()  # resolved rows need --force to be replayed


def test_a_rate_limited_replay_never_holds_up_the_worker(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    """The worker updates a replayed row when its copy arrives; a replay sending 2 rows a second must
    not make it wait (it held its claim's transaction, and the rows' locks, for the whole chunk)."""
    settings = make_settings()
    seed_unregistered_readings(producer, topic, settings, 8)
    producer.send_events(topic, [k.registered("late-device")])
    producer.flush()
    run_until_idle(settings, idle=2)

    with threaded_worker(settings) as worker:
        report = cli_json(settings_env(settings), "replay", "--rate", "2", "--yes")  # about 4 s
        assert report["published"] == 8
        wait_for(
            lambda: statuses(db) == {"resolved": 8}, timeout=30, message=f"rows resolved ({statuses(db)})"
        )
        registry = worker.app.metrics.registry
        name = "eventhandler_projection_write_duration_seconds"
        transactions = registry.get_sample_value(f"{name}_count")
        within_a_second = registry.get_sample_value(f"{name}_bucket", {"le": "1.0"})
    assert transactions
    assert within_a_second == transactions, "a batch transaction waited on the replay"
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'late-device'") == 8
    assert scalar(db, "SELECT count(*) FROM dlq WHERE replay_count = 1") == 8


def test_the_cli_keeps_the_same_replay_rule(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    """`--status resolved` replayed resolved rows without any force; an internal topic was a target."""
    settings = make_settings()
    seed_unregistered_readings(producer, topic, settings, 2)
    db.execute("UPDATE dlq SET status = 'resolved'")
    env = settings_env(settings)

    refused = run_cli(env, "replay", "--status", "resolved", "--yes")
    assert refused.returncode != 0
    assert "needs force" in refused.stderr
    internal = run_cli(
        env, "replay", "--status", "resolved", "--force", "--to-topic", "__consumer_offsets", "--yes"
    )
    assert internal.returncode != 0
    assert "internal topics" in internal.stderr
    assert statuses(db) == {"resolved": 2}

    report = cli_json(env, "replay", "--status", "resolved", "--force", "--yes")
    assert report["published"] == 2
    assert statuses(db) == {"replayed": 2}


@pytest.mark.apache_kafka  # a topic's max.message.bytes, which the broker enforces
def test_rows_the_broker_refused_stay_pending_and_free_and_the_replay_stops(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    kafka_bootstrap: str,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row is marked only after the broker confirmed it: refused rows stay `pending` and free (a
    later replay takes them at once: the claims of chunks sent end with their marks, those taken but
    not sent with the lease), and once a chunk came back with nothing delivered no further chunk is
    taken beyond those already in the window."""
    settings = make_settings()
    seed_unregistered_readings(producer, topic, settings, 40)
    monkeypatch.setattr(replay_module, "CHUNK", 2)
    tiny = f"{topic}-tiny"
    k.create_topic(kafka_bootstrap, tiny, partitions=1, config={"max.message.bytes": "64"})
    service, pool = build_service(settings)
    try:
        refused = service.replay(DLQFilter(), actor="test", to_topic=tiny)
        assert refused.published == 0
        assert 2 <= refused.failed <= 2 * replay_module.WINDOW < 40  # it stopped
        assert statuses(db) == {"pending": 40}
        assert service.replay(DLQFilter(), actor="test").published == 40  # every row free again
    finally:
        pool.close()
    assert statuses(db) == {"replayed": 40}


def test_the_audit_rows_of_a_replay_name_the_request_that_started_it(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    """The marks, and their audit rows, are written on threads of their own: the request's context
    (its id and client, bound in the log context) goes with them."""
    settings = make_settings()
    seed_unregistered_readings(producer, topic, settings, 3)
    service, pool = build_service(settings)
    try:
        with structlog.contextvars.bound_contextvars(request_id="req-7", client="10.0.0.7"):
            assert service.replay(DLQFilter(), actor="test").published == 3
    finally:
        pool.close()
    audit = db.execute("SELECT action, request_id, client FROM dlq_audit").fetchall()
    assert audit == [("replay", "req-7", "10.0.0.7")]

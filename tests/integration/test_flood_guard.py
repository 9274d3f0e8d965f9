"""The flood guard against the real broker and PostgreSQL: a systemic failure holds the line after a
bounded number of DLQ rows and closes by itself once fixed; isolated poison never trips it; a kill -9
and a rebalance while it is open lose nothing and flood nothing."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from eventhandler.config import Settings
from eventhandler.events import origin_header
from eventhandler.metrics import Metrics
from tests.conftest import settings_env, unique
from tests.support import kafka as k
from tests.support.flood import (
    DEVICES,
    MIN_FAILURES,
    READINGS_EACH,
    TOTAL,
    register_the_devices,
    send_readings_for_unregistered_devices,
)
from tests.support.poison import POISON
from tests.support.waiting import wait_for
from tests.support.worker import kill9, run_until_idle, scalar, spawn_worker, threaded_worker


def dlq_rows(db: psycopg.Connection[Any]) -> int:
    return int(scalar(db, "SELECT count(*) FROM dlq"))


def applied(db: psycopg.Connection[Any]) -> int:
    return int(scalar(db, "SELECT coalesce(sum(reading_count), 0) FROM devices"))


def circuit(db: psycopg.Connection[Any]) -> dict[str, Any] | None:
    row = db.execute("SELECT fingerprint, state, closed_by, trials, failures FROM flood_circuit").fetchall()
    assert len(row) <= 1, row
    if not row:
        return None
    fingerprint, state, closed_by, trials, failures = row[0]
    return {
        "fingerprint": fingerprint,
        "state": state,
        "closed_by": closed_by,
        "trials": trials,
        "failures": failures,
    }


def is_open(db: psycopg.Connection[Any]) -> bool:
    found = circuit(db)
    return found is not None and found["state"] == "open"


def gauge(metrics: Metrics, consumer: str, fingerprint: str) -> float | None:
    return metrics.registry.get_sample_value(
        "eventhandler_circuit_open", {"consumer": consumer, "fingerprint": fingerprint}
    )


def test_a_systemic_failure_holds_the_line_after_a_few_rows_and_the_circuit_closes_once_fixed(
    make_settings: Callable[..., Settings], kafka_bootstrap: str, topic: str, db: psycopg.Connection[Any]
) -> None:
    send_readings_for_unregistered_devices(kafka_bootstrap, topic)
    settings = make_settings(batch_max_messages=20, flood_probe_seconds=1.0)
    metrics = Metrics()
    with threaded_worker(settings, metrics=metrics) as worker:
        wait_for(lambda: is_open(db), timeout=60, message="the circuit opens")
        held_rows = dlq_rows(db)
        assert held_rows < MIN_FAILURES  # bounded: not the whole stream
        wait_for(lambda: (circuit(db) or {}).get("trials", 0) >= 3, timeout=30, message="trials")
        assert dlq_rows(db) == held_rows  # held: the trials dead-letter nothing
        assert applied(db) == 0
        fingerprint = circuit(db)["fingerprint"]  # type: ignore[index]
        assert gauge(metrics, settings.consumer_group, fingerprint) == 1
        ready, detail = worker.app.worker.is_ready()
        assert not ready
        assert "flood guard" in detail["batch"]

        register_the_devices(db)

        wait_for(lambda: applied(db) + held_rows == TOTAL, timeout=60, message="every reading applied")
        closed = circuit(db)
        assert closed is not None
        assert closed["state"] == "closed"
        assert closed["closed_by"] == worker.app.worker.labels["worker_id"]
        wait_for(
            lambda: gauge(metrics, settings.consumer_group, fingerprint) == 0, timeout=10, message="gauge"
        )
    # each reading took effect once: applied, or one pending row from before the circuit opened
    assert dlq_rows(db) == held_rows
    assert scalar(db, "SELECT count(*) FROM dlq WHERE status = 'pending'") == held_rows


@pytest.mark.parametrize("named", ["no row", "an open row"])
def test_replay_headers_copied_or_forged_do_not_hide_a_flood(
    named: str,
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
) -> None:
    """Failed replays are not judged; a message whose replay headers were copied from a real replay (a
    bridge that keeps headers) or forged was taken for one, so such a stream was dead-lettered whole."""
    producer = k.TestProducer(kafka_bootstrap)
    settings = make_settings(batch_max_messages=20, flood_probe_seconds=1.0)
    copied = origin_header(424_242, topic, 0, 7)
    if named == "an open row":
        producer.send(topic, b"not json at all", partition=0)
        producer.flush()
        run_until_idle(settings, idle=1)
        ((dlq_id, offset),) = db.execute("SELECT dlq_id, source_offset FROM dlq").fetchall()
        copied = origin_header(dlq_id, topic, 0, offset)
    for n in range(READINGS_EACH):
        for d in range(DEVICES):
            event = k.reading(f"flood-{d}", value=n)
            producer.send(topic, k.structured(event), key=f"flood-{d}", headers=copied)
    producer.flush()
    with threaded_worker(settings):
        wait_for(lambda: is_open(db), timeout=60, message="the circuit opens")
    assert dlq_rows(db) < MIN_FAILURES + 1


@pytest.mark.parametrize("every", [100, 10], ids=["1%", "10%"])
def test_the_whole_poison_corpus_mixed_into_a_healthy_stream_never_trips_it(
    every: int,
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    db: psycopg.Connection[Any],
) -> None:
    topic = unique("corpus").replace("_", "-")  # one that takes the corpus's 1 MiB message
    k.create_topic(kafka_bootstrap, topic, partitions=4, config={"max.message.bytes": str(4 * 1024 * 1024)})
    producer = k.TestProducer(kafka_bootstrap, **{"message.max.bytes": 4 * 1024 * 1024})
    devices = [f"dev-{d}" for d in range(40)]
    producer.send_events(topic, [k.registered(d) for d in devices])
    good = poison = 0
    for n in range(1, 3001):
        if n % every == 0:
            name, value, headers, _, _ = POISON[poison % len(POISON)]
            if name != "one_mib" or every == 100:  # the 1 MiB message once in a while, not 30 times
                producer.send(topic, value, key=f"poison-{n}".encode(), headers=headers)
                poison += 1
        else:
            producer.send_events(topic, [k.reading(devices[n % len(devices)], value=n)])
            good += 1
    producer.flush()

    stats = run_until_idle(make_settings(topics=[topic], batch_max_messages=200), idle=3)

    assert scalar(db, "SELECT count(*) FROM flood_circuit") == 0
    assert stats.retries == 0
    assert dlq_rows(db) == poison
    assert applied(db) == good


@pytest.mark.slow
def test_a_kill_9_and_a_rebalance_while_the_circuit_is_open_lose_nothing_and_flood_nothing(
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    tmp_path: Any,
    spawned: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    send_readings_for_unregistered_devices(kafka_bootstrap, topic)
    env = settings_env(make_settings(batch_max_messages=20, flood_probe_seconds=1.0))
    first = spawned(spawn_worker(env, log_path=str(tmp_path / "first.log")))
    wait_for(lambda: is_open(db), timeout=60, message="the circuit opens")
    held_rows = dlq_rows(db)
    assert held_rows < MIN_FAILURES
    kill9(first)

    # Two workers start where the first stopped, joining one after the other (a rebalance). Each
    # judges its own stream again: before it holds too, fewer than MIN_FAILURES more rows.
    second = spawned(spawn_worker(env, log_path=str(tmp_path / "second.log")))
    wait_for(lambda: (circuit(db) or {}).get("trials", 0) >= 3, timeout=60, message="held after restart")
    third_log = tmp_path / "third.log"
    third = spawned(spawn_worker(env, log_path=str(third_log)))
    wait_for(lambda: b"partitions_assigned" in third_log.read_bytes(), timeout=60, message="third joined")
    trials = circuit(db)["trials"]  # type: ignore[index]
    wait_for(lambda: circuit(db)["trials"] >= trials + 6, timeout=60, message="held")  # type: ignore[index]
    rows = dlq_rows(db)
    assert rows < held_rows + 2 * MIN_FAILURES  # bounded by the workers that started, not the stream
    assert is_open(db)
    assert applied(db) == 0

    register_the_devices(db)

    # each reading took effect once: applied, or in the one DLQ row it got before its worker held
    # (a worker whose held partitions were revoked and assigned back must not keep them paused)
    wait_for(lambda: applied(db) + dlq_rows(db) == TOTAL, timeout=90, message="every reading applied")
    wait_for(lambda: not is_open(db), timeout=30, message="the circuit closes")
    assert dlq_rows(db) < held_rows + 2 * MIN_FAILURES
    assert scalar(db, "SELECT count(DISTINCT (source_partition, source_offset)) FROM dlq") == dlq_rows(db)
    for worker in (second, third):
        assert worker.poll() is None  # still running: holding was never a crash

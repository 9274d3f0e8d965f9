"""`eventhandler replay --canary`: the first rows alone, the workers' outcomes awaited, and the rest
only if enough of them resolved — against a running worker, a real broker and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from eventhandler.config import Settings
from tests.conftest import settings_env
from tests.support import kafka as k
from tests.support.cli import run_cli
from tests.support.worker import run_until_idle, threaded_worker

CANARY_STOPPED = 4


@pytest.fixture
def producer(kafka_bootstrap: str) -> k.TestProducer:
    return k.TestProducer(kafka_bootstrap)


def replay_counts(db: psycopg.Connection[Any], device: str) -> list[tuple[str, int]]:
    return db.execute(
        "SELECT status, replay_count FROM dlq WHERE convert_from(event_payload, 'UTF8') LIKE %s ORDER BY dlq_id",
        [f"%{device}%"],
    ).fetchall()


def test_a_canary_stops_when_the_fix_is_incomplete_and_lets_the_rest_through_when_it_is_not(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    settings = make_settings()
    env = settings_env(settings)
    for device in ("dev-a", "dev-b"):  # dev-a's rows first: the oldest, so the canary's
        producer.send_events(topic, [k.reading(device, value=i) for i in range(5)])
        producer.flush()
        run_until_idle(settings, idle=2)
    assert db.execute("SELECT count(*) FROM dlq WHERE status = 'pending'").fetchone() == (10,)

    # The fix is incomplete: only dev-b registers. The canary (dev-a's first two rows) fails again.
    producer.send_events(topic, [k.registered("dev-b")])
    producer.flush()
    with threaded_worker(settings):
        stopped = run_cli(env, "replay", "--canary", "2", "--canary-timeout", "60", "--yes", "--json")
    assert stopped.returncode == CANARY_STOPPED, stopped.stderr
    report = json.loads(stopped.stdout)
    assert report["stopped"] is True
    assert report["canary"]["passed"] is False
    assert report["canary"]["outcomes"] == {"resolved": 0, "failed": 2, "waiting": 0, "not_published": 0}
    assert (report["matched"], report["published"]) == (10, 2)
    assert replay_counts(db, "dev-a") == [("pending", 1)] * 2 + [("pending", 0)] * 3
    assert replay_counts(db, "dev-b") == [("pending", 0)] * 5  # never published, though they would pass

    # The fix is complete: the canary (20 %: two rows) resolves, and the rest goes.
    producer.send_events(topic, [k.registered("dev-a")])
    producer.flush()
    with threaded_worker(settings):
        passed = run_cli(env, "replay", "--canary", "20%", "--yes", "--json")
        assert passed.returncode == 0, passed.stderr
    report = json.loads(passed.stdout)
    assert report["canary"]["passed"] is True
    assert report["canary"]["rows"] == 2
    assert report["canary"]["outcomes"]["resolved"] == 2
    assert report["published"] == 10
    assert set(report["outcomes"]) == {"resolved", "failed", "waiting", "not_published"}
    run_until_idle(settings, idle=2)
    assert db.execute("SELECT status, count(*) FROM dlq GROUP BY status").fetchall() == [("resolved", 10)]
    verdicts = db.execute(
        "SELECT detail->'passed', cardinality(dlq_ids) FROM dlq_audit WHERE action = 'canary' ORDER BY audit_id"
    ).fetchall()
    assert verdicts == [(False, 2), (True, 2)]

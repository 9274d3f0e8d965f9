"""`eventhandler circuit …` as an operator runs it while a real worker holds the line: the circuit is
listed with what judged it, and closing it makes the workers dead-letter that failure after all."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import psycopg

from eventhandler.config import Settings
from tests.conftest import settings_env
from tests.support.cli import cli_json, run_cli
from tests.support.flood import MIN_FAILURES, TOTAL, send_readings_for_unregistered_devices
from tests.support.waiting import wait_for
from tests.support.worker import scalar, spawn_worker


def test_an_operator_closes_a_circuit_and_the_workers_dead_letter_that_failure(
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    tmp_path: Any,
    spawned: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    send_readings_for_unregistered_devices(kafka_bootstrap, topic)
    settings = make_settings(batch_max_messages=20, flood_probe_seconds=1.0)
    env = settings_env(settings)
    spawned(spawn_worker(env, log_path=str(tmp_path / "worker.log")))
    wait_for(
        lambda: scalar(db, "SELECT count(*) FROM flood_circuit WHERE state = 'open'") == 1,
        timeout=60,
        message="the circuit opens",
    )
    held = scalar(db, "SELECT count(*) FROM dlq")
    assert held < MIN_FAILURES

    (listed,) = cli_json(env, "circuit", "list")
    assert listed["state"] == "open"
    assert listed["consumer"] == settings.consumer_group
    assert listed["stage"] == "handler"
    assert "is not registered" in listed["error_message"]
    assert listed["event_types"] == ["device.reading"]
    table = run_cli(env, "circuit", "list")
    assert table.returncode == 0
    assert listed["fingerprint"] in table.stdout
    assert "1 open, 0 closed" in table.stdout
    stats = cli_json(env, "dlq", "stats")
    assert [c["fingerprint"] for c in stats["circuits"]] == [listed["fingerprint"]]
    assert "flood guard circuits" in run_cli(env, "dlq", "stats").stdout

    unknown = run_cli(env, "circuit", "close", "ffffffffffffffff")
    assert unknown.returncode == 1
    assert "no circuit with fingerprint ffffffffffffffff" in unknown.stderr
    bad = run_cli(env, "circuit", "close", listed["fingerprint"], "--for", "soon")
    assert bad.returncode == 2
    assert "--for" in bad.stderr
    assert scalar(db, "SELECT count(*) FROM dlq_audit") == 0

    closed = cli_json(
        env, "circuit", "close", listed["fingerprint"], "--for", "2h", "--note", "bad batch", "--actor", "ops"
    )
    assert closed["state"] == "closed"
    assert closed["closed_by"] == "ops"
    assert closed["dead_letter_until"] is not None

    # the worker reads the close at its next trial and dead-letters the stream, as the operator chose
    wait_for(lambda: scalar(db, "SELECT count(*) FROM dlq") == TOTAL, timeout=60, message="dead-lettered")
    assert scalar(db, "SELECT coalesce(sum(reading_count), 0) FROM devices") == 0
    assert scalar(db, "SELECT state FROM flood_circuit") == "closed"
    actor, action, client = db.execute("SELECT actor, action, client FROM dlq_audit").fetchone()  # type: ignore[misc]
    assert (actor, action) == ("ops", "close_circuit")
    assert client.startswith("cli:")

"""`eventhandler dlq …` as an operator runs it, against a real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool
import pytest

from eventhandler.config import Settings
from eventhandler.models import DLQFilter
from tests.conftest import settings_env
from tests.support.cli import cli_json, run_cli
from tests.support.dlq import DLQ
from tests.support.factories import failed_message


@pytest.fixture
def env(make_settings: Callable[..., Settings]) -> dict[str, str]:
    return settings_env(make_settings())


@pytest.fixture
def seeded(db_url: str, group: str) -> list[int]:
    """Five rows: three alike handler failures, a non-UTF-8 deserialize failure, a JSON one."""
    failures = [
        *[
            failed_message(consumer=group, offset=i, error_message=f"device 'd{i}' is not registered")
            for i in range(3)
        ],
        failed_message(
            consumer=group,
            offset=10,
            stage="deserialize",
            error_type="DeserializationError",
            error_message="message value is not valid UTF-8",
            value=b"\xff\x00\xfe",
            event_type=None,
        ),
        failed_message(
            consumer=group,
            offset=11,
            stage="projection",
            error_type="ProjectionFailure",
            error_message="value too long",
            value=b'{"specversion": "1.0", "id": "x"}',
        ),
    ]
    with (
        psycopg_pool.ConnectionPool(db_url, min_size=1, max_size=1) as pool,
        pool.connection() as conn,
        conn.transaction(),
    ):
        return DLQ.on(pool).writer.record_failures(conn, failures)


def test_list_as_json_and_as_a_table(env: dict[str, str], seeded: list[int]) -> None:
    listed = cli_json(env, "dlq", "list", "--limit", "2")
    assert listed["total"] == 5
    assert [r["dlq_id"] for r in listed["items"]] == seeded[:2]
    assert listed["next_after"] == seeded[1]
    page_two = cli_json(env, "dlq", "list", "--limit", "10", "--after", str(seeded[1]))
    assert [r["dlq_id"] for r in page_two["items"]] == seeded[2:]
    table = run_cli(env, "dlq", "list", "--stage", "handler")
    assert table.returncode == 0
    assert "not registered" in table.stdout
    assert "3 of 3 matching rows" in table.stdout


def test_show_renders_json_payloads_as_json_and_bytes_escaped(env: dict[str, str], seeded: list[int]) -> None:
    binary = cli_json(env, "dlq", "show", str(seeded[3]))
    assert binary["payload"] == {"kind": "bytes", "text": "\\xff\\x00\\xfe"}
    assert binary["stage"] == "deserialize"
    assert binary["error_traceback"].startswith("Traceback")
    as_json = cli_json(env, "dlq", "show", str(seeded[4]))
    assert as_json["payload"]["kind"] == "json"
    assert json.loads(as_json["payload"]["text"]) == {"specversion": "1.0", "id": "x"}
    text = run_cli(env, "dlq", "show", str(seeded[4]))
    assert text.returncode == 0
    for part in ("ProjectionFailure", "value too long", "headers", "ce_type", '"specversion": "1.0"'):
        assert part in text.stdout


def test_stats_shows_depth_and_error_groups(env: dict[str, str], seeded: list[int], group: str) -> None:
    stats = cli_json(env, "dlq", "stats")
    assert stats["total"] == 5
    assert stats["by_status"] == {"pending": 5}
    assert {(r["stage"], r["count"]) for r in stats["by_stage"]} == {
        ("handler", 3),
        ("deserialize", 1),
        ("projection", 1),
    }
    assert stats["top_groups"][0]["count"] == 3
    assert group in stats["oldest_pending_age_seconds"]
    table = run_cli(env, "dlq", "stats")
    assert table.returncode == 0
    assert "top error groups" in table.stdout


def test_resolve_discard_delete_and_purge_are_audited(
    env: dict[str, str], seeded: list[int], db: psycopg.Connection[Any]
) -> None:
    resolved = cli_json(env, "dlq", "resolve", str(seeded[0]), "--note", "fixed upstream", "--actor", "alice")
    assert resolved["changed"] == [seeded[0]]
    assert cli_json(env, "dlq", "discard", str(seeded[1]), "--actor", "bob")["changed"] == [seeded[1]]
    assert cli_json(env, "dlq", "delete", str(seeded[2]), "--actor", "carol")["changed"] == [seeded[2]]
    again = cli_json(env, "dlq", "resolve", str(seeded[1]))
    assert again == {"action": "resolve", "changed": [], "unchanged": [seeded[1]], "being_replayed": []}
    db.execute("UPDATE dlq SET updated_at = now() - interval '40 days'")
    purged = cli_json(env, "dlq", "purge", "--older-than", "30d", "--yes")
    assert sorted(purged["ids"]) == seeded[:2]
    remaining = {r[0]: r[1] for r in db.execute("SELECT dlq_id, status FROM dlq")}
    assert remaining == {seeded[3]: "pending", seeded[4]: "pending"}
    actions = db.execute("SELECT actor, action FROM dlq_audit ORDER BY audit_id").fetchall()
    assert actions[:3] == [("alice", "resolve"), ("bob", "discarded"), ("carol", "delete")]
    assert actions[-1][1] == "purge"
    # every row names the CLI run it came from and where it ran; the no-op resolve wrote none
    contexts = db.execute("SELECT request_id, client FROM dlq_audit ORDER BY audit_id").fetchall()
    assert len(contexts) == 4
    assert len({request_id for request_id, _ in contexts}) == 4
    assert all(client.startswith("cli:") and "@" in client for _, client in contexts)


def test_a_row_a_replay_is_publishing_is_left_alone_and_said_so(
    env: dict[str, str], seeded: list[int], db_url: str, db: psycopg.Connection[Any]
) -> None:
    """The replay's mark would keep the operator's status on a row whose copy the worker then applies."""
    with psycopg_pool.ConnectionPool(db_url, min_size=1, max_size=2) as pool:
        replays = DLQ.on(pool).replays
        with replays.lease() as lease:
            _, claim = replays.take(DLQFilter(ids=(seeded[0],)), limit=1, lease=lease, lease_seconds=60)
            assert claim is not None
            held = cli_json(env, "dlq", "discard", str(seeded[0]), str(seeded[1]))
            said = run_cli(env, "dlq", "resolve", str(seeded[0]), str(seeded[1]))
            replays.finish(lease=lease, claim=claim, published={}, actor="t", detail={})
    assert held == {
        "action": "discard",
        "changed": [seeded[1]],
        "unchanged": [seeded[0]],
        "being_replayed": [seeded[0]],
    }
    assert said.returncode == 0, said.stderr
    assert f"unchanged (being replayed; try again once it is marked): {seeded[0]}" in said.stdout
    assert f"unchanged (already resolved or discarded): {seeded[1]}" in said.stdout
    statuses = dict(
        db.execute("SELECT dlq_id, status FROM dlq WHERE dlq_id = ANY(%s)", [seeded[:2]]).fetchall()
    )
    assert statuses == {seeded[0]: "pending", seeded[1]: "discarded"}
    db.execute("UPDATE dlq SET status = 'parked', blocked_by = %s WHERE dlq_id = %s", (seeded[0], seeded[2]))
    parked = run_cli(env, "dlq", "resolve", str(seeded[2]))
    assert f"unchanged (parked behind an open failure of its key): {seeded[2]}" in parked.stdout


def test_acting_on_many_rows_asks_first(
    env: dict[str, str], seeded: list[int], db: psycopg.Connection[Any]
) -> None:
    many = [str(i) for i in seeded] * 3  # more than the confirmation threshold
    result = run_cli(env, "dlq", "discard", *many)
    assert result.returncode == 1
    assert "refusing to discard 15 rows without --yes" in result.stderr
    assert db.execute("SELECT count(*) FROM dlq WHERE status = 'discarded'").fetchone() == (0,)
    purge = run_cli(env, "dlq", "purge")
    assert purge.returncode == 1
    assert "without --yes" in purge.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["dlq", "list", "--stage", "nope"],
            "error: --stage must be one of deserialize, handler, projection",
        ),
        (
            ["dlq", "list", "--status", "gone"],
            "error: --status must be one of pending, replayed, resolved, discarded",
        ),
        (["dlq", "list", "--since", "last tuesday"], "error: --since/--until: 'last tuesday' is neither"),
        (["replay", "--until", "soon", "--dry-run"], "error: --since/--until:"),
        (["dlq", "purge", "--older-than", "forever", "--yes"], "error: --older-than:"),
        (["dlq", "show", "999999"], "error: no DLQ row with id 999999"),
        (["dlq", "resolve", "999999"], "error: no DLQ row with id 999999"),
        (["replay", "--id", "999999", "--yes"], "error: no DLQ row with id 999999"),
    ],
)
def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(
    env: dict[str, str], seeded: list[int], args: list[str], message: str
) -> None:
    result = run_cli(env, *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message)


def test_an_unreachable_database_or_broker_gives_one_line(env: dict[str, str], seeded: list[int]) -> None:
    no_db = env | {
        "EVENTHANDLER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
        "EVENTHANDLER_DB_CONNECT_TIMEOUT_SECONDS": "1",
    }
    result = run_cli(no_db, "dlq", "list")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    no_kafka = env | {"EVENTHANDLER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    result = run_cli(no_kafka, "replay", "--yes")
    assert result.returncode == 1
    assert "error: cannot reach Kafka at 127.0.0.1:1" in result.stderr

"""`eventhandler dlq edit`: a repair kept beside the original bytes, replayed, applied exactly once."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from eventhandler.config import Settings
from tests.conftest import settings_env
from tests.support import kafka as k
from tests.support.cli import cli_json, run_cli
from tests.support.worker import run_until_idle, scalar


@pytest.fixture
def producer(kafka_bootstrap: str) -> k.TestProducer:
    return k.TestProducer(kafka_bootstrap)


def a_misaddressed_reading(
    settings: Settings, producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> tuple[int, bytes]:
    """A reading sent to a device id with a typo: one pending row. Returns its id and its bytes."""
    producer.send_events(topic, [k.registered("pump-7")])
    producer.send(topic, k.structured(k.reading("pmup-7", value=3.5)), key="pump-7")
    producer.flush()
    run_until_idle(settings, idle=2)
    dlq_id, payload = db.execute("SELECT dlq_id, event_payload FROM dlq").fetchone() or (0, b"")
    return dlq_id, bytes(payload)


def test_a_repair_is_replayed_applied_once_and_the_original_bytes_stay(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    settings = make_settings()
    env = settings_env(settings)
    dlq_id, original = a_misaddressed_reading(settings, producer, topic, db)

    # Refused, nothing stored: a value the deserializer rejects, a changed event id, a closed row's edit.
    for bad, why in [
        ('data.value="warm"', "does not deserialize"),
        ("id=another-id", "may not change the event's id"),
    ]:
        refused = run_cli(env, "dlq", "edit", str(dlq_id), "--set", bad)
        assert refused.returncode == 1
        assert why in refused.stderr
    assert scalar(db, "SELECT edited_payload FROM dlq") is None

    shown = cli_json(env, "dlq", "edit", str(dlq_id), "--set", "data.device_id=pump-7", "--note", "typo")
    assert shown["edit_diff"] == [{"op": "replace", "path": "/data/device_id", "value": "pump-7"}]
    assert json.loads(shown["edited_payload"]["text"])["data"]["device_id"] == "pump-7"
    assert json.loads(shown["payload"]["text"])["data"]["device_id"] == "pmup-7"

    text = run_cli(env, "dlq", "show", str(dlq_id))
    assert "repaired payload" in text.stdout
    assert 'replace /data/device_id "pump-7"' in text.stdout
    actor, action, ids, detail = (
        db.execute("SELECT actor, action, dlq_ids, detail FROM dlq_audit").fetchone() or ()
    )
    assert (action, ids) == ("edit", [dlq_id])
    assert actor.startswith("cli:")
    assert detail["diff"] == shown["edit_diff"]
    assert detail["note"] == "typo"

    # A simulation of the repair predicts what the replay then does.
    simulated = run_cli(env, "replay", "--simulate", "--id", str(dlq_id), "--json")
    assert json.loads(simulated.stdout)["outcomes"]["apply"] == 1

    assert cli_json(env, "replay", "--id", str(dlq_id), "--yes")["published"] == 1
    run_until_idle(settings, idle=2)
    assert scalar(db, "SELECT status FROM dlq") == "resolved"
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'pump-7'") == 1
    assert bytes(scalar(db, "SELECT event_payload FROM dlq")) == original

    # Replayed again (force): the ledger knows the event by its id, so it does not apply twice.
    assert cli_json(env, "replay", "--id", str(dlq_id), "--force", "--status", "resolved", "--yes")[
        "published"
    ]
    run_until_idle(settings, idle=2)
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'pump-7'") == 1


def test_a_repair_by_patch_file_or_in_the_editor_and_only_of_a_pending_row(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    db: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    settings = make_settings()
    env = settings_env(settings)
    dlq_id, _ = a_misaddressed_reading(settings, producer, topic, db)

    patch = tmp_path / "fix.json"
    patch.write_text(json.dumps([{"op": "replace", "path": "/data/value", "value": 4.5}]))
    by_patch = cli_json(env, "dlq", "edit", str(dlq_id), "--patch", str(patch))
    assert by_patch["edit_diff"] == [{"op": "replace", "path": "/data/value", "value": 4.5}]

    # The editor opens the current repair: this one renames the device on top of the patch.
    editor = tmp_path / "editor.py"
    editor.write_text(
        "import sys\n"
        "path = sys.argv[1]\n"
        "text = open(path).read()\n"
        "open(path, 'w').write(text.replace('pmup-7', 'pump-7'))\n"
    )
    in_editor = cli_json(env | {"EDITOR": f"{sys.executable} {editor}"}, "dlq", "edit", str(dlq_id))
    assert sorted(op["path"] for op in in_editor["edit_diff"]) == ["/data/device_id", "/data/value"]
    assert [a for (a,) in db.execute("SELECT action FROM dlq_audit ORDER BY audit_id")] == ["edit", "edit"]

    run_cli(env, "dlq", "resolve", str(dlq_id), "--yes")
    closed = run_cli(env, "dlq", "edit", str(dlq_id), "--set", "data.value=1")
    assert closed.returncode == 1
    assert "only a pending row can be edited" in closed.stderr

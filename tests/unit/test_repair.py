"""Repair's document work, without services: assignments, patches and the diff views show."""

from __future__ import annotations

import json

import pytest

from eventhandler import repair
from eventhandler.errors import InvalidOperation
from eventhandler.models import DLQEntry
from eventhandler.redaction import Redactor
from tests.support.factories import failed_message

EVENT = {
    "id": "e-1",
    "source": "/s",
    "data": {"device_id": "pmup-7", "tags": ["a", "b"], "password": "hunter22"},
}


def test_assignments_replace_what_is_there_add_what_is_not_and_index_lists() -> None:
    operations = repair.parse_assignments(
        ["data.device_id=pump-7", "data.tags.1=c", "data.value=21.5", 'data.unit="C"', "data.note=plain text"]
    )
    result = json.loads(repair.patched(json.dumps(EVENT).encode(), operations))
    assert result["data"] == {
        "device_id": "pump-7",
        "tags": ["a", "c"],  # replaced, not inserted
        "password": "hunter22",
        "value": 21.5,
        "unit": "C",
        "note": "plain text",
    }


@pytest.mark.parametrize("assignment", ["novalue", "=1", " =1"])
def test_an_assignment_without_a_path_or_value_is_refused(assignment: str) -> None:
    with pytest.raises(InvalidOperation, match="path=value"):
        repair.parse_assignments([assignment])


@pytest.mark.parametrize(
    ("raw", "operations", "message"),
    [
        (b"\xff not json", [{"op": "add", "path": "/a", "value": 1}], "not JSON"),
        (None, [{"op": "add", "path": "/a", "value": 1}], "tombstone"),
        (b"{}", [{"op": "replace", "path": "/missing/deep", "value": 1}], "does not apply"),
        (b"{}", [{"op": "bogus", "path": "/a"}], "does not apply"),
        (b"{}", [{"path": "/a"}], "does not apply"),
        (b"{}", [{"op": "test", "path": "", "value": {"x": 1}}], "does not apply"),
    ],
)
def test_a_patch_that_does_not_apply_is_refused_with_why(
    raw: bytes | None, operations: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(InvalidOperation, match=message):
        repair.patched(raw, operations)


def test_the_diff_views_show_masks_a_redacted_fields_change() -> None:
    original = json.dumps(EVENT).encode()
    edited = repair.patched(
        original,
        [
            {"op": "replace", "path": "/data/password", "value": "s3cret99"},
            {"op": "add", "path": "/data/x", "value": 1},
        ],
    )
    failure = failed_message(value=original, headers=[])
    entry = DLQEntry.model_validate(
        {
            "dlq_id": 1,
            "consumer": failure.consumer,
            "event_id": "e-1",
            "event_type": "device.reading",
            "source_topic": "t",
            "source_partition": 0,
            "source_offset": 1,
            "stage": "handler",
            "error_type": "E",
            "error_message": "m",
            "fingerprint": "0" * 16,
            "status": "pending",
            "retry_count": 0,
            "failure_count": 1,
            "replay_count": 0,
            "failed_at": "2026-01-01T00:00:00Z",
            "last_failed_at": "2026-01-01T00:00:00Z",
            "last_replayed_at": None,
            "resolved_at": None,
            "payload_size": len(original),
            "event_source": "/s",
            "event_payload": original,
            "message_key": None,
            "headers": [],
            "message_timestamp": None,
            "error_traceback": None,
            "replayed_to_topic": None,
            "resolved_by": None,
            "resolution_note": None,
            "worker_version": "test",
            "updated_at": "2026-01-01T00:00:00Z",
            "edited_payload": edited,
        }
    )
    redacted = Redactor(["data.password"]).view(entry)
    assert sorted(redacted.diff or [], key=lambda op: op["path"]) == [
        {"op": "replace", "path": "/data/password", "value": "***"},
        {"op": "add", "path": "/data/x", "value": 1},
    ]
    assert b"s3cret99" not in (redacted.entry.edited_payload or b"")
    plain = Redactor([]).view(entry)
    assert {"op": "replace", "path": "/data/password", "value": "s3cret99"} in (plain.diff or [])

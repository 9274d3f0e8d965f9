"""Repair's document work, without services: assignments, patches and the diff views show."""

from __future__ import annotations

import json

import pytest

from eventhandler import repair
from eventhandler.errors import InvalidOperation
from eventhandler.events import Deserializer
from eventhandler.handlers.loading import load_registry
from eventhandler.models import DLQEntry
from eventhandler.redaction import Redactor
from tests.unit.test_redaction import entry

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


def row(original: bytes, edited: bytes | None, **overrides: object) -> DLQEntry:
    """A pending row with `original` as its payload and `edited` as its repair."""
    return entry(original, edited_payload=edited, **overrides)


def test_the_diff_views_show_masks_a_redacted_fields_change() -> None:
    original = json.dumps(EVENT).encode()
    edited = repair.patched(
        original,
        [
            {"op": "replace", "path": "/data/password", "value": "s3cret99"},
            {"op": "add", "path": "/data/x", "value": 1},
        ],
    )
    entry = row(original, edited)
    redacted = Redactor(["data.password"]).view(entry)
    assert sorted(redacted.diff or [], key=lambda op: op["path"]) == [
        {"op": "replace", "path": "/data/password", "value": "***"},
        {"op": "add", "path": "/data/x", "value": 1},
    ]
    assert b"s3cret99" not in (redacted.entry.edited_payload or b"")
    plain = Redactor([]).view(entry)
    assert {"op": "replace", "path": "/data/password", "value": "s3cret99"} in (plain.diff or [])


def test_a_masked_value_moved_to_another_field_stays_masked_in_the_repair_and_the_diff() -> None:
    original = json.dumps(EVENT).encode()
    edited = repair.patched(original, [{"op": "move", "from": "/data/password", "path": "/data/note"}])
    view = Redactor(["data.password"]).view(row(original, edited))
    shown = json.dumps([view.edited.document if view.edited else None, view.diff])
    assert "hunter22" not in shown
    assert b"hunter22" not in (view.entry.edited_payload or b"")
    assert {"op": "add", "path": "/data/note", "value": "***"} in (view.diff or [])


def test_a_masked_value_used_as_a_key_is_masked_in_the_diffs_paths() -> None:
    document = {"id": "e-1", "data": {"token": "hunter22", "sessions": {"hunter22": {"n": 1}}}}
    original = json.dumps(document).encode()
    edited = repair.patched(original, [{"op": "replace", "path": "/data/sessions/hunter22/n", "value": 2}])
    view = Redactor(["data.token"]).view(row(original, edited))
    assert "hunter22" not in json.dumps(view.diff)


def test_a_list_row_masks_what_its_repair_masks_when_the_error_quotes_it() -> None:
    """The replayed repair failed, quoting its (masked) value: the list and the groups mask it too."""
    original = json.dumps(EVENT).encode()
    edited = repair.patched(original, [{"op": "replace", "path": "/data/password", "value": "s3cret99"}])
    entry = row(original, edited, error_message="password 's3cret99' was refused")
    redactor = Redactor(["data.password"])
    assert "s3cret99" not in redactor.summary(entry, entry).error_message
    assert "s3cret99" not in redactor.entry_text(entry, entry.error_message)


def test_the_diff_of_a_large_list_is_one_walk_and_bounded() -> None:
    items = list(range(42_000))
    original = json.dumps({"id": "e-1", "data": {"items": items}}).encode()
    edited = json.dumps({"id": "e-1", "data": {"items": items[::-1]}}).encode()
    diff = repair.shown_diff(
        (json.loads(original), json.loads(edited)), (json.loads(original), json.loads(edited)), "***", str
    )
    assert len(diff) == repair.MAX_DIFF_OPERATIONS
    assert repair.diff([1, 2], [1, 2, 3]) == [{"op": "replace", "path": "", "value": [1, 2, 3]}]
    assert repair.diff({"a": 1}, {"a": True}) == [{"op": "replace", "path": "/a", "value": True}]


def test_copies_of_copies_are_refused_before_they_grow_the_payload_past_its_bound() -> None:
    operations = []
    for i in range(40):
        operations += [
            {"op": "copy", "from": "/a", "path": f"/b/{i}"},
            {"op": "copy", "from": "/b", "path": f"/a/{i}"},
        ]
    with pytest.raises(InvalidOperation, match="larger than"):
        repair.patched(json.dumps({"a": {"x": "y" * 1000}, "b": {}}).encode(), operations)


@pytest.mark.parametrize(
    "operation",
    [
        {"op": "add", "path": "/data/nope/deep", "value": 1},
        {"op": "test", "path": "/data/password", "value": "guess"},
    ],
)
def test_a_patch_error_never_quotes_the_payload(operation: dict[str, object]) -> None:
    with pytest.raises(InvalidOperation) as refused:
        repair.patched(json.dumps(EVENT).encode(), [operation])
    assert "hunter22" not in str(refused.value)


def test_a_test_operation_is_refused_while_fields_are_redacted() -> None:
    operation = {"op": "test", "path": "/data/password", "value": "hunter22"}
    assert repair.patched(json.dumps(EVENT).encode(), [operation]) == repair.encode(EVENT)
    with pytest.raises(InvalidOperation, match="confirm a guessed value"):
        repair.patched(json.dumps(EVENT).encode(), [operation], may_test=False)


@pytest.mark.parametrize("value", [float("nan"), "\ud800"])
def test_values_json_has_no_place_for_are_refused(value: object) -> None:
    with pytest.raises(InvalidOperation, match="NaN, Infinity or text that is not Unicode"):
        repair.patched(b"{}", [{"op": "add", "path": "/x", "value": value}])


def test_assignments_apply_in_turn() -> None:
    operations = repair.parse_assignments(["data.tags.2=z", "data.tags.2=w"])
    assert json.loads(repair.patched(json.dumps(EVENT).encode(), operations))["data"]["tags"] == [
        "a",
        "b",
        "w",
    ]


def test_a_repair_keeps_the_id_the_original_bytes_carry_when_the_row_does_not_know_it() -> None:
    registry = load_registry([])
    deserialize = Deserializer(registry.payload_models)
    reading = {
        "specversion": "1.0",
        "id": "ev2",
        "source": "/s",
        "type": "device.reading",
        "data": {"device_id": "d", "metric": "t", "value": "21.5C", "unit": "C"},
    }
    entry = row(json.dumps(reading).encode(), None, event_id=None, event_source=None, stage="deserialize")
    fixed = reading | {"data": reading["data"] | {"value": 21.5}}
    repair.validate(entry, json.dumps(fixed).encode(), deserialize)
    with pytest.raises(InvalidOperation, match="may not change the event's id"):
        repair.validate(entry, json.dumps(fixed | {"id": "ev2-fixed"}).encode(), deserialize)
    garbage = row(b"\xff not json", None, event_id=None, event_source=None, stage="deserialize")
    repair.validate(garbage, json.dumps(fixed | {"id": "any"}).encode(), deserialize)  # no id to keep

"""Repair: an operator's edit of a dead-lettered payload whose data is wrong.

The edit is a whole new document, a JSON Patch (RFC 6902) or `path=value` assignments (the dotted
paths of `EVENTHANDLER_API_REDACT_FIELDS`, a number for a list's index). It is kept beside the original
bytes, which are never overwritten (`DLQService.edit` checks it with the current deserializer first and
keeps the event's id, so the ledger still knows a duplicate); a replay publishes it with the original
key and headers. The diff between the two is what the audit log records and the views show, redacted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jsonpatch
import jsonpointer

from eventhandler.errors import InvalidOperation
from eventhandler.events import Event
from eventhandler.masking import NotJson, parse_json
from eventhandler.models import DLQEntry, Headers

MAX_DIFF_BYTES = 1_048_576  # larger documents are not diffed (a diff is for people to read)
MAX_PAYLOAD_BYTES = 10 * 1_048_576
SET = "set"  # `path=value`: replace what is there, else add (not an RFC 6902 operation)
_MISSING = object()


def parse_assignments(assignments: Sequence[str]) -> list[dict[str, Any]]:
    """`data.value=21.5`, `data.unit="C"`, `data.tags.0=x`: `set` operations, which `patched` turns
    into JSON Patch `replace` where the path is (a list's item too) and `add` where it is not. The
    value is JSON when it reads as JSON, else the text itself."""
    operations = []
    for assignment in assignments:
        path, equals, text = assignment.partition("=")
        if not equals or not path.strip():
            raise InvalidOperation(f"--set {assignment!r}: write it as path=value, e.g. data.value=21.5")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        segments = [segment.replace("~", "~0").replace("/", "~1") for segment in path.strip().split(".")]
        operations.append({"op": SET, "path": "/" + "/".join(segments), "value": value})
    return operations


def patched(raw: bytes | None, operations: Sequence[dict[str, Any]]) -> bytes:
    """The payload `raw` with `operations` (JSON Patch) applied, as compact JSON."""
    document = document_of(raw)
    try:
        result = jsonpatch.apply_patch(document, [_standard(document, op) for op in operations])
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError) as exc:
        raise InvalidOperation(f"the patch does not apply: {exc}") from None
    return encode(result)


def _standard(document: Any, operation: dict[str, Any]) -> dict[str, Any]:
    if operation.get("op") != SET:
        return operation
    there = jsonpointer.resolve_pointer(document, operation["path"], _MISSING) is not _MISSING
    return operation | {"op": "replace" if there else "add"}


def replaced(text: bytes) -> bytes:
    """A whole new payload as given, once it reads as JSON."""
    document_of(text)
    return text.strip()


def document_of(raw: bytes | None) -> Any:
    if raw is None:
        raise InvalidOperation("the payload is null (a tombstone): there is nothing to edit")
    try:
        return parse_json(raw)
    except NotJson:
        raise InvalidOperation(
            "the payload is not JSON: give the whole new payload (the editor, or --payload FILE)"
        ) from None


def encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def validate(entry: DLQEntry, payload: bytes, deserialize: Callable[[bytes | None, Headers], Event]) -> None:
    """The repair reads with the current deserializer, and is still the same event: its id and
    source are how the ledger recognises a duplicate, so a repair may not change them."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidOperation(f"the edited payload is over {MAX_PAYLOAD_BYTES:,} bytes")
    try:
        event = deserialize(payload, entry.headers)
    except Exception as exc:  # the deserializer's errors say what is wrong with the payload
        raise InvalidOperation(f"the edited payload does not deserialize: {exc}") from None
    if entry.event_id is not None and (event.id, event.source) != (entry.event_id, entry.event_source):
        raise InvalidOperation(
            "a repair may not change the event's id or source: the ledger knows the event by them, "
            "and a replay of the original would then apply a second time"
        )


def diff(original: Any, edited: Any) -> list[dict[str, Any]]:
    """The JSON Patch that turns `original` into `edited` (two parsed documents)."""
    return list(jsonpatch.make_patch(original, edited))


def shown_diff(
    raw_original: Any, raw_edited: Any, shown_original: Any, shown_edited: Any, mask: str
) -> list[dict[str, Any]]:
    """The diff as a view shows it: from the redacted documents, plus a change of a masked value
    (which the redacted documents cannot show, both sides being masked) as a `replace` with the mask."""
    shown = diff(shown_original, shown_edited)
    paths = {operation["path"] for operation in shown}
    for operation in diff(raw_original, raw_edited):
        if operation["path"] not in paths and operation["op"] in ("add", "replace"):
            shown.append({"op": operation["op"], "path": operation["path"], "value": mask})
    return shown

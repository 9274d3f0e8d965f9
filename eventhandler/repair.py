"""Repair: an operator's edit of a dead-lettered payload whose data is wrong.

The edit is a whole new document, a JSON Patch (RFC 6902) or `path=value` assignments (the dotted
paths of `EVENTHANDLER_API_REDACT_FIELDS`, a number for a list's index). It is kept beside the original
bytes, which are never overwritten (`DLQService.edit` checks it with the current deserializer first and
keeps the event's id and source, so the ledger still knows a duplicate); a replay publishes it with the
original key and headers. The diff between the two is what the audit log records and the views show,
redacted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jsonpatch
import jsonpointer

from eventhandler.errors import InvalidOperation
from eventhandler.events import Event
from eventhandler.masking import NotJson, lenient_json, parse_json
from eventhandler.models import DLQEntry, Headers

MAX_PAYLOAD_BYTES = 10 * 1_048_576
MAX_DIFF_BYTES = 262_144  # larger documents are not diffed (a diff is for people to read)
MAX_DIFF_OPERATIONS = 500
SET = "set"  # `path=value`: replace what is there, else add (not an RFC 6902 operation)
_MISSING = object()
_GROWING = {"add": "value", "replace": "value", "copy": "from", SET: "value"}


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


def new_payload(
    entry: DLQEntry, payload: bytes | None, patch: Sequence[dict[str, Any]] | None, *, may_test: bool
) -> bytes:
    """A whole new `payload`, or `patch` applied to the row's current one (its repair, if it has one)."""
    if (payload is None) == (patch is None):
        raise InvalidOperation("give either the new payload or a patch")
    if payload is not None:
        return replaced(payload)
    current = entry.edited_payload if entry.edited_payload is not None else entry.event_payload
    return patched(current, patch or [], may_test=may_test)


def patched(raw: bytes | None, operations: Sequence[dict[str, Any]], *, may_test: bool = True) -> bytes:
    """The payload `raw` with `operations` (JSON Patch) applied one by one, as compact JSON. What the
    operations add is counted as they go: a few `copy` operations of a copy double a document each.
    `may_test=False` refuses `test` operations (while fields are redacted, a test confirms a guess)."""
    document = document_of(raw)
    size = len(raw or b"")
    for number, operation in enumerate(operations, 1):
        try:
            if operation.get("op") == "test" and not may_test:
                raise InvalidOperation(
                    "test operations are refused while EVENTHANDLER_API_REDACT_FIELDS is set "
                    "(they would confirm a guessed value)"
                )
            size += _added_bytes(document, operation)
            if size > MAX_PAYLOAD_BYTES:
                raise InvalidOperation(f"the patch makes the payload larger than {MAX_PAYLOAD_BYTES:,} bytes")
            document = jsonpatch.apply_patch(document, [_standard(document, operation)], in_place=True)
        except InvalidOperation:
            raise
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError) as exc:
            # jsonpatch's messages quote the document: only the operation's number and kind are told
            raise InvalidOperation(f"patch operation {number} does not apply: {_kind(exc)}") from None
    return encode(document)


def _kind(exc: Exception) -> str:
    if isinstance(exc, jsonpatch.JsonPatchTestFailed):
        return "the tested value differs"
    if isinstance(exc, jsonpatch.JsonPatchConflict | jsonpointer.JsonPointerException | KeyError):
        return "its path is not in the payload"
    return "it is not a valid operation (op, path, from, value)"


def _standard(document: Any, operation: dict[str, Any]) -> dict[str, Any]:
    if operation.get("op") != SET:
        return operation
    there = jsonpointer.resolve_pointer(document, operation["path"], _MISSING) is not _MISSING
    return operation | {"op": "replace" if there else "add"}


def _added_bytes(document: Any, operation: dict[str, Any]) -> int:
    """About how many bytes `operation` adds to `document` (its value's, or the copied one's)."""
    field = _GROWING.get(str(operation.get("op")))
    if field is None or field not in operation:
        return 0
    value = operation[field]
    if field == "from":
        value = jsonpointer.resolve_pointer(document, value)
    return len(encode(value))


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
            "the payload is not JSON (or holds NaN or text that is not Unicode): give the whole new "
            "payload (the editor, or --payload FILE)"
        ) from None


def encode(document: Any) -> bytes:
    """Compact JSON; a value JSON has no place for (NaN, a lone surrogate) is refused."""
    try:
        return json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except (ValueError, UnicodeEncodeError):
        raise InvalidOperation("the payload would hold NaN, Infinity or text that is not Unicode") from None


def validate(entry: DLQEntry, payload: bytes, deserialize: Callable[[bytes | None, Headers], Event]) -> None:
    """The repair reads with the current deserializer, and is still the same event: its id and
    source are how the ledger recognises a duplicate, so a repair may not change them. A row that
    failed before its id was read has it in its bytes (the envelope, or the binary binding's
    headers) whenever they are JSON enough to hold it."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidOperation(f"the edited payload is over {MAX_PAYLOAD_BYTES:,} bytes")
    try:
        event = deserialize(payload, entry.headers)
    except Exception as exc:  # the deserializer's errors say what is wrong with the payload
        raise InvalidOperation(f"the edited payload does not deserialize: {exc}") from None
    identity = (
        (entry.event_id, entry.event_source) if entry.event_id is not None else original_identity(entry)
    )
    if identity is not None and (event.id, event.source) != identity:
        raise InvalidOperation(
            "a repair may not change the event's id or source: the ledger knows the event by them, "
            "and the original, replayed or sent again, would then apply a second time"
        )


def original_identity(entry: DLQEntry) -> tuple[str | None, str | None] | None:
    """The id and source the original bytes carry, read as leniently as they allow; None when they
    carry none (bytes that are not JSON at all)."""
    headers = {key.lower(): value for key, value in entry.headers}
    if "ce_specversion" in headers:
        return _text(headers.get("ce_id")), _text(headers.get("ce_source"))
    try:
        document = lenient_json(entry.event_payload or b"")
    except NotJson:
        return None
    if not isinstance(document, dict) or ("id" not in document and "source" not in document):
        return None
    return _text(document.get("id")), _text(document.get("source"))


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def diff(original: Any, edited: Any) -> list[dict[str, Any]]:
    """A JSON Patch that turns `original` into `edited` (two parsed documents), in one walk of both:
    objects key by key, lists of equal length item by item, anything else replaced whole."""
    return list(_walk(original, edited, ""))


def _walk(old: Any, new: Any, path: str) -> Iterator[dict[str, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key, value in old.items():
            where = f"{path}/{_escape(key)}"
            if key not in new:
                yield {"op": "remove", "path": where}
            else:
                yield from _walk(value, new[key], where)
        for key, value in new.items():
            if key not in old:
                yield {"op": "add", "path": f"{path}/{_escape(key)}", "value": value}
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (before, after) in enumerate(zip(old, new, strict=True)):
            yield from _walk(before, after, f"{path}/{index}")
    elif type(old) is not type(new) or old != new:
        yield {"op": "replace", "path": path, "value": new}


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def shown_diff(
    raw: tuple[Any, Any], shown: tuple[Any, Any], mask: str, hide: Callable[[str], str]
) -> list[dict[str, Any]]:
    """The diff as a view shows it: from the redacted documents (`shown`), plus a change of a masked
    value, which they cannot show (both sides are masked), as the mask at its path; `hide` masks the
    masked values in a path (a key may be one). At most `MAX_DIFF_OPERATIONS`."""
    operations = diff(*shown)
    paths = {operation["path"] for operation in operations}
    for operation in diff(*raw):
        if len(operations) >= MAX_DIFF_OPERATIONS:
            break
        path = hide(operation["path"])
        if path not in paths and operation["op"] in ("add", "replace"):
            operations.append({"op": operation["op"], "path": path, "value": mask})
            paths.add(path)
    return operations[:MAX_DIFF_OPERATIONS]

"""Redaction: the one rule for what a view of the DLQ shows of the fields it must not.

`EVENTHANDLER_API_REDACT_FIELDS` names payload fields by dotted paths (`data.password`, `*.token`,
case-insensitive). Every view — the admin API, the CLI's `dlq` commands, the worker's log lines — goes
through `Redactor.view`:

- the payload's fields are masked wherever its JSON holds them: the CloudEvents envelope, the body of
  the binary binding (which *is* `data`), the JSON inside `data_base64`, and JSON held inside a string
  field; a header `ce_<name>` of the binary binding is the envelope attribute `<name>`;
- the masked values are then masked in every other text of the row as well — the key, header values,
  event id and source, the error message, the traceback — because an error often quotes the value it
  failed on, and a message key is often the very id that is masked;
- a payload that is not JSON cannot be searched for fields, so while redaction is on it is withheld.

Values shorter than two characters are not searched for in other text (they cannot be told apart from
the text around them). Every step is linear in the size of the row.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal, overload

from pydantic import JsonValue

from eventhandler import repair
from eventhandler.logs import redact_text
from eventhandler.masking import (
    MASK,
    MAX_JSON_DEPTH,
    NotJson,
    Scrubber,
    collapse_embedded,
    expand_embedded,
    lenient_json,
    mask,
    parse_json,
    scrub_strings,
)
from eventhandler.models import DLQEntry, DLQSummary, FingerprintGroup, Headers

PayloadEncoding = Literal["json", "base64", "withheld"]
LISTED_SEARCH_BYTES = 32_768  # ~3 ms a row to parse and search (2026-12-06): a page of 500 in under 2 s


@dataclass
class Payload:
    """A payload as a view shows it: the masked JSON, its bytes as base64, withheld, or null."""

    document: JsonValue
    encoding: PayloadEncoding | None
    masked: bool


@dataclass
class View:
    """A row as every view shows it; `entry.event_payload` holds what `payload` renders, and
    `entry.edited_payload` what `edited` renders (an operator's repair, see `repair`)."""

    entry: DLQEntry
    payload: Payload
    edited: Payload | None = None
    diff: list[dict[str, Any]] | None = None  # the JSON Patch from the original to the repair


class Redactor:
    def __init__(self, fields: Sequence[str], *, secret: str = "") -> None:
        """`secret` keys the fingerprints views show (the database URL: the same for every API
        replica and CLI, unknown to a read-only caller)."""
        self._key = hashlib.sha256(b"eventhandler fingerprint\x00" + secret.encode()).digest()
        self.paths: list[tuple[str, ...]] = []
        for field in fields:
            if not field.strip():
                continue
            segments = tuple(part.strip().lower() for part in field.strip().split("."))
            if not all(segments):
                raise ValueError(f"redaction field {field!r} has an empty segment")
            self.paths.append(segments)

    @property
    def active(self) -> bool:
        return bool(self.paths)

    def fingerprint(self, stored: str) -> str:
        """The fingerprint a view shows. While redacting it is keyed: the stored one is a hash of the
        error text with its words, and a reader could hash guesses of a masked value against it."""
        if not self.active:
            return stored
        return hmac.new(self._key, stored.encode(), hashlib.sha256).hexdigest()[:16]

    # -- the payload ----------------------------------------------------------------------------

    def payload(
        self, raw: bytes | None, headers: Headers, *, render: bool = True
    ) -> tuple[Payload, Scrubber]:
        """The payload's view, and a scrubber for the values it masked (`render=False`: the scrubber
        only, for views that show no payload)."""
        secrets: list[str] = []
        binary = any(key.lower() == "ce_specversion" for key, _ in headers)
        if self.active and binary:  # envelope attributes the paths name, whatever the body is
            for key, value in headers:
                if key.lower().startswith("ce_") and self._names_attribute(key[3:].lower()):
                    secrets.append((value or b"").decode("utf-8", "replace"))
        if raw is None:
            return Payload(None, None, False), Scrubber(secrets)
        try:
            document = parse_json(raw)
        except NotJson:
            if not self.active:
                return Payload(base64.b64encode(raw).decode("ascii"), "base64", False), Scrubber()
            # Not shown (NaN, a lone surrogate, not JSON at all), but its fields' values may still
            # be quoted by the error or held by the key: find them as far as the bytes parse.
            with suppress(NotJson):
                self._mask_document(lenient_json(raw), binary, secrets)
            return Payload(None, "withheld", False), Scrubber(secrets)
        if not self.active:
            return Payload(document, "json", False), Scrubber()
        document, masked = self._mask_document(document, binary, secrets)
        scrubber = Scrubber(secrets)
        if not render:
            return Payload(None, "json", masked), scrubber
        shown = scrub_strings(document, scrubber)
        return Payload(shown, "json", masked or shown != document), scrubber

    def _header_value(self, key: str, value: bytes | None, scrubber: Scrubber) -> bytes | None:
        """A header's value as views show it: an envelope attribute a path names is masked whole
        (however short), any other value has the masked values masked."""
        if value is not None and key.lower().startswith("ce_") and self._names_attribute(key[3:].lower()):
            return MASK.encode()
        return scrubber.bytes(value)

    def _names_attribute(self, name: str) -> bool:
        return any(path in ((name,), ("*",)) for path in self.paths)

    def _mask_document(self, document: JsonValue, binary: bool, secrets: list[str]) -> tuple[JsonValue, bool]:
        document = expand_embedded(document, MAX_JSON_DEPTH)
        masked = False
        for path in self.paths:
            if binary:  # the body is `data`; the envelope is in the headers
                if path[0] in ("data", "*") and len(path) > 1:
                    masked |= mask(document, path[1:], secrets)
            else:
                masked |= mask(document, path, secrets)
        if not binary and isinstance(document, dict) and isinstance(document.get("data_base64"), str):
            document["data_base64"], hidden = self._mask_base64(str(document["data_base64"]), secrets)
            masked |= hidden
        return collapse_embedded(document), masked

    def _mask_base64(self, text: str, secrets: list[str]) -> tuple[str, bool]:
        """`data_base64` is the event's data as bytes: masked like a binary-binding body."""
        try:
            data = lenient_json(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError, NotJson):
            return MASK, True  # bytes no field can be found in
        inner, masked = self._mask_document(data, True, secrets)
        return base64.b64encode(json.dumps(inner).encode()).decode("ascii"), masked

    # -- the row ----------------------------------------------------------------------------------

    def view(self, entry: DLQEntry) -> View:
        """The row with the payload's masked values masked in every other field too (and those of
        its repair, when an operator edited it)."""
        payload, scrubber = self.payload(entry.event_payload, entry.headers)
        edited, diff = None, None
        if entry.edited_payload is not None:
            # Each side masked with what either masks: a repair may move a masked value elsewhere.
            edited, edit_scrubber = self.payload(entry.edited_payload, entry.headers)
            scrubber = scrubber | edit_scrubber
            payload, edited = _scrubbed(payload, scrubber), _scrubbed(edited, scrubber)
            diff = self._diff(entry, payload, edited, scrubber)
        shown = entry.model_copy(
            update={
                "event_id": scrubber.text(entry.event_id),
                "fingerprint": self.fingerprint(entry.fingerprint),
                "event_source": scrubber.text(entry.event_source),
                "message_key": scrubber.bytes(entry.message_key),
                "headers": [
                    (scrubber.text(k) or "", self._header_value(k, v, scrubber)) for k, v in entry.headers
                ],
                "error_message": _text(entry.error_message, scrubber),
                "error_traceback": _text(entry.error_traceback, scrubber),
                "event_payload": _payload_bytes(entry.event_payload, payload),
                "edited_payload": _payload_bytes(entry.edited_payload, edited) if edited else None,
            }
        )
        return View(shown, payload, edited, diff)

    def _diff(
        self, entry: DLQEntry, payload: Payload, edited: Payload, scrubber: Scrubber
    ) -> list[dict[str, Any]] | None:
        """The repair's diff as views show it; None when a side is not JSON or too large to diff."""
        original, repaired = entry.event_payload or b"", entry.edited_payload or b""
        if payload.encoding != "json" or edited.encoding != "json":
            return None
        if len(original) + len(repaired) > repair.MAX_DIFF_BYTES:
            return None
        raw = (parse_json(original), parse_json(repaired))
        shown = (payload.document, edited.document)
        return repair.shown_diff(raw, shown, MASK, lambda path: scrubber.text(path) or "")

    def summaries(
        self, rows: list[DLQSummary], entries: Callable[[list[int], int], dict[int, DLQEntry]]
    ) -> list[DLQSummary]:
        """A page of list rows. While redacting, each row's text is searched for the values its payload
        and repair mask (the rows are read in full by `entries`, up to a size); a row whose payload or
        repair is over `LISTED_SEARCH_BYTES` shows none of it (its own view does): reading and
        searching them made a page of 500 take minutes."""
        if not self.active:
            return rows
        full = entries([row.dlq_id for row in rows], LISTED_SEARCH_BYTES)
        return [self.summary(row, full.get(row.dlq_id)) for row in rows]

    def summary(self, row: DLQSummary, entry: DLQEntry | None) -> DLQSummary:
        """A list row; `entry` is the same row in full (needed while redaction is on; None: none of the
        row's text is shown)."""
        scrubber = self._scrubber(entry)
        return row.model_copy(
            update={
                "event_id": scrubber.text(row.event_id),
                "error_message": _text(row.error_message, scrubber),
                "fingerprint": self.fingerprint(row.fingerprint),
            }
        )

    def group(self, group: FingerprintGroup, sample: DLQEntry | None) -> FingerprintGroup:
        """An error group; `sample` is the row its sample message comes from."""
        return group.model_copy(
            update={
                "sample_message": _text(group.sample_message, self._scrubber(sample)),
                "fingerprint": self.fingerprint(group.fingerprint),
            }
        )

    def failure_text(self, text: str, value: bytes | None, headers: Headers) -> str:
        """Text about a failed message (a log field), with the values its payload masks masked."""
        if not self.active:
            return text
        return self.payload(value, headers, render=False)[1].text(text) or ""

    def entry_text(self, entry: DLQEntry, text: str) -> str:
        """Text about a row (an error it would meet), as its views would show it."""
        return _text(text, self._scrubber(entry))

    def _scrubber(self, entry: DLQEntry | None) -> Scrubber:
        """What a row's payload, and its repair, mask."""
        if not self.active:
            return Scrubber()
        if entry is None:  # not read (too large to search for a list), or gone since: show none of its text
            return Scrubber.everything()
        scrubber = self.payload(entry.event_payload, entry.headers, render=False)[1]
        if entry.edited_payload is not None:
            scrubber = scrubber | self.payload(entry.edited_payload, entry.headers, render=False)[1]
        return scrubber


@overload
def _text(text: str, scrubber: Scrubber) -> str: ...
@overload
def _text(text: None, scrubber: Scrubber) -> None: ...
def _text(text: str | None, scrubber: Scrubber) -> str | None:
    """Text of a row: masked values and passwords in URLs masked."""
    return None if text is None else redact_text(scrubber.text(text) or "")


def _scrubbed(payload: Payload, scrubber: Scrubber) -> Payload:
    if payload.encoding != "json":
        return payload
    document = scrub_strings(payload.document, scrubber)
    return Payload(document, "json", payload.masked or document != payload.document)


def _payload_bytes(raw: bytes | None, payload: Payload) -> bytes | None:
    """What a byte-oriented view (the CLI) prints for the payload."""
    if not payload.masked and payload.encoding != "withheld":
        return raw  # nothing hidden: the bytes themselves
    if payload.encoding == "withheld":
        return b"(withheld: not JSON, so its fields cannot be redacted)"
    return json.dumps(payload.document).encode()

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
import math
import urllib.parse
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, AnyStr, Literal, overload

from pydantic import JsonValue

from eventhandler.logs import redact_text
from eventhandler.models import DLQEntry, DLQSummary, FingerprintGroup, Headers

MASK = "***"
MAX_JSON_DEPTH = 64  # deeper documents are shown as base64: rendering them is not worth the risk
MIN_SEARCHED = 2  # shortest masked value that is also masked in the row's other text
_PYDANTIC_CUT = 20  # pydantic shows a long input value as about its first and last 24 characters
MAX_SEARCHED = 300  # forms of masked values searched for in the row's other text (beyond: all masked)
_EMBEDDED_MAX = 1_000_000  # JSON held in a string is parsed up to this size; a longer one is masked

PayloadEncoding = Literal["json", "base64", "withheld"]


class NotJson(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise NotJson(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotJson(text)
    return value


def parse_json(raw: bytes | str) -> JsonValue:
    """A JSON value that renders safely (finite numbers, no lone surrogates, bounded depth), or
    `NotJson`."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value: JsonValue = json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NotJson(str(exc)) from None
    _check_shape(value, strict=True)
    return value


def _check_shape(value: Any, *, strict: bool) -> None:
    """`NotJson` when `value` is nested deeper than `MAX_JSON_DEPTH` (or, `strict`, holds a lone
    surrogate); iterative, so a hostile depth cannot exhaust the stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise NotJson("too deep")
        if isinstance(node, str):
            if strict:
                _check_text(node)
        elif isinstance(node, dict):
            for key, child in node.items():
                if strict:
                    _check_text(key)
                stack.append((child, depth + 1))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


def _lenient_json(raw: bytes | str) -> Any:
    """JSON as Python's parser reads it (NaN, lone surrogates), for finding fields in a document that
    is not shown; `NotJson` when it is not JSON at all."""
    try:
        text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise NotJson(str(exc)) from None
    _check_shape(value, strict=False)
    return value


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a `\ud800` escape cannot be sent back
        raise NotJson("surrogate") from None


class Scrubber:
    """Masks given values wherever they occur in text or bytes, ignoring case, in the forms text
    quotes them in: as they are, JSON- and Python-escaped, URL-encoded, and cut the way pydantic
    cuts a long `input_value` (about its first and last 24 characters)."""

    @classmethod
    def everything(cls) -> Scrubber:
        """One that shows no text at all."""
        scrubber = cls()
        scrubber._forms, scrubber._everything = [MASK], True
        return scrubber

    def __init__(self, values: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for value in values:
            if len(value) < MIN_SEARCHED or value == MASK:
                continue
            quoted = {value, json.dumps(value)[1:-1], repr(value)[1:-1], ascii(value)[1:-1]}
            quoted |= {urllib.parse.quote(value), urllib.parse.quote_plus(value)}
            if len(value) > 2 * _PYDANTIC_CUT:
                quoted |= {value[:_PYDANTIC_CUT], value[-_PYDANTIC_CUT:]}
            forms |= {form.lower() for form in quoted}
        self._forms = sorted((f for f in forms if len(f) >= MIN_SEARCHED), key=len, reverse=True)
        self._raw = [form.encode("utf-8", "surrogatepass") for form in self._forms]
        # Searching for each of very many values would make a view slow: then no other text is shown.
        self._everything = len(self._forms) > MAX_SEARCHED

    def __bool__(self) -> bool:
        return bool(self._forms)

    def text(self, text: str | None) -> str | None:
        if text is None or not self._forms:
            return text
        if self._everything:
            return MASK
        lowered = text.lower()
        for form in self._forms:
            if form in lowered or len(lowered) != len(text):
                text = _mask_all(text, lowered, form, MASK)
                lowered = text.lower()
        return text

    def bytes(self, raw: bytes | None) -> bytes | None:
        if raw is None or not self._forms:
            return raw
        if self._everything:
            return MASK.encode()
        lowered = raw.lower()  # ASCII only: the same length
        for form in self._raw:
            if form in lowered:
                raw = _mask_all(raw, lowered, form, MASK.encode())
                lowered = raw.lower()
        return raw


def _mask_all(text: AnyStr, lowered: AnyStr, form: AnyStr, mask: AnyStr) -> AnyStr:
    """`text` with every case-insensitive occurrence of `form` (lower case) replaced by `mask`.
    `str.find` is linear; where lowering changes a text's length (a few Unicode letters), the
    search is exact instead."""
    if len(lowered) != len(text):
        return text.replace(form, mask)
    pieces, start = [], 0
    while (found := lowered.find(form, start)) != -1:
        pieces += [text[start:found], mask]
        start = found + len(form)
    pieces.append(text[start:])
    return text[:0].join(pieces)


@dataclass
class Payload:
    """A payload as a view shows it: the masked JSON, its bytes as base64, withheld, or null."""

    document: JsonValue
    encoding: PayloadEncoding | None
    masked: bool


@dataclass
class View:
    """A row as every view shows it; `entry.event_payload` holds what `payload` renders."""

    entry: DLQEntry
    payload: Payload


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
                self._mask_document(_lenient_json(raw), binary, secrets)
            return Payload(None, "withheld", False), Scrubber(secrets)
        if not self.active:
            return Payload(document, "json", False), Scrubber()
        document, masked = self._mask_document(document, binary, secrets)
        scrubber = Scrubber(secrets)
        if not render:
            return Payload(None, "json", masked), scrubber
        shown = _scrub_strings(document, scrubber)
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
        document = _expand_embedded(document, MAX_JSON_DEPTH)
        masked = False
        for path in self.paths:
            if binary:  # the body is `data`; the envelope is in the headers
                if path[0] in ("data", "*") and len(path) > 1:
                    masked |= _mask(document, path[1:], secrets)
            else:
                masked |= _mask(document, path, secrets)
        if not binary and isinstance(document, dict) and isinstance(document.get("data_base64"), str):
            document["data_base64"], hidden = self._mask_base64(str(document["data_base64"]), secrets)
            masked |= hidden
        return _collapse_embedded(document), masked

    def _mask_base64(self, text: str, secrets: list[str]) -> tuple[str, bool]:
        """`data_base64` is the event's data as bytes: masked like a binary-binding body."""
        try:
            data = _lenient_json(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError, NotJson):
            return MASK, True  # bytes no field can be found in
        inner, masked = self._mask_document(data, True, secrets)
        return base64.b64encode(json.dumps(inner).encode()).decode("ascii"), masked

    # -- the row ----------------------------------------------------------------------------------

    def view(self, entry: DLQEntry) -> View:
        """The row with the payload's masked values masked in every other field too."""
        payload, scrubber = self.payload(entry.event_payload, entry.headers)
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
            }
        )
        return View(shown, payload)

    def summary(self, row: DLQSummary, entry: DLQEntry | None) -> DLQSummary:
        """A list row; `entry` is the same row in full (needed while redaction is on)."""
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

    def _scrubber(self, entry: DLQEntry | None) -> Scrubber:
        if not self.active:
            return Scrubber()
        if entry is None:  # the row went away between the two reads: show none of its text
            return Scrubber.everything()
        return self.payload(entry.event_payload, entry.headers, render=False)[1]


@overload
def _text(text: str, scrubber: Scrubber) -> str: ...
@overload
def _text(text: None, scrubber: Scrubber) -> None: ...
def _text(text: str | None, scrubber: Scrubber) -> str | None:
    """Text of a row: masked values and passwords in URLs masked."""
    return None if text is None else redact_text(scrubber.text(text) or "")


def _payload_bytes(raw: bytes | None, payload: Payload) -> bytes | None:
    """What a byte-oriented view (the CLI) prints for the payload."""
    if not payload.masked and payload.encoding != "withheld":
        return raw  # nothing hidden: the bytes themselves
    if payload.encoding == "withheld":
        return b"(withheld: not JSON, so its fields cannot be redacted)"
    return json.dumps(payload.document).encode()


# -- masking JSON ---------------------------------------------------------------------------------------


class _Embedded(dict[str, Any]):
    """A JSON object that was held in a string, parsed so paths can reach into it."""


class _EmbeddedList(list[Any]):
    pass


def _expand_embedded(node: JsonValue, depth: int) -> JsonValue:
    if depth <= 0:
        return node
    if isinstance(node, dict):
        for key, child in node.items():
            node[key] = _expand_embedded(child, depth - 1)
        return node
    if isinstance(node, list):
        for index, child in enumerate(node):
            node[index] = _expand_embedded(child, depth - 1)
        return node
    if isinstance(node, str) and node.lstrip()[:1] in ("{", "["):
        try:
            if len(node) > _EMBEDDED_MAX:
                raise NotJson("too long to search")
            inner = _lenient_json(node)
        except NotJson:
            return MASK  # looks like JSON the paths cannot be searched in: not shown
        if isinstance(inner, dict):
            return _expand_embedded(_Embedded(inner), depth - 1)
        if isinstance(inner, list):
            return _expand_embedded(_EmbeddedList(inner), depth - 1)
    return node


def _collapse_embedded(node: Any) -> Any:
    if isinstance(node, dict):
        collapsed = {key: _collapse_embedded(child) for key, child in node.items()}
        return json.dumps(collapsed) if isinstance(node, _Embedded) else collapsed
    if isinstance(node, list):
        items = [_collapse_embedded(child) for child in node]
        return json.dumps(items) if isinstance(node, _EmbeddedList) else items
    return node


def _mask(document: Any, path: tuple[str, ...], secrets: list[str]) -> bool:
    if isinstance(document, list):
        masks = [_mask(item, path, secrets) for item in document]  # every element, not up to the first
        return any(masks)
    if not isinstance(document, dict):
        return False
    head, rest = path[0], path[1:]
    masked = False
    for key in list(document):
        if head not in ("*", key.lower()):
            continue
        if rest:
            masked |= _mask(document[key], rest, secrets)
        elif document[key] != MASK:
            secrets.extend(_leaves(document[key]))
            document[key] = MASK
            masked = True
    return masked


def _leaves(value: Any) -> list[str]:
    """The scalar values inside `value`, as text quotes them."""
    found: list[str] = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            found.append(node)
        elif node is not None:
            found.append(json.dumps(node))
    return found


def _scrub_strings(node: Any, scrubber: Scrubber) -> Any:
    """Every string of the masked document, with the masked values masked inside it too."""
    if not scrubber:
        return node
    if isinstance(node, dict):
        return {scrubber.text(key) or "": _scrub_strings(child, scrubber) for key, child in node.items()}
    if isinstance(node, list):
        return [_scrub_strings(child, scrubber) for child in node]
    if isinstance(node, str):
        return scrubber.text(node)
    return node

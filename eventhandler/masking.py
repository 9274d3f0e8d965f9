"""The masking behind redaction (`redaction`): strict and lenient JSON for payloads, the search
for masked values in a row's other text (`Scrubber`), and masking fields by path inside JSON, including
JSON held in a string. Every step is linear in the size of its input."""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Iterable
from typing import Any, AnyStr

from pydantic import JsonValue

MASK = "***"
MAX_JSON_DEPTH = 64  # deeper documents are shown as base64: rendering them is not worth the risk
MIN_SEARCHED = 2  # shortest masked value that is also masked in the row's other text
_PYDANTIC_CUT = 20  # pydantic shows a long input value as about its first and last 24 characters
MAX_SEARCHED = 300  # forms of masked values searched for in the row's other text (beyond: all masked)
_EMBEDDED_MAX = 1_000_000  # JSON held in a string is parsed up to this size; a longer one is masked


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


def lenient_json(raw: bytes | str) -> Any:
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
    if not _encodable(text):  # a lone surrogate from a `\ud800` escape cannot be sent back
        raise NotJson("surrogate")


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
            # as folded, and as lowered: `str.lower` spells a Turkish capital I with a dot as two letters
            forms |= {_fold(form) for form in quoted} | {_fold(form.lower()) for form in quoted}
        self._set(forms)
        # Searching for each of very many values would make a view slow: then no other text is shown.
        self._everything = len(self._forms) > MAX_SEARCHED

    def _set(self, forms: set[str]) -> None:
        self._forms = sorted((f for f in forms if len(f) >= MIN_SEARCHED), key=len, reverse=True)
        # Bytes are searched as text (see `bytes`), except for forms holding a lone surrogate (a JSON
        # `\ud800` escape), which only the bytes they stand for can match.
        self._raw = [form.encode("utf-8", "surrogatepass") for form in self._forms if not _encodable(form)]

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __or__(self, other: Scrubber) -> Scrubber:
        """One that masks what either masks (a row's original payload and its repair)."""
        union = Scrubber()
        union._set(set(self._forms) | set(other._forms))
        union._everything = self._everything or other._everything or len(union._forms) > MAX_SEARCHED
        return union

    def text(self, text: str | None) -> str | None:
        if text is None or not self._forms:
            return text
        if self._everything:
            return MASK
        folded = _fold(text)
        for form in self._forms:
            if form in folded:  # `_fold` goes letter by letter and folds the mask to itself: no new fold
                text, folded = _mask_all(text, folded, form, MASK), _mask_all(folded, folded, form, MASK)
        return text

    def bytes(self, raw: bytes | None) -> bytes | None:
        """`raw` with the values masked where its UTF-8 text holds them (the bytes that are not UTF-8
        kept as they are)."""
        if raw is None or not self._forms:
            return raw
        if self._everything:
            return MASK.encode()
        raw = (self.text(raw.decode("utf-8", "surrogateescape")) or "").encode("utf-8", "surrogateescape")
        lowered = raw.lower()  # ASCII only: the same length
        for form in self._raw:
            if form in lowered:
                raw = _mask_all(raw, lowered, form, MASK.encode())
                lowered = raw.lower()
        return raw


def _fold(text: str) -> str:
    """`text` in lower case, character for character, so that a position in it is the same position in
    `text`: a letter whose lower case is longer (the Turkish capital I with a dot) stays as it is, and a
    final sigma is an ordinary one (`str.lower` picks between the two by the letters around it)."""
    folded = text.lower()
    if len(folded) != len(text):
        folded = "".join(low if len(low := char.lower()) == 1 else char for char in text)
    return folded.replace("\N{GREEK SMALL LETTER FINAL SIGMA}", "\N{GREEK SMALL LETTER SIGMA}")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _mask_all(text: AnyStr, folded: AnyStr, form: AnyStr, mask: AnyStr) -> AnyStr:
    """`text` with every occurrence of `form` in `folded` (`text` in lower case, the same length)
    replaced by `mask`. `find` is linear."""
    pieces, start = [], 0
    while (found := folded.find(form, start)) != -1:
        pieces += [text[start:found], mask]
        start = found + len(form)
    pieces.append(text[start:])
    return text[:0].join(pieces)


# -- masking JSON ---------------------------------------------------------------------------------------


class _Embedded(dict[str, Any]):
    """A JSON object that was held in a string, parsed so paths can reach into it."""


class _EmbeddedList(list[Any]):
    pass


def expand_embedded(node: JsonValue, depth: int) -> JsonValue:
    if depth <= 0:
        return node
    if isinstance(node, dict):
        for key, child in node.items():
            node[key] = expand_embedded(child, depth - 1)
        return node
    if isinstance(node, list):
        for index, child in enumerate(node):
            node[index] = expand_embedded(child, depth - 1)
        return node
    if isinstance(node, str) and node.lstrip()[:1] in ("{", "["):
        try:
            if len(node) > _EMBEDDED_MAX:
                raise NotJson("too long to search")
            inner = lenient_json(node)
        except NotJson:
            return MASK  # looks like JSON the paths cannot be searched in: not shown
        if isinstance(inner, dict):
            return expand_embedded(_Embedded(inner), depth - 1)
        if isinstance(inner, list):
            return expand_embedded(_EmbeddedList(inner), depth - 1)
    return node


def collapse_embedded(node: Any) -> Any:
    if isinstance(node, dict):
        collapsed = {key: collapse_embedded(child) for key, child in node.items()}
        return json.dumps(collapsed) if isinstance(node, _Embedded) else collapsed
    if isinstance(node, list):
        items = [collapse_embedded(child) for child in node]
        return json.dumps(items) if isinstance(node, _EmbeddedList) else items
    return node


def mask(document: Any, path: tuple[str, ...], secrets: list[str]) -> bool:
    if isinstance(document, list):
        masks = [mask(item, path, secrets) for item in document]  # every element, not up to the first
        return any(masks)
    if not isinstance(document, dict):
        return False
    head, rest = path[0], path[1:]
    masked = False
    for key in list(document):
        if head not in ("*", key.lower()):
            continue
        if rest:
            masked |= mask(document[key], rest, secrets)
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


def scrub_strings(node: Any, scrubber: Scrubber) -> Any:
    """Every string of the masked document, with the masked values masked inside it too."""
    if not scrubber:
        return node
    if isinstance(node, dict):
        return {scrubber.text(key) or "": scrub_strings(child, scrubber) for key, child in node.items()}
    if isinstance(node, list):
        return [scrub_strings(child, scrubber) for child in node]
    if isinstance(node, str):
        return scrubber.text(node)
    return node

"""A DLQ row as operators read it in JSON (the admin API, `dlq show --json`): the redactor's view of
it, with every byte field as text when it is UTF-8, else as base64."""

from __future__ import annotations

import base64
from typing import Literal

from eventhandler.librdkafka import raw_header_key
from eventhandler.models import DLQDetail, Header
from eventhandler.redaction import View


def row_detail(view: View) -> DLQDetail:
    """A row as operators see it, in JSON (the redactor made `view`): every byte field as text when
    it is UTF-8, else as base64, and the payload as the view rendered it."""
    entry = view.entry
    key, key_encoding = _text_or_base64(entry.message_key)
    headers = []
    for name, raw in entry.headers:
        value, value_encoding = _text_or_base64(raw)
        key_text, key_text_encoding = _as_text(raw_header_key(name))
        headers.append(
            Header(key=key_text, key_encoding=key_text_encoding, value=value, encoding=value_encoding)
        )
    fields = entry.model_dump(exclude={"event_payload", "message_key", "headers", "edited_payload"})
    return DLQDetail(
        **fields,
        payload=view.payload.document,
        payload_encoding=view.payload.encoding,
        payload_redacted=view.payload.masked,
        key=key,
        key_encoding=key_encoding,
        headers=headers,
        edited_payload=view.edited.document if view.edited else None,
        edited_payload_encoding=view.edited.encoding if view.edited else None,
        edit_diff=view.diff,
    )


def _text_or_base64(raw: bytes | None) -> tuple[str | None, Literal["text", "base64"] | None]:
    return (None, None) if raw is None else _as_text(raw)


def _as_text(raw: bytes) -> tuple[str, Literal["text", "base64"]]:
    try:
        return raw.decode("utf-8"), "text"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"

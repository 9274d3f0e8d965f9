"""What the admin API takes and gives: every input is validated here, before any query runs, and a DLQ
row becomes a response here, with its bytes shown safely and the configured payload fields masked.

Filters mirror the CLI's (`--consumer`, `--event-type`, `--stage`, `--status`, `--since`, `--until`,
`--error-contains`, `--fingerprint`, `--topic`, `--id`) and all become one `DLQFilter`.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from eventhandler.librdkafka import raw_header_key
from eventhandler.models import DLQFilter, DLQSummary, FingerprintGroup, Stage, Status
from eventhandler.redaction import View
from eventhandler.service import parse_time, replay_target_problem

MAX_ID = 2**63 - 1  # dlq_id is a bigint
MAX_PAGE = 500
MAX_REPLAY = 10_000
MAX_IDS = 1_000


def _storable(text: str) -> str:
    """Text PostgreSQL can take as a parameter: no NUL character, no lone surrogate."""
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return text


def _topic_name(text: str) -> str:
    if text in (".", ".."):
        raise ValueError("is not a valid Kafka topic name")
    return text


def _replay_target(text: str) -> str:
    problem = replay_target_problem(text)
    if problem:
        raise ValueError(problem)
    return text


def _time(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_time(value)
        except (ValueError, OverflowError) as exc:
            message = str(exc) if isinstance(exc, ValueError) else f"{value!r} is out of range"
            raise ValueError(message) from None
    return value


def encode_cursor(dlq_id: int) -> str:
    return base64.urlsafe_b64encode(f"dlq:{dlq_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    prefix, _, number = text.partition(":")
    if prefix != "dlq" or not number.isdigit() or not 0 < int(number) <= MAX_ID:
        raise ValueError("is not a cursor returned by this API")
    return int(number)


def _cursor(cursor: str) -> str:
    decode_cursor(cursor)
    return cursor


Text = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_storable)]
LongText = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_storable)]
DlqId = Annotated[int, Field(ge=1, le=MAX_ID)]
# In a JSON body a flag is a boolean and a count a number: "false" must not start a replay.
BodyId = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
TopicName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,249}$"), AfterValidator(_topic_name)]
TargetTopic = Annotated[TopicName, AfterValidator(_replay_target)]
Fingerprint = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
TimeBound = Annotated[
    datetime,
    BeforeValidator(_time),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "string", "pattern": r"^\d{1,5}[smhdw]$"},
            ],
            "description": "An ISO 8601 time (UTC without an offset) or an age: 90s, 15m, 2h, 7d.",
        }
    ),
]
Cursor = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_cursor)]


class _Filters(BaseModel):
    """The filters shared by every operation that selects rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    consumer: Text | None = Field(default=None, description="Consumer group.")
    event_type: Text | None = Field(default=None, description="CloudEvents type, e.g. device.reading.")
    stage: Stage | None = Field(default=None, description="Where the message failed.")
    since: TimeBound | None = Field(
        default=None, description="Last failed at or after this time (earlier than `until`, else a 422)."
    )
    until: TimeBound | None = Field(default=None, description="Last failed before this time.")
    error_contains: Text | None = Field(default=None, description="Case-insensitive substring of the error.")
    fingerprint: Fingerprint | None = Field(default=None, description="Failure group (see stats).")
    topic: TopicName | None = Field(default=None, description="Original topic.")

    @model_validator(mode="after")
    def _ordered_times(self) -> _Filters:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be earlier than until")
        return self

    def _filter(self, ids: list[int], statuses: list[Status]) -> DLQFilter:
        return DLQFilter(
            ids=tuple(dict.fromkeys(ids)),
            consumer=self.consumer,
            event_type=self.event_type,
            stage=self.stage,
            statuses=tuple(dict.fromkeys(statuses)),
            since=self.since,
            until=self.until,
            error_contains=self.error_contains,
            fingerprint=self.fingerprint,
            topic=self.topic,
        )


class StatsQuery(_Filters):
    id: list[DlqId] = Field(default_factory=list, max_length=MAX_IDS, description="DLQ ids (repeatable).")
    status: list[Status] = Field(default_factory=list, max_length=4, description="Statuses (repeatable).")

    def dlq_filter(self) -> DLQFilter:
        return self._filter(self.id, self.status)


class ListQuery(StatsQuery):
    limit: int = Field(default=50, ge=1, le=MAX_PAGE, description="Rows per page.")
    cursor: Cursor | None = Field(
        default=None, description="`next_cursor` of the previous page, as given (any other value is a 422)."
    )

    @property
    def after_id(self) -> int | None:
        return None if self.cursor is None else decode_cursor(self.cursor)


class RetryAllRequest(_Filters):
    """Replay every row matching the filters, at most `limit` of them, oldest first."""

    ids: list[BodyId] = Field(default_factory=list, max_length=MAX_IDS)
    statuses: list[Status] = Field(
        default_factory=list,
        max_length=4,
        description="Statuses to replay; pending when empty (resolved and discarded need force).",
    )
    limit: StrictInt = Field(ge=1, le=MAX_REPLAY, description="The most rows this request may replay.")
    all: StrictBool = Field(default=False, description="Needed to replay without any other filter.")
    to_topic: TargetTopic | None = Field(
        default=None, description="Publish here instead of the original topic."
    )
    dry_run: StrictBool = Field(default=False, description="Count what would be replayed, change nothing.")
    force: StrictBool = Field(default=False, description="Needed to replay resolved or discarded rows.")

    @model_validator(mode="after")
    def _narrowed(self) -> RetryAllRequest:
        if not self.all and self._filter(self.ids, []).is_empty():
            raise ValueError(
                "refusing to replay without a filter: give at least one of ids, consumer, event_type, "
                "stage, since, until, error_contains, fingerprint, topic — or set all to true"
            )
        return self

    def dlq_filter(self) -> DLQFilter:
        return self._filter(self.ids, self.statuses or ["pending"])


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    force: StrictBool = Field(default=False, description="Replay a resolved or discarded row too.")
    to_topic: TargetTopic | None = Field(
        default=None, description="Publish here instead of the original topic."
    )


class ResolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    note: LongText | None = Field(default=None, description="Why the row is resolved (kept for audit).")


# -- responses ------------------------------------------------------------------------------------------


class ErrorResponse(BaseModel):
    detail: str


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationIssue]
    message: str = Field(description="All the problems, in one line.")


class DLQPage(BaseModel):
    items: list[DLQSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")
    total: int = Field(description="Rows matching the filters, on all pages.")


class Header(BaseModel):
    key: str = Field(description="UTF-8 text, or base64 of the key's bytes when `key_encoding` says so.")
    key_encoding: Literal["text", "base64"]
    value: str | None = Field(description="UTF-8 text, or base64 when `encoding` says so; null if none.")
    encoding: Literal["text", "base64"] | None


class DLQDetail(DLQSummary):
    """A whole DLQ row. Bytes are shown as JSON or text when they are, else as base64."""

    event_source: str | None
    payload: JsonValue = Field(description="The message value: parsed JSON, base64 text, or null.")
    payload_encoding: Literal["json", "base64", "withheld"] | None = Field(
        description="json: `payload` is the parsed value; base64: the raw bytes; withheld: not JSON, so "
        "redaction cannot be applied and the bytes are not shown; null: the value was null."
    )
    payload_redacted: bool = Field(description="True when fields of the payload were masked.")
    key: str | None
    key_encoding: Literal["text", "base64"] | None
    headers: list[Header]
    message_timestamp: datetime | None
    error_traceback: str | None = Field(description="Null for the read-only token (admin only).")
    replayed_to_topic: str | None
    resolved_by: str | None
    resolution_note: str | None
    worker_version: str
    updated_at: datetime


class StatusCount(BaseModel):
    status: Status
    count: int


class ConsumerCount(StatusCount):
    consumer: str | None


class StageCount(StatusCount):
    stage: str | None


class EventTypeCount(StatusCount):
    event_type: str | None


class StatsResponse(BaseModel):
    total: int
    by_status: dict[str, int]
    by_consumer: list[ConsumerCount]
    by_stage: list[StageCount]
    by_event_type: list[EventTypeCount]
    oldest_pending_age_seconds: dict[str, float]
    top_groups: list[FingerprintGroup]


class ReplayResponse(BaseModel):
    matched: int = Field(description="Rows the filters matched (at most `limit`).")
    published: int = Field(description="Rows the broker confirmed; they are now `replayed`.")
    failed: int = Field(description="Rows the broker did not confirm; they keep their status.")
    dry_run: bool
    published_ids: list[int]
    failures: dict[str, str] = Field(description="dlq_id → why the broker refused it.")


class ResolveResponse(BaseModel):
    dlq_id: int
    status: Status
    changed: bool = Field(description="False when the row was already resolved.")


class Health(BaseModel):
    status: Literal["ok", "ready", "unavailable"]


# -- rendering rows: bytes as JSON, text or base64, with redaction ------------------------------------------


def _text_or_base64(raw: bytes | None) -> tuple[str | None, Literal["text", "base64"] | None]:
    return (None, None) if raw is None else _as_text(raw)


def _as_text(raw: bytes) -> tuple[str, Literal["text", "base64"]]:
    try:
        return raw.decode("utf-8"), "text"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def render_entry(view: View) -> DLQDetail:
    """A row as the API shows it (the redactor made `view`)."""
    entry = view.entry
    key, key_encoding = _text_or_base64(entry.message_key)
    headers = []
    for name, raw in entry.headers:
        value, value_encoding = _text_or_base64(raw)
        key_text, key_text_encoding = _as_text(raw_header_key(name))
        headers.append(
            Header(key=key_text, key_encoding=key_text_encoding, value=value, encoding=value_encoding)
        )
    fields = entry.model_dump(exclude={"event_payload", "message_key", "headers"})
    return DLQDetail(
        **fields,
        payload=view.payload.document,
        payload_encoding=view.payload.encoding,
        payload_redacted=view.payload.masked,
        key=key,
        key_encoding=key_encoding,
        headers=headers,
    )

"""The records that cross module boundaries: a failed message on its way to the DLQ, and DLQ rows."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from eventhandler.filters import TimeBound

Stage = Literal["deserialize", "handler", "projection"]
Status = Literal["pending", "replayed", "resolved", "discarded", "parked"]
STAGES: tuple[Stage, ...] = ("deserialize", "handler", "projection")
STATUSES: tuple[Status, ...] = ("pending", "replayed", "resolved", "discarded", "parked")

Headers = list[tuple[str, bytes | None]]

_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
_HEX = re.compile(r"\b(0x)?[0-9a-fA-F]{12,}\b")
_QUOTED = re.compile(r"('[^']*'|\"[^\"]*\")")
_TIMESTAMP = re.compile(r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_])[-+]?\d+(\.\d+)?([eE][-+]?\d+)?(?![A-Za-z0-9_])")
_SPACE = re.compile(r"\s+")


def normalise_error(message: str) -> str:
    """An error message with its ids, quoted values and numbers replaced, so alike failures group."""
    # Quoted values first: what else is replaced inside them goes with them, and what is left
    # ("device <str> is not registered") repeats, so the costlier rest is cached.
    text = _QUOTED.sub("<str>", message.splitlines()[0] if message else "")
    return _normalise_unquoted(text) if len(text) <= _CACHED_LENGTH else _normalise_unquoted.__wrapped__(text)


_CACHED_LENGTH = 2048  # longer texts are normalised every time, so that no cache holds megabytes


@functools.lru_cache(maxsize=4096)
def _normalise_unquoted(text: str) -> str:
    text = _UUID.sub("<uuid>", text)
    text = _TIMESTAMP.sub("<time>", text)
    text = _HEX.sub("<hex>", text)
    text = _NUMBER.sub("<n>", text)
    return _SPACE.sub(" ", text).strip()[:500]


def fingerprint(stage: str, error_type: str, message: str) -> str:
    """A short stable id of a failure group: stage, error type and the normalised message."""
    if len(message) <= _CACHED_LENGTH:
        return _fingerprint(stage, error_type, message)
    return _fingerprint.__wrapped__(stage, error_type, message)


@functools.lru_cache(maxsize=8192)  # a storm repeats the same few messages
def _fingerprint(stage: str, error_type: str, message: str) -> str:
    basis = f"{stage}\x00{error_type}\x00{normalise_error(message)}"
    return hashlib.sha256(basis.encode("utf-8", "backslashreplace")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ReplayOrigin:
    """What a replayed message says of the DLQ row it came from: the row's id and the coordinates of
    the original message. A row is touched only by a message whose origin matches it."""

    dlq_id: int
    topic: str
    partition: int
    offset: int


@dataclass(slots=True, kw_only=True)
class FailedMessage:
    """A Kafka message that failed, with everything needed to store and later replay it.

    A plain dataclass, not a pydantic model (nor a frozen dataclass, whose every field is set
    through object.__setattr__): it is built once per failure, and a failure storm builds tens of
    thousands a second."""

    consumer: str
    topic: str
    partition: int
    offset: int
    stage: Stage
    error_type: str
    error_message: str
    worker_version: str
    timestamp: datetime | None = None
    key: bytes | None = None
    value: bytes | None = None
    headers: Headers = field(default_factory=list)
    traceback: str | None = None
    event_id: str | None = None
    event_type: str | None = None
    event_source: str | None = None
    replay_of: ReplayOrigin | None = None  # the origin headers of a replayed message
    event_key: bytes | None = None  # the ledger key (`ledger.digest`), when the worker computed it already
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        """Computed once: the flood guard, the DLQ row and the batch's log line each ask for it (a
        failure's stage, type and message are not changed after it is built)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.stage, self.error_type, self.error_message)
        return self._fingerprint


@dataclass(slots=True)
class OutgoingRow:
    """A row as a replay publishes it: the columns it needs, as a plain dataclass (a replay takes
    hundreds of thousands of rows, and their values come from the DLQ's own columns)."""

    dlq_id: int
    source_topic: str
    source_partition: int
    source_offset: int
    message_key: bytes | None
    event_payload: bytes | None
    edited_payload: bytes | None
    headers: Headers
    replay_count: int


class DLQSummary(BaseModel):
    """A DLQ row without its payload and traceback: what a list shows."""

    model_config = ConfigDict(frozen=True)

    dlq_id: int
    consumer: str
    event_id: str | None
    event_type: str | None
    source_topic: str
    source_partition: int
    source_offset: int
    stage: Stage
    error_type: str
    error_message: str
    fingerprint: str
    status: Status
    retry_count: int
    failure_count: int
    replay_count: int
    failed_at: datetime
    last_failed_at: datetime
    last_replayed_at: datetime | None
    resolved_at: datetime | None
    resolved_by: str | None = Field(
        default=None, description="Who resolved the row: `replay` (the worker), `release`, or an operator."
    )
    payload_size: int | None
    blocked_by: int | None = Field(default=None, description="The row a parked row waits behind.")
    parked_behind: int = Field(default=0, description="How many parked rows wait behind this one.")


class DLQEntry(DLQSummary):
    """A whole DLQ row: the original message byte for byte, the error and its audit trail."""

    event_source: str | None
    event_payload: bytes | None
    message_key: bytes | None
    headers: Headers
    message_timestamp: datetime | None
    error_traceback: str | None
    replayed_to_topic: str | None
    resolution_note: str | None
    worker_version: str
    updated_at: datetime
    edited_payload: bytes | None = None  # an operator's repair, beside the original (see `repair`)
    edited_at: datetime | None = None
    edited_by: str | None = None


class Header(BaseModel):
    key: str = Field(description="UTF-8 text, or base64 of the key's bytes when `key_encoding` says so.")
    key_encoding: Literal["text", "base64"]
    value: str | None = Field(description="UTF-8 text, or base64 when `encoding` says so; null if none.")
    encoding: Literal["text", "base64"] | None


# The admin API's row and the one `dlq show --json` prints (see `detail.row_detail`); its docstring is
# the OpenAPI description.
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
    edited_payload: JsonValue = Field(
        default=None,
        description="An operator's repair of the payload (replayed instead), shown as `payload` is.",
    )
    edited_payload_encoding: Literal["json", "base64", "withheld"] | None = None
    edited_at: datetime | None = None
    edited_by: str | None = None
    edit_diff: list[dict[str, JsonValue]] | None = Field(
        default=None, description="The JSON Patch from the original payload to the repair, redacted."
    )


class DLQFilter(BaseModel):
    """Which DLQ rows an operation applies to. Every field narrows; an empty filter matches all.

    The one filter model: the command line validates its options into it, and so do the admin API's
    queries, so a stage or status name, an age such as `2h` and a list of ids mean the same on both."""

    model_config = ConfigDict(frozen=True)

    ids: tuple[int, ...] = ()
    consumer: str | None = None
    event_type: str | None = None
    stage: Stage | None = None
    statuses: tuple[Status, ...] = ()
    since: TimeBound | None = None
    until: TimeBound | None = None
    error_contains: str | None = None
    payload_contains: str | None = None  # bytes of the UTF-8 text, in the payload or its repair
    fingerprint: str | None = None
    topic: str | None = None

    @field_validator("ids", "statuses", mode="after")
    @classmethod
    def _once_each(cls, values: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(dict.fromkeys(values))

    def is_empty(self) -> bool:
        return self == DLQFilter()


class FingerprintGroup(BaseModel):
    model_config = ConfigDict(frozen=True)

    fingerprint: str
    stage: Stage
    error_type: str
    sample_message: str
    sample_id: int  # the row the sample message comes from
    count: int
    first_seen: datetime
    last_seen: datetime
    trend: list[int] = Field(
        default_factory=list, description="Rows that last failed in each of the last 24 hours, oldest first."
    )


class AuditEntry(BaseModel):
    """One audit row about a DLQ row: who did what, when, from where."""

    at: datetime
    actor: str
    action: str
    detail: dict[str, Any]
    request_id: str | None
    client: str | None


class CircuitState(BaseModel):
    """A circuit as operators see it."""

    model_config = ConfigDict(frozen=True)

    consumer: str
    fingerprint: str
    state: Literal["open", "closed"]
    stage: Stage
    error_type: str
    error_message: str | None  # None while redacting: it may quote a masked value
    event_types: list[str]
    failures: int
    messages: int
    distinct_keys: int
    sample_topic: str
    sample_partition: int
    sample_offset: int
    opened_at: datetime
    opened_by: str
    tried_at: datetime
    trials: int
    closed_at: datetime | None
    closed_by: str | None
    close_note: str | None
    dead_letter_until: datetime | None


@dataclass(frozen=True)
class Stats:
    """The DLQ's depth by consumer, stage, event type and status, and its largest failure groups."""

    total: int
    by_status: dict[str, int]
    by_consumer: list[tuple[str | None, str, int]]
    by_stage: list[tuple[str | None, str, int]]
    by_event_type: list[tuple[str | None, str, int]]
    oldest_pending_age_seconds: dict[str, float]
    top_groups: list[FingerprintGroup]
    circuits: list[CircuitState] = field(default_factory=list)  # the flood guard's, open ones first
    open_by_hour: list[int] = field(default_factory=list)  # open rows at the end of the last 24 hours

    def as_dict(self) -> dict[str, Any]:
        def rows(items: list[tuple[str | None, str, int]], name: str) -> list[dict[str, Any]]:
            return [{name: key, "status": status, "count": count} for key, status, count in items]

        return {
            "total": self.total,
            "by_status": self.by_status,
            "by_consumer": rows(self.by_consumer, "consumer"),
            "by_stage": rows(self.by_stage, "stage"),
            "by_event_type": rows(self.by_event_type, "event_type"),
            "oldest_pending_age_seconds": self.oldest_pending_age_seconds,
            "top_groups": [g.model_dump(mode="json") for g in self.top_groups],
            "circuits": [c.model_dump(mode="json") for c in self.circuits],
            "open_by_hour": self.open_by_hour,
        }


class DepthRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    consumer: str
    status: Status
    count: int


@dataclass(frozen=True)
class DepthSnapshot:
    """What the DLQ gauges show, read in one go."""

    rows: list[DepthRow]
    oldest_pending: dict[str, float]  # consumer → seconds since its oldest pending row failed
    oldest_replayed: dict[str, float]  # consumer → seconds since its oldest replayed row was published
    oldest_parked: dict[str, float] = field(
        default_factory=dict
    )  # consumer → seconds its oldest parked row waits
    # (consumer, fingerprint, open) of the flood guard's circuits: the open ones and those closed lately
    circuits: list[tuple[str, str, bool]] = field(default_factory=list)

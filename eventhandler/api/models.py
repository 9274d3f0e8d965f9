"""What the admin API takes and gives: every input is validated here, before any query runs.

Filters mirror the CLI's (`--consumer`, `--event-type`, `--stage`, `--status`, `--since`, `--until`,
`--error-contains`, `--fingerprint`, `--topic`, `--id`) and all become one `DLQFilter`; a row is the
`DLQDetail` the service renders for the CLI too.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from eventhandler.canary import CanarySize
from eventhandler.errors import InvalidOperation
from eventhandler.filters import TimeBound, replay_target_problem
from eventhandler.models import CircuitState, DLQFilter, DLQSummary, FingerprintGroup, Stage, Status

MAX_ID = 2**63 - 1  # dlq_id is a bigint
MAX_PAGE = 500
MAX_REPLAY = 10_000
MAX_IDS = 1_000
MAX_SIMULATE = 100_000


def storable(text: str) -> str:
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


Text = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(storable)]
LongText = Annotated[str, StringConstraints(max_length=2000), AfterValidator(storable)]
DlqId = Annotated[int, Field(ge=1, le=MAX_ID)]
# In a JSON body a flag is a boolean and a count a number: "false" must not start a replay.
BodyId = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
TopicName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,249}$"), AfterValidator(_topic_name)]
TargetTopic = Annotated[TopicName, AfterValidator(_replay_target)]
Fingerprint = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
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
    payload_contains: Text | None = Field(
        default=None, description="Text in the payload or its repair (its UTF-8 bytes, case-sensitive)."
    )
    fingerprint: Fingerprint | None = Field(default=None, description="Failure group (see stats).")
    topic: TopicName | None = Field(default=None, description="Original topic.")

    @model_validator(mode="after")
    def _ordered_times(self) -> _Filters:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be earlier than until")
        return self

    def _filter(self, ids: list[int], statuses: list[Status]) -> DLQFilter:
        shared = self.model_dump(include=set(_Filters.model_fields))
        return DLQFilter.model_validate(shared | {"ids": ids, "statuses": statuses})


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
    canary: StrictInt | Annotated[str, StringConstraints(max_length=4)] | None = Field(
        default=None,
        description='Replay this many rows first (10, or a percentage: "5%"), wait for the workers\' '
        "outcomes, and replay the rest only if `canary_success` of them were resolved.",
    )
    canary_success: StrictFloat = Field(default=1.0, gt=0, le=1, description="The share that must resolve.")
    canary_timeout_seconds: StrictFloat = Field(default=60.0, gt=0, le=600, description="How long to wait.")

    @field_validator("canary")
    @classmethod
    def _canary_size(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            try:
                CanarySize.parse(value)
            except InvalidOperation as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _narrowed(self) -> RetryAllRequest:
        if self.canary is not None and (self.dry_run or self.to_topic is not None):
            raise ValueError(
                "a canary is for a real replay to the rows' own topics: not with dry_run or to_topic"
            )
        if not self.all and self._filter(self.ids, []).is_empty():
            raise ValueError(
                "refusing to replay without a filter: give at least one of ids, consumer, event_type, "
                "stage, since, until, error_contains, fingerprint, topic — or set all to true"
            )
        return self

    def dlq_filter(self) -> DLQFilter:
        return self._filter(self.ids, self.statuses or ["pending"])


class SimulateRequest(_Filters):
    """Simulate a replay of the rows matching the filters (the same selection as `retry-all`)."""

    ids: list[BodyId] = Field(default_factory=list, max_length=MAX_IDS)
    statuses: list[Status] = Field(default_factory=list, max_length=4)
    limit: StrictInt = Field(ge=1, le=MAX_SIMULATE, description="The most rows to simulate.")
    all: StrictBool = Field(default=False, description="Needed to simulate without any other filter.")
    force: StrictBool = Field(default=False, description="Include resolved or discarded rows.")

    @model_validator(mode="after")
    def _narrowed(self) -> SimulateRequest:
        if not self.all and self._filter(self.ids, []).is_empty():
            raise ValueError("give at least one filter, or set all to true")
        return self

    def dlq_filter(self) -> DLQFilter:
        return self._filter(self.ids, self.statuses or ["pending"])


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    force: StrictBool = Field(default=False, description="Replay a resolved or discarded row too.")
    to_topic: TargetTopic | None = Field(
        default=None, description="Publish here instead of the original topic."
    )


class EditRequest(BaseModel):
    """A repair of a pending row's payload: the whole new `payload`, or a JSON Patch (RFC 6902)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    payload: JsonValue = Field(default=None, description="The whole new payload (a JSON document).")
    patch: list[dict[str, JsonValue]] | None = Field(
        default=None, max_length=100, description="JSON Patch operations, applied to the current payload."
    )
    note: LongText | None = Field(default=None, description="Why (kept for audit).")

    @model_validator(mode="after")
    def _one(self) -> EditRequest:
        if (self.payload is None) == (self.patch is None):
            raise ValueError("give either payload or patch")
        return self


class ResolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    note: LongText | None = Field(default=None, description="Why the row is resolved (kept for audit).")


class CircuitCloseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    consumer: Text | None = Field(
        default=None, description="The consumer group, when circuits of several have the fingerprint."
    )
    for_seconds: StrictInt = Field(
        default=3600,
        ge=1,
        le=30 * 86_400,
        description="How long the failure is dead-lettered instead of holding the line; then the guard "
        "judges it again.",
    )
    note: LongText | None = Field(default=None, description="Why (kept for audit).")


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
    circuits: list[CircuitState] = Field(description="The flood guard's circuits, open ones first.")
    open_by_hour: list[int] = Field(
        description="Open rows (pending, parked, replayed) at the end of each of the last 24 hours, oldest "
        "first, from the rows' own times (rows purged since are not counted)."
    )


class ReplayResponse(BaseModel):
    matched: int = Field(description="Rows the filters matched (at most `limit`).")
    published: int = Field(description="Rows the broker confirmed; they are now `replayed`.")
    failed: int = Field(description="Rows the broker did not confirm; they keep their status.")
    dry_run: bool
    published_ids: list[int]
    failures: dict[str, str] = Field(description="dlq_id → why the broker refused it.")
    canary: dict[str, Any] | None = Field(
        default=None, description="A canary's verdict: rows, outcomes, ratio, required, passed."
    )
    stopped: bool = Field(default=False, description="The canary failed: the other rows were not replayed.")
    outcomes: dict[str, int] | None = Field(
        default=None, description="With a canary: resolved / failed / waiting / not_published so far."
    )


class PredictedRow(BaseModel):
    dlq_id: int
    fingerprint: str = Field(description="The row's error group now.")
    outcome: Literal["apply", "fail", "duplicate", "skip"]
    stage: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    new_fingerprint: str | None = Field(default=None, description="With fail: the new error's group.")


class PredictedGroup(BaseModel):
    fingerprint: str
    rows: int
    outcomes: dict[str, int]
    new_errors: dict[str, int] = Field(description="New fingerprint → rows that would fail with it.")


class PredictedFailure(BaseModel):
    fingerprint: str
    rows: int
    stage: str
    error_type: str
    sample_message: str
    sample_id: int


class SimulationResponse(BaseModel):
    matched: int
    outcomes: dict[str, int] = Field(description="apply / fail / duplicate / skip → rows.")
    groups: list[PredictedGroup]
    failures: list[PredictedFailure]
    rows: list[PredictedRow]
    code: dict[str, Any] = Field(description="The code it ran: version, EVENTHANDLER_HANDLERS, digests.")
    seconds: float


class ResolveResponse(BaseModel):
    dlq_id: int
    status: Status
    changed: bool = Field(description="False when the row was already resolved.")


class Health(BaseModel):
    status: Literal["ok", "ready", "unavailable"]

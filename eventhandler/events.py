"""CloudEvents 1.0 over Kafka: bytes in, a typed `Event` out, or a `DeserializationError` saying why.

Both Kafka bindings are read: structured mode (the whole envelope as JSON in the value) and binary mode
(`ce_*` headers, the value is `data`). The payload of each event type is validated by its own pydantic
model, looked up in the registry of payload models the handlers declare.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from eventhandler.errors import DeserializationError, UnknownEventType
from eventhandler.models import Headers, ReplayOrigin

CE_HEADER_PREFIX = "ce_"
_INT4_MAX, _INT8_MAX = 2**31 - 1, 2**63 - 1
DLQ_ID_HEADER = "eventhandler-dlq-id"
ORIGIN_HEADER = "eventhandler-origin"
REPLAY_COUNT_HEADER = "eventhandler-replay-count"
_MAX_ERROR_DETAILS = 3
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")  # what Kafka allows in a topic's name


class Envelope(BaseModel):
    """The CloudEvents 1.0 context attributes; `data` is validated afterwards by the type's model."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"]
    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    time: AwareDatetime | None = None  # RFC 3339 requires the offset
    subject: str | None = None
    partitionkey: str | None = None  # the CloudEvents Partitioning extension
    datacontenttype: str | None = None
    dataschema: str | None = None
    data: Any = None
    data_base64: str | None = None


_ENVELOPE = TypeAdapter(Envelope)


@dataclass(frozen=True, slots=True)
class Event:
    """A valid event: its CloudEvents attributes and its payload as the type's model."""

    id: str
    source: str
    type: str
    data: BaseModel
    time: datetime | None = None
    subject: str | None = None
    partitionkey: str | None = None


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """`data.value: Input should be a valid number; …` — short enough for a log line and a DLQ row."""
    parts = []
    for error in exc.errors()[:_MAX_ERROR_DETAILS]:
        location = ".".join(str(p) for p in (prefix, *error["loc"]) if p != "")
        parts.append(f"{location or 'event'}: {error['msg']}")
    more = exc.error_count() - _MAX_ERROR_DETAILS
    if more > 0:
        parts.append(f"and {more} more error(s)")
    return "; ".join(parts)


def header_value(headers: Headers | None, name: str) -> bytes | None:
    """The last value of a header (Kafka allows repeats; the last one wins, as in most clients)."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value
    return found


def replay_origin(headers: Headers | None) -> ReplayOrigin | None:
    """The DLQ row a replayed message names (`eventhandler-dlq-id`) and the coordinates of the
    original message (`eventhandler-origin`, "topic:partition:offset"), or None when either is missing
    or malformed: such a message is an ordinary one, and touches no row."""
    raw_id, raw_origin = header_value(headers, DLQ_ID_HEADER), header_value(headers, ORIGIN_HEADER)
    if raw_id is None or raw_origin is None or len(raw_id) > 20 or len(raw_origin) > 300:
        return None
    try:
        topic, partition, offset = raw_origin.decode("ascii").rsplit(":", 2)
        dlq_id = raw_id.decode("ascii")
    except (UnicodeDecodeError, ValueError):
        return None
    # A topic Kafka could not have (a NUL would also fail the batch's own statements, every time).
    if not (dlq_id.isdigit() and partition.isdigit() and offset.isdigit() and _TOPIC.fullmatch(topic)):
        return None
    origin = ReplayOrigin(int(dlq_id), topic, int(partition), int(offset))
    # Beyond the columns' types they match no row, and would fail the statements that look for one.
    if origin.dlq_id > _INT8_MAX or origin.offset > _INT8_MAX or origin.partition > _INT4_MAX:
        return None
    return origin


def origin_header(dlq_id: int, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """The headers a replay adds so the worker can tell the message comes from row `dlq_id`."""
    return [(DLQ_ID_HEADER, str(dlq_id).encode()), (ORIGIN_HEADER, f"{topic}:{partition}:{offset}".encode())]


class Deserializer:
    """Turns a Kafka value and headers into an `Event`, using one payload model per event type."""

    def __init__(self, payload_models: Mapping[str, type[BaseModel]]) -> None:
        self._models = dict(payload_models)
        self._typed = _typed_envelopes(self._models)

    def _fast(self, value: bytes) -> Event | None:
        """One pass over the bytes for a well-formed event of a known type (the common case).

        Anything unusual (an error, data_base64, an unknown type) returns None and takes the careful
        path, which says exactly what is wrong.
        """
        if self._typed is None:
            return None
        try:
            envelope: Any = self._typed.validate_json(value)
        except ValidationError as exc:
            if exc.error_count() == 1:  # not JSON at all: nothing the careful path could add
                first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
                if first["type"] == "json_invalid":
                    raise _not_json(value, first["msg"]) from None
            return None
        if envelope.data_base64 is not None:
            return None
        return Event(
            envelope.id,
            envelope.source,
            envelope.type,
            envelope.data,
            envelope.time,
            envelope.subject,
            envelope.partitionkey,
        )

    def __call__(self, value: bytes | None, headers: Headers | None) -> Event:
        if value is None:
            raise DeserializationError("message value is null (a tombstone), not a CloudEvent", json=False)
        if headers and any(k == "ce_specversion" for k, _ in headers):
            return self._binary(value, headers)
        return self._structured(value)

    def _structured(self, value: bytes) -> Event:
        if not value:
            raise DeserializationError("message value is empty, not a CloudEvent", json=False)
        event = self._fast(value)
        if event is not None:
            return event
        try:
            envelope = _ENVELOPE.validate_json(value)
        except ValidationError as exc:
            raise _envelope_error(exc, value) from None
        if envelope.data_base64 is not None:
            if "data" in envelope.model_fields_set:
                raise DeserializationError(
                    "the envelope has both data and data_base64; CloudEvents allows one"
                )
            try:
                raw = base64.b64decode(envelope.data_base64, validate=True)
            except (binascii.Error, ValueError):
                raise DeserializationError("data_base64 is not valid base64") from None
            return self._event(envelope, raw_data=raw)
        return self._event(envelope, data=envelope.data)

    def _binary(self, value: bytes, headers: Headers) -> Event:
        attributes: dict[str, Any] = {}
        for key, raw in headers:
            lowered = key.lower()
            if lowered == "content-type":
                attributes["datacontenttype"] = _decode_header(key, raw)
            elif lowered.startswith(CE_HEADER_PREFIX):
                attributes[lowered[len(CE_HEADER_PREFIX) :]] = _decode_header(key, raw)
        try:
            envelope = Envelope.model_validate(attributes)
        except ValidationError as exc:
            raise DeserializationError(
                "binary-mode headers: " + describe_validation_error(exc, "ce")
            ) from None
        content_type = (envelope.datacontenttype or "application/json").lower()
        if "json" not in content_type:
            raise DeserializationError(
                f"unsupported datacontenttype {envelope.datacontenttype!r}; expected JSON"
            )
        if not value:
            raise DeserializationError("binary-mode event has an empty value; data must be JSON")
        return self._event(envelope, raw_data=value)

    def _event(self, envelope: Envelope, *, data: Any = None, raw_data: bytes | None = None) -> Event:
        model = self._models.get(envelope.type)
        if model is None:
            raise UnknownEventType(f"no handler for event type {envelope.type!r}")
        try:
            payload = (
                model.model_validate_json(raw_data) if raw_data is not None else model.model_validate(data)
            )
        except ValidationError as exc:
            raise DeserializationError(
                f"{envelope.type} payload invalid: " + describe_validation_error(exc, "data"),
                event_type=envelope.type,
            ) from None
        return Event(
            id=envelope.id,
            source=envelope.source,
            type=envelope.type,
            data=payload,
            time=envelope.time,
            subject=envelope.subject,
            partitionkey=envelope.partitionkey,
        )


def _typed_envelopes(models: Mapping[str, type[BaseModel]]) -> TypeAdapter[Any] | None:
    """A discriminated union of one envelope model per event type, with `data` typed by the type's model."""
    if not models:
        return None
    envelopes: list[Any] = [
        create_model(
            f"Envelope_{index}",
            __base__=Envelope,
            type=(Literal[event_type], ...),  # type: ignore[arg-type]  # built at run time
            data=(model, ...),
        )
        for index, (event_type, model) in enumerate(models.items())
    ]
    if len(envelopes) == 1:
        return TypeAdapter(envelopes[0])
    union: Any = Annotated[Union[tuple(envelopes)], Field(discriminator="type")]  # noqa: UP007
    return TypeAdapter(union)


def _decode_header(key: str, raw: bytes | None) -> str:
    if raw is None:
        raise DeserializationError(f"header {key!r} has no value")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DeserializationError(f"header {key!r} is not valid UTF-8") from None


def _not_json(value: bytes, reason: str) -> DeserializationError:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return DeserializationError("message value is not valid UTF-8", json=False)
    reason = reason.removeprefix("Invalid JSON: ")
    return DeserializationError(f"message value is not valid JSON: {reason}", json=False)


def _envelope_error(exc: ValidationError, value: bytes) -> DeserializationError:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return _not_json(value, first["msg"])
    if first["type"] in ("model_type", "model_attributes_type", "dict_type"):
        kind = _json_kind(value)
        return DeserializationError(f"message value is JSON {kind}, not a CloudEvent object", json=False)
    return DeserializationError("not a CloudEvent: " + describe_validation_error(exc))


def _json_kind(value: bytes) -> str:
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return "of an unexpected shape"
    names = {
        list: "array",
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
        type(None): "null",
    }
    return names.get(type(parsed), "value")

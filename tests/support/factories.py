"""Builders of test records."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from eventhandler.models import FailedMessage
from tests.support.kafka import structured

_offsets = itertools.count(1)


def failed_message(**overrides: Any) -> FailedMessage:
    values: dict[str, Any] = {
        "consumer": "group-a",
        "topic": "device-events",
        "partition": 0,
        "offset": next(_offsets),
        "timestamp": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "key": b"dev-1",
        "value": b'{"specversion":"1.0"}',
        "headers": [("ce_type", b"device.reading")],
        "stage": "handler",
        "error_type": "HandlerFailure",
        "error_message": "device 'dev-1' is not registered",
        "traceback": "Traceback (most recent call last): ...",
        "event_id": "evt-1",
        "event_type": "device.reading",
        "event_source": "/tests",
        "worker_version": "test",
    }
    values.update(overrides)
    return FailedMessage(**values)


def failed_event(event: dict[str, Any], **overrides: Any) -> FailedMessage:
    """The failure of a CloudEvent sent in structured mode (`tests.support.kafka`), with its identity."""
    return failed_message(
        **{
            "value": structured(event),
            "event_id": event["id"],
            "event_source": event["source"],
            "event_type": event["type"],
        }
        | overrides
    )

"""What operators type to pick DLQ rows: times and ages (`2h`, an ISO 8601 time), durations, and the
topics a replay may not publish to.

Below the filter model, the service, the command line and the admin API alike, so that each of them
reads these words the same way; it imports nothing of eventhandler.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `2h`, `7d`, `1w` → seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30m, 2h or 7d")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC if no offset is given) or an age such as `2h` (meaning 2 hours ago)."""
    try:
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(text))
    except OverflowError:
        raise ValueError(f"{text!r} reaches too far back") from None
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is neither an ISO 8601 time nor an age like 2h") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def replay_target_problem(topic: str | None) -> str | None:
    """Why a replay may not publish to `topic` (None: it may)."""
    if topic is not None and topic.startswith("_"):  # __consumer_offsets, _schemas, _confluent-…
        return f"{topic!r} is one of Kafka's internal topics; a replay never publishes there"
    return None


def _time(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_time(value)
        except (ValueError, OverflowError) as exc:
            message = str(exc) if isinstance(exc, ValueError) else f"{value!r} is out of range"
            raise ValueError(message) from None
    return value


# A time bound as an operator gives it, a datetime once validated.
TimeBound = Annotated[
    datetime,
    BeforeValidator(_time),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "string", "pattern": _DURATION.pattern},  # what `parse_duration` takes
            ],
            "description": "An ISO 8601 time (UTC without an offset) or an age: 90s, 15m, 2h, 7d.",
        }
    ),
]

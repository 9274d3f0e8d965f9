"""What the console's templates show, computed here: ages, the depth table, a payload as pretty JSON,
text or a hex dump."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from eventhandler.models import STATUSES, Stats
from eventhandler.redaction import View

HEX_BYTES = 4096  # a hex dump shows the first 4 KiB (a 10 MB value is not a page)
TEXT_CHARS = 200_000


def age(moment: datetime | float | None) -> str:
    """`3m`, `2h`, `5d`: since a moment, or a number of seconds."""
    if moment is None:
        return "-"
    seconds = moment if isinstance(moment, int | float) else (datetime.now(UTC) - moment).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class Depth:
    consumer: str
    counts: dict[str, int]
    oldest_pending: float | None


def depth_table(stats: Stats) -> list[Depth]:
    """Rows by consumer and status, with each consumer's oldest pending age."""
    table: dict[str, Depth] = {}
    for consumer, status, count in stats.by_consumer:
        name = consumer or "-"
        row = table.setdefault(name, Depth(name, dict.fromkeys(STATUSES, 0), None))
        row.counts[status] = count
    for consumer, seconds in stats.oldest_pending_age_seconds.items():
        if consumer in table:
            table[consumer].oldest_pending = seconds
    return sorted(table.values(), key=lambda d: d.consumer)


@dataclass
class Shown:
    kind: str  # json, text, hex, withheld, null
    text: str
    size: int
    cut: bool = False


def payload(view: View, edited: bool = False) -> Shown:
    """The payload (or its repair) as the redactor's view renders it."""
    shown = view.edited if edited else view.payload
    raw = view.entry.edited_payload if edited else view.entry.event_payload
    size = len(raw or b"")
    if shown is None or shown.encoding is None:
        return Shown("null", "(null value: a tombstone)", 0)
    if shown.encoding == "withheld":
        return Shown("withheld", "(withheld: not JSON, so its fields cannot be redacted)", size)
    if shown.encoding == "json":
        text, cut = _indented(shown.document)
        return Shown("json", text, size, cut)
    data = raw or b""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Shown("hex", hex_dump(data[:HEX_BYTES]), size, len(data) > HEX_BYTES)
    if any(ord(c) < 32 and c not in "\n\r\t" for c in text[:TEXT_CHARS]):
        return Shown("hex", hex_dump(data[:HEX_BYTES]), size, len(data) > HEX_BYTES)
    return Shown("text", text[:TEXT_CHARS], size, len(text) > TEXT_CHARS)


def _indented(document: Any) -> tuple[str, bool]:
    """The document as indented JSON, encoded piece by piece and stopped at `TEXT_CHARS`: indentation
    grows with depth, so a deep 10 MB document would otherwise be gigabytes of text first."""
    pieces, length = [], 0
    for piece in json.JSONEncoder(indent=2, ensure_ascii=False).iterencode(document):
        pieces.append(piece)
        length += len(piece)
        if length > TEXT_CHARS:
            return "".join(pieces)[:TEXT_CHARS], True
    return "".join(pieces), False


def hex_dump(data: bytes) -> str:
    """`offset  16 bytes in hex  |printable|`, as `hexdump -C` prints it."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {hexes:<47}  |{text}|")
    return "\n".join(lines)


def diff_lines(diff: list[dict[str, Any]] | None) -> list[str]:
    if diff is None:
        return ["(not shown: a side is not JSON, or too large)"]
    return [
        f"{op['op']} {op['path']}"
        + (f" from {op['from']}" if "from" in op else "")
        + (f" {json.dumps(op['value'], ensure_ascii=False)}" if "value" in op else "")
        for op in diff
    ]


@dataclass
class Spark:
    points: str
    total: int
    peak: int


def spark(values: list[int], width: int = 96, height: int = 22) -> Spark:
    """A group's last 24 hours as a small line's points (the template draws it)."""
    top = max([*values, 1])
    step = width / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values)
    )
    return Spark(points, sum(values), max(values, default=0))


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    hours_ago: int
    value: int


def bars(
    values: list[int], width: int = 720, height: int = 160, left: int = 44, bottom: int = 20
) -> list[Bar]:
    """Open rows at the end of each of the last 24 hours as bars (the template draws them)."""
    top, slot = max([*values, 1]), (width - left) / max(len(values), 1)
    found = []
    for i, value in enumerate(values):
        tall = (value / top) * (height - bottom - 8)
        found.append(
            Bar(left + i * slot + 1, height - bottom - tall, slot - 2, tall, len(values) - 1 - i, value)
        )
    return found


FILTERS: dict[str, Any] = {"age": age, "when": when, "spark": spark, "bars": bars}

"""How DLQ rows and reports look on a terminal (rich tables), and a row's bytes in the CLI's JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from eventhandler.librdkafka import shown_header_key
from eventhandler.models import CircuitState, DLQDetail, DLQEntry, DLQSummary, Stats
from eventhandler.simulate import OUTCOMES, Simulation


def make_console(*, stderr: bool = False) -> Console:
    """A console for people: the terminal's width, or a wide one when output goes to a pipe or file."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


def payload_text(payload: bytes | None) -> tuple[str, str]:
    """(kind, text): the payload as pretty JSON when it is JSON, else as escaped bytes."""
    if payload is None:
        return "null", "(null value: a tombstone)"
    try:
        return "json", json.dumps(json.loads(payload.decode("utf-8")), indent=2, ensure_ascii=False)
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes", repr(payload)[2:-1]
    return "text", text.encode("unicode_escape").decode("ascii") if "\x00" in text else text


def _age(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def rows_table(rows: Sequence[DLQSummary]) -> Table:
    table = Table(show_lines=False, header_style="bold")
    for column in (
        "id",
        "status",
        "stage",
        "event type",
        "topic[part]@offset",
        "retries",
        "last failed",
        "error",
    ):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            str(row.dlq_id),
            status_text(row),
            row.stage,
            row.event_type or "-",
            f"{row.source_topic}[{row.source_partition}]@{row.source_offset}",
            str(row.retry_count),
            _age(row.last_failed_at),
            _short(row.error_message),
        )
    return table


def status_text(row: DLQSummary) -> str:
    """A row's status, and its place in its key's line: "parked behind #431", "pending, 12 parked"."""
    if row.status == "parked" and row.blocked_by is not None:
        return f"parked behind #{row.blocked_by}"
    if row.parked_behind:
        return f"{row.status}, {row.parked_behind} parked"
    return row.status


def print_entry(console: Console, entry: DLQEntry, diff: list[dict[str, Any]] | None = None) -> None:
    fields: list[tuple[str, Any]] = [
        ("dlq_id", entry.dlq_id),
        ("status", status_text(entry)),
        ("consumer", entry.consumer),
        ("stage", entry.stage),
        ("event id", entry.event_id),
        ("event type", entry.event_type),
        ("event source", entry.event_source),
        ("origin", f"{entry.source_topic}[{entry.source_partition}]@{entry.source_offset}"),
        ("message time", entry.message_timestamp),
        ("key", repr(entry.message_key)),
        ("first failed", entry.failed_at),
        ("last failed", entry.last_failed_at),
        ("failures", entry.failure_count),
        ("retries", entry.retry_count),
        ("replays", entry.replay_count),
        ("last replayed", entry.last_replayed_at),
        ("replayed to", entry.replayed_to_topic),
        ("resolved", f"{entry.resolved_at} by {entry.resolved_by}" if entry.resolved_at else None),
        ("note", entry.resolution_note),
        ("fingerprint", entry.fingerprint),
        ("worker version", entry.worker_version),
    ]
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in fields:
        if value is not None:
            table.add_row(name, str(value))
    console.print(table)
    console.print("[bold]headers[/bold]")
    for key, value in entry.headers:
        console.print(f"  {shown_header_key(key)}: {value!r}", markup=False, highlight=False)
    console.print(f"[bold]error[/bold] {entry.error_type}: ", end="")
    console.print(entry.error_message, markup=False, highlight=False)
    if entry.error_traceback:
        console.print("[bold]traceback[/bold]")
        console.print(entry.error_traceback, markup=False, highlight=False)
    kind, text = payload_text(entry.event_payload)
    console.print(f"[bold]payload[/bold] ({kind}, {entry.payload_size or 0} bytes)")
    console.print(_cut(text), markup=False, highlight=False)
    if entry.edited_payload is not None:
        kind, text = payload_text(entry.edited_payload)
        console.print(f"[bold]repaired payload[/bold] ({kind}; replayed instead of the original)")
        console.print(f"  by {entry.edited_by} at {entry.edited_at}", markup=False, highlight=False)
        console.print(_cut(text), markup=False, highlight=False)
        print_diff(console, diff)


def print_diff(console: Console, diff: list[dict[str, Any]] | None) -> None:
    """A repair's JSON Patch, an operation a line."""
    if diff is None:
        console.print("[bold]diff[/bold] (not shown: a side is not JSON, or too large)")
        return
    console.print(f"[bold]diff[/bold] ({len(diff)} change{'s' if len(diff) != 1 else ''})")
    for operation in diff:
        value = f" {json.dumps(operation['value'], ensure_ascii=False)}" if "value" in operation else ""
        source = f" from {operation['from']}" if "from" in operation else ""
        console.print(
            f"  {operation['op']} {operation['path']}{source}{value}", markup=False, highlight=False
        )


def _cut(text: str) -> str:
    return text if len(text) < 20_000 else text[:20_000] + "\n… (truncated)"


def row_json(detail: DLQDetail, entry: DLQEntry) -> dict[str, Any]:
    """`dlq show --json`: the row the admin API gives (`detail`), but with its bytes — payload, key,
    header keys and values — as the text a person reads at a terminal (`\\xff` for a byte that is
    not UTF-8, the payload pretty-printed), from `entry`, the same redacted view. The payload says
    its own kind, so the API's `payload_encoding` is left out."""
    data = detail.model_dump(
        mode="json", exclude={"payload", "payload_encoding", "key", "key_encoding", "headers"}
    )
    kind, text = payload_text(entry.event_payload)
    data["payload"] = {"kind": kind, "text": text}
    if entry.edited_payload is not None:
        kind, text = payload_text(entry.edited_payload)
        data["edited_payload"] = {"kind": kind, "text": text}
    data.pop("edited_payload_encoding", None)
    data["key"] = _escaped(entry.message_key)
    data["headers"] = [[shown_header_key(key), _escaped(value)] for key, value in entry.headers]
    return data


def _escaped(raw: bytes | None) -> str | None:
    return None if raw is None else repr(raw)[2:-1]


def print_stats(console: Console, stats: Stats) -> None:
    console.print(
        f"[bold]{stats.total}[/bold] rows: "
        + ", ".join(f"{s} {n}" for s, n in sorted(stats.by_status.items()))
    )
    for title, items in (
        ("consumer", stats.by_consumer),
        ("stage", stats.by_stage),
        ("event type", stats.by_event_type),
    ):
        table = Table(title=f"by {title}", title_justify="left", header_style="bold")
        table.add_column(title)
        table.add_column("status")
        table.add_column("rows", justify="right")
        for key, status, count in items:
            table.add_row(key or "-", status, str(count))
        console.print(table)
    for consumer, age in sorted(stats.oldest_pending_age_seconds.items()):
        console.print(f"oldest pending for {consumer}: {age:.0f}s")
    table = Table(title="top error groups", title_justify="left", header_style="bold")
    for column in ("fingerprint", "rows", "stage", "error", "first seen", "last seen"):
        table.add_column(column, overflow="fold")
    for group in stats.top_groups:
        table.add_row(
            group.fingerprint,
            str(group.count),
            group.stage,
            _short(f"{group.error_type}: {group.sample_message}", 70),
            _age(group.first_seen),
            _age(group.last_seen),
        )
    console.print(table)
    if stats.circuits:
        console.print(circuits_table(stats.circuits))


def circuits_table(circuits: Sequence[CircuitState]) -> Table:
    """The flood guard's circuits: open ones say since when and what judged them."""
    table = Table(title="flood guard circuits", title_justify="left", header_style="bold")
    for column in ("fingerprint", "consumer", "state", "since", "failure", "judged on", "closed by"):
        table.add_column(column, overflow="fold")
    for c in circuits:
        error = c.error_type if c.error_message is None else f"{c.error_type}: {c.error_message}"
        if c.state == "open":
            state, since = "[bold red]open[/bold red]", _age(c.opened_at)
        else:
            until = (
                f", dead-lettered until {c.dead_letter_until:%Y-%m-%d %H:%M}Z" if c.dead_letter_until else ""
            )
            state, since = f"closed{until}", _age(c.closed_at)
        table.add_row(
            c.fingerprint,
            c.consumer,
            state,
            since,
            _short(f"{c.stage} {error}", 70),
            f"{c.failures} of {c.messages} messages, {c.distinct_keys}+ keys; {c.trials} trial(s)",
            c.closed_by or "",
        )
    return table


def print_simulation(console: Console, simulation: Simulation) -> None:
    """A simulated replay: the outcome per error group, then the failures a replay would meet."""
    groups = Table(title="what a replay would do, by error group", header_style="bold")
    for column in ("fingerprint", "rows", "apply", "fail", "duplicate", "skip"):
        groups.add_column(column, justify="left" if column == "fingerprint" else "right")
    for group in simulation.groups():
        groups.add_row(group.fingerprint, str(group.rows), *(str(group.outcomes[o]) for o in OUTCOMES))
    console.print(groups)
    failures = simulation.failures()
    if failures:
        table = Table(title="the failures it would meet", header_style="bold")
        for column in ("new fingerprint", "rows", "stage", "error type", "sample (row)"):
            table.add_column(column, overflow="fold")
        for failure in failures:
            table.add_row(
                failure["fingerprint"],
                str(failure["rows"]),
                failure["stage"],
                escape(failure["error_type"]),
                Text(f"{_short(failure['sample_message'], 90)} ({failure['sample_id']})"),
            )
        console.print(table)
    outcomes = simulation.outcomes
    code = simulation.code
    console.print(
        f"simulated {simulation.matched} rows in {simulation.seconds:.2f} s (rolled back; nothing "
        f"published): {outcomes['apply']} would apply, {outcomes['fail']} would fail again, "
        f"{outcomes['duplicate']} already applied, {outcomes['skip']} skipped",
        markup=False,
    )
    handlers = ", ".join(code["handlers"]) or "(the built-in example only)"
    line = f"code: eventhandler {code['eventhandler']}; EVENTHANDLER_HANDLERS: {handlers}"
    console.print(line, markup=False)

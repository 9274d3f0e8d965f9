"""`eventhandler replay` and `eventhandler dlq …`: the operator's side of the dead letter queue."""

from __future__ import annotations

import getpass
import json
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import structlog
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from eventhandler.app import build_service
from eventhandler.commandline import settings_or_exit
from eventhandler.errors import EventHandlerError
from eventhandler.models import STAGES, STATUSES, DLQFilter
from eventhandler.render import entry_json, make_console, print_entry, print_stats, rows_table
from eventhandler.service import DLQService, parse_duration, parse_time

dlq_app = typer.Typer(help="Inspect and change the dead letter queue.", no_args_is_help=True)

CONFIRM_ABOVE = 10  # acting on more rows than this asks first (unless --yes)

IdsOpt = Annotated[list[int] | None, typer.Option("--id", help="A DLQ row id (repeatable).", min=1)]
ConsumerOpt = Annotated[str | None, typer.Option(help="Consumer group.")]
EventTypeOpt = Annotated[
    str | None, typer.Option("--event-type", help="CloudEvents type, e.g. device.reading.")
]
StageOpt = Annotated[str | None, typer.Option(help="Failure stage: deserialize, handler or projection.")]
SinceOpt = Annotated[
    str | None, typer.Option(help="Last failed at or after: ISO 8601 time or an age (2h, 7d).")
]
UntilOpt = Annotated[str | None, typer.Option(help="Last failed before: ISO 8601 time or an age.")]
ErrorOpt = Annotated[
    str | None, typer.Option("--error-contains", help="Error message contains (case-insensitive).")
]
FingerprintOpt = Annotated[str | None, typer.Option(help="Error group fingerprint (see `dlq stats`).")]
TopicOpt = Annotated[str | None, typer.Option(help="Original topic.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
ActorOpt = Annotated[
    str | None, typer.Option(help="Who is acting, for the audit log (default: your user name).")
]
NoteOpt = Annotated[str | None, typer.Option(help="Why, for the audit log.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def make_filter(
    ids: list[int] | None,
    consumer: str | None,
    event_type: str | None,
    stage: str | None,
    statuses: list[str] | None,
    since: str | None,
    until: str | None,
    error_contains: str | None,
    fingerprint: str | None,
    topic: str | None,
) -> DLQFilter:
    """A filter from command-line values; a bad value exits with one line naming the option."""
    if stage is not None and stage not in STAGES:
        raise _fail(f"--stage must be one of {', '.join(STAGES)} (got {stage!r})", 2)
    for status in statuses or ():
        if status not in STATUSES:
            raise _fail(f"--status must be one of {', '.join(STATUSES)} (got {status!r})", 2)
    try:
        since_at = parse_time(since) if since else None
        until_at = parse_time(until) if until else None
    except ValueError as exc:
        raise _fail(f"--since/--until: {exc}", 2) from None
    return DLQFilter.model_validate(
        {
            "ids": tuple(ids or ()),
            "consumer": consumer,
            "event_type": event_type,
            "stage": stage,
            "statuses": tuple(statuses or ()),
            "since": since_at,
            "until": until_at,
            "error_contains": error_contains,
            "fingerprint": fingerprint,
            "topic": topic,
        }
    )


@contextmanager
def service() -> Iterator[DLQService]:
    settings = settings_or_exit()
    svc, pool = build_service(settings)
    # what the audit rows of this run name as its request and its client
    structlog.contextvars.bind_contextvars(request_id=uuid.uuid4().hex, client=_client())
    try:
        yield svc
    except EventHandlerError as exc:
        raise _fail(str(exc)) from None
    finally:
        pool.close()


def _client() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def actor_name(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def confirm(what: str, count: int, yes: bool) -> None:
    if yes or count <= CONFIRM_ABOVE:
        return
    if not sys.stdin.isatty():
        raise _fail(f"refusing to {what} {count} rows without --yes (no terminal to ask on)")
    if not typer.confirm(f"{what} {count} rows?"):
        raise _fail("cancelled", 1)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# -- replay -------------------------------------------------------------------------------------------


def replay(
    ids: IdsOpt = None,
    consumer: ConsumerOpt = None,
    event_type: EventTypeOpt = None,
    stage: StageOpt = None,
    status: Annotated[
        list[str] | None, typer.Option(help="Row status (repeatable). Default: pending.")
    ] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    error_contains: ErrorOpt = None,
    fingerprint: FingerprintOpt = None,
    topic: TopicOpt = None,
    limit: Annotated[int | None, typer.Option(help="Replay at most this many rows.", min=1)] = None,
    to_topic: Annotated[
        str | None, typer.Option("--to-topic", help="Publish here instead of the original topic.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count and list what would be replayed; change nothing.")
    ] = False,
    rate: Annotated[float | None, typer.Option(help="Messages per second at most.", min=0.01)] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Allow resolved and discarded rows (with --status).")
    ] = False,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
    actor: ActorOpt = None,
) -> None:
    """Republish DLQ rows to their original topic (or --to-topic), byte for byte."""
    flt = make_filter(
        ids,
        consumer,
        event_type,
        stage,
        status or ["pending"],
        since,
        until,
        error_contains,
        fingerprint,
        topic,
    )
    console = make_console(stderr=as_json)
    with service() as svc:
        flt = svc.replayable(svc.readable_filter(flt, reader=False), force=force, to_topic=to_topic)
        if ids:
            svc.require_ids(ids)
        matched = svc.count(flt)
        matched = min(matched, limit) if limit else matched
        if dry_run:
            rows = svc.list_rows(flt, limit=min(matched, 1000) or 1)[:matched]
            if as_json:
                _print_json({"matched": matched, "dry_run": True, "ids": [r.dlq_id for r in rows]})
            else:
                console.print(rows_table(rows))
                console.print(
                    f"dry run: {matched} rows would be replayed" + (f" to {to_topic}" if to_topic else "")
                )
            return
        if matched == 0:
            if as_json:
                _print_json({"matched": 0, "published": 0, "failed": 0})
            else:
                console.print("nothing to replay: no row matches")
            return
        confirm("replay", matched, yes)
        show_bar = console.is_terminal and not as_json
        with Progress(
            TextColumn("replaying"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not show_bar,
        ) as bar:
            task = bar.add_task("replay", total=matched)
            report = svc.replay(
                flt,
                actor=actor_name(actor),
                limit=limit,
                to_topic=to_topic,
                rate=rate,
                force=force,
                progress=lambda n: bar.advance(task, n),
            )
    if as_json:
        _print_json(report.as_dict())
    else:
        console.print(f"matched {report.matched}, published {report.published}, failed {report.failed}")
        for dlq_id, why in list(report.failures.items())[:20]:
            console.print(f"  not published: {dlq_id}: {why}", markup=False)
    if report.failed:
        raise typer.Exit(1)


# -- dlq ------------------------------------------------------------------------------------------------


@dlq_app.command("list")
def list_rows(
    ids: IdsOpt = None,
    consumer: ConsumerOpt = None,
    event_type: EventTypeOpt = None,
    stage: StageOpt = None,
    status: Annotated[list[str] | None, typer.Option(help="Row status (repeatable). Default: all.")] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    error_contains: ErrorOpt = None,
    fingerprint: FingerprintOpt = None,
    topic: TopicOpt = None,
    limit: Annotated[int, typer.Option(help="Rows per page.", min=1, max=10_000)] = 50,
    after: Annotated[int | None, typer.Option(help="Show rows after this id (the next page).", min=0)] = None,
    as_json: JsonOpt = False,
) -> None:
    """List DLQ rows, oldest first."""
    flt = make_filter(
        ids, consumer, event_type, stage, status, since, until, error_contains, fingerprint, topic
    )
    with service() as svc:
        flt = svc.readable_filter(flt, reader=False)
        rows = svc.list_rows(flt, limit=limit, after_id=after)
        total = svc.count(flt)
    if as_json:
        _print_json(
            {
                "total": total,
                "items": [r.model_dump(mode="json") for r in rows],
                "next_after": rows[-1].dlq_id if len(rows) == limit else None,
            }
        )
        return
    console = make_console()
    console.print(rows_table(rows))
    more = f"; next page: --after {rows[-1].dlq_id}" if len(rows) == limit and total > len(rows) else ""
    console.print(f"{len(rows)} of {total} matching rows{more}")


@dlq_app.command()
def show(
    dlq_id: Annotated[int, typer.Argument(help="The DLQ row id.", min=1)], as_json: JsonOpt = False
) -> None:
    """Everything about one row: metadata, headers, error and traceback, payload."""
    with service() as svc:
        entry = svc.view(dlq_id).entry  # redacted as the API shows it
    if as_json:
        _print_json(entry_json(entry))
    else:
        print_entry(make_console(), entry)


@dlq_app.command()
def stats(
    consumer: ConsumerOpt = None,
    event_type: EventTypeOpt = None,
    stage: StageOpt = None,
    status: Annotated[list[str] | None, typer.Option(help="Row status (repeatable).")] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    top: Annotated[int, typer.Option(help="How many error groups to show.", min=1, max=1000)] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Depth by consumer, stage, event type and status; the oldest pending row; the top error groups."""
    flt = make_filter(None, consumer, event_type, stage, status, since, until, None, None, None)
    with service() as svc:
        result = svc.stats(flt, top=top)
    if as_json:
        _print_json(result.as_dict())
    else:
        print_stats(make_console(), result)


def _change(
    action: str, ids: list[int], yes: bool, actor: str | None, note: str | None, as_json: bool
) -> None:
    confirm(action, len(ids), yes)
    with service() as svc:
        if action == "resolve":
            changed = svc.resolve(ids, actor=actor_name(actor), note=note)
        elif action == "discard":
            changed = svc.discard(ids, actor=actor_name(actor), note=note)
        else:
            changed = svc.delete(ids, actor=actor_name(actor))
    skipped = sorted(set(ids) - set(changed))
    if as_json:
        _print_json({"action": action, "changed": changed, "unchanged": skipped})
        return
    typer.echo(f"{action}: {len(changed)} row(s)" + (f": {', '.join(map(str, changed))}" if changed else ""))
    if skipped:
        typer.echo(f"unchanged (already resolved or discarded): {', '.join(map(str, skipped))}")


IdsArg = Annotated[list[int], typer.Argument(help="DLQ row ids.", min=1)]


@dlq_app.command()
def resolve(
    ids: IdsArg, note: NoteOpt = None, actor: ActorOpt = None, yes: YesOpt = False, as_json: JsonOpt = False
) -> None:
    """Mark rows resolved (their cause was dealt with some other way)."""
    _change("resolve", ids, yes, actor, note, as_json)


@dlq_app.command()
def discard(
    ids: IdsArg, note: NoteOpt = None, actor: ActorOpt = None, yes: YesOpt = False, as_json: JsonOpt = False
) -> None:
    """Give up on rows: kept for the record, never replayed by default."""
    _change("discard", ids, yes, actor, note, as_json)


@dlq_app.command()
def delete(ids: IdsArg, actor: ActorOpt = None, yes: YesOpt = False, as_json: JsonOpt = False) -> None:
    """Delete rows for good."""
    _change("delete", ids, yes, actor, None, as_json)


@dlq_app.command()
def purge(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age of the last change, e.g. 30d.")
    ] = "30d",
    consumer: ConsumerOpt = None,
    actor: ActorOpt = None,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete resolved and discarded rows last changed longer ago than --older-than. Never pending ones."""
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise _fail(f"--older-than: {exc}", 2) from None
    if not yes and not sys.stdin.isatty():
        raise _fail("refusing to purge without --yes (no terminal to ask on)")
    if not yes and not typer.confirm(f"delete resolved and discarded rows older than {older_than}?"):
        raise _fail("cancelled")
    with service() as svc:
        deleted = svc.purge(older_than_seconds=seconds, actor=actor_name(actor), consumer=consumer)
    if as_json:
        _print_json({"deleted": len(deleted), "ids": deleted})
    else:
        typer.echo(f"purged {len(deleted)} row(s)")

"""`eventhandler dlq …`: inspect and change the dead letter queue from a shell."""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import typer

from eventhandler.cli.edit import edit
from eventhandler.cli.render import make_console, print_entry, print_stats, row_json, rows_table
from eventhandler.cli.settings import fail
from eventhandler.cli.shared import (
    ActorOpt,
    ConsumerOpt,
    ErrorOpt,
    EventTypeOpt,
    FingerprintOpt,
    IdsOpt,
    JsonOpt,
    NoteOpt,
    PayloadOpt,
    SinceOpt,
    StageOpt,
    TopicOpt,
    UntilOpt,
    YesOpt,
    actor_name,
    confirm,
    dlq_filter,
    print_json,
    service,
)
from eventhandler.detail import row_detail
from eventhandler.filters import parse_duration
from eventhandler.models import DLQFilter

dlq_app = typer.Typer(help="Inspect and change the dead letter queue.", no_args_is_help=True)

IdsArg = Annotated[list[int], typer.Argument(help="DLQ row ids.", min=1)]


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
    payload_contains: PayloadOpt = None,
    fingerprint: FingerprintOpt = None,
    topic: TopicOpt = None,
    limit: Annotated[int, typer.Option(help="Rows per page.", min=1, max=10_000)] = 50,
    after: Annotated[int | None, typer.Option(help="Show rows after this id (the next page).", min=0)] = None,
    as_json: JsonOpt = False,
) -> None:
    """List DLQ rows, oldest first."""
    flt = dlq_filter(
        ids=ids,
        consumer=consumer,
        event_type=event_type,
        stage=stage,
        statuses=status,
        since=since,
        until=until,
        error_contains=error_contains,
        payload_contains=payload_contains,
        fingerprint=fingerprint,
        topic=topic,
    )
    with service() as svc:
        flt = svc.readable_filter(flt, reader=False)
        rows = svc.list_rows(flt, limit=limit, after_id=after)
        total = svc.count(flt)
    if as_json:
        print_json(
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
        view = svc.view(dlq_id)  # redacted as the API shows it
    if as_json:
        print_json(row_json(row_detail(view), view.entry))
    else:
        print_entry(make_console(), view.entry, view.diff)


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
    flt = dlq_filter(
        consumer=consumer, event_type=event_type, stage=stage, statuses=status, since=since, until=until
    )
    with service() as svc:
        result = svc.stats(flt, top=top)
    if as_json:
        print_json(result.as_dict())
    else:
        print_stats(make_console(), result)


Change = Literal["resolve", "discard", "delete"]


def _change(
    action: Change, ids: list[int], yes: bool, actor: str | None, note: str | None, as_json: bool
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
        left = svc.list_rows(DLQFilter(ids=tuple(skipped)), limit=len(skipped)) if skipped else []
    # what a resolve or discard takes: a row still pending or replayed was held back by a replay's claim
    replaying = [row.dlq_id for row in left if row.status in ("pending", "replayed")]
    closed = [row.dlq_id for row in left if row.status in ("resolved", "discarded")]
    parked = [row.dlq_id for row in left if row.status == "parked"]
    if as_json:
        print_json({"action": action, "changed": changed, "unchanged": skipped, "being_replayed": replaying})
        return
    typer.echo(f"{action}: {len(changed)} row(s)" + (f": {', '.join(map(str, changed))}" if changed else ""))
    if closed:
        typer.echo(f"unchanged (already resolved or discarded): {', '.join(map(str, closed))}")
    if replaying:
        typer.echo(
            f"unchanged (being replayed; try again once it is marked): {', '.join(map(str, replaying))}"
        )
    if parked:
        typer.echo(f"unchanged (parked behind an open failure of its key): {', '.join(map(str, parked))}")


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
        fail(f"--older-than: {exc}", 2)
    if not yes and not sys.stdin.isatty():
        fail("refusing to purge without --yes (no terminal to ask on)")
    if not yes and not typer.confirm(f"delete resolved and discarded rows older than {older_than}?"):
        fail("cancelled")
    with service() as svc:
        deleted = svc.purge(older_than_seconds=seconds, actor=actor_name(actor), consumer=consumer)
    if as_json:
        print_json({"deleted": len(deleted), "ids": deleted})
    else:
        typer.echo(f"purged {len(deleted)} row(s)")


dlq_app.command(help="Repair a pending row's payload (kept beside the original): $EDITOR, --set, --patch.")(
    edit
)

"""`eventhandler replay`: republish DLQ rows to their original topic (or `--to-topic`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from eventhandler.canary import Canary, CanarySize, Outcomes
from eventhandler.cli.render import make_console, print_simulation, rows_table
from eventhandler.cli.settings import fail
from eventhandler.cli.shared import (
    ActorOpt,
    ConsumerOpt,
    ErrorOpt,
    EventTypeOpt,
    FingerprintOpt,
    IdsOpt,
    JsonOpt,
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
from eventhandler.replay import ReplayReport

DRY_RUN_ROWS = 1000  # a dry run lists at most this many rows
WOULD_FAIL = 3  # the exit status of a simulation that predicts failures
CANARY_STOPPED = 4  # the exit status of a replay its canary stopped


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
    payload_contains: PayloadOpt = None,
    fingerprint: FingerprintOpt = None,
    topic: TopicOpt = None,
    limit: Annotated[int | None, typer.Option(help="Replay at most this many rows.", min=1)] = None,
    to_topic: Annotated[
        str | None, typer.Option("--to-topic", help="Publish here instead of the original topic.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count and list what would be replayed; change nothing.")
    ] = False,
    simulate: Annotated[
        bool,
        typer.Option(
            "--simulate",
            help="Run the current handlers on the rows in a transaction that is rolled back and "
            "report what a replay would do; publish and change nothing. Exit 3: some would fail.",
        ),
    ] = False,
    canary: Annotated[
        str | None,
        typer.Option(
            "--canary",
            metavar="N|N%",
            help="Replay these first (rows or a percentage), wait for the workers' outcomes, and go on "
            "only if --canary-success of them resolve. Exit 4: the canary stopped the replay.",
        ),
    ] = None,
    canary_success: Annotated[
        float,
        typer.Option(
            "--canary-success", help="The share of canary rows that must resolve.", min=0.0001, max=1
        ),
    ] = 1.0,
    canary_timeout: Annotated[
        float,
        typer.Option("--canary-timeout", help="Seconds to wait for the canary's outcomes.", min=1, max=3600),
    ] = 60.0,
    rate: Annotated[float | None, typer.Option(help="Messages per second at most.", min=0.01)] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Allow resolved and discarded rows (with --status).")
    ] = False,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
    actor: ActorOpt = None,
) -> None:
    """Republish DLQ rows to their original topic (or --to-topic), byte for byte."""
    flt = dlq_filter(
        ids=ids,
        consumer=consumer,
        event_type=event_type,
        stage=stage,
        statuses=status or ["pending"],
        since=since,
        until=until,
        error_contains=error_contains,
        payload_contains=payload_contains,
        fingerprint=fingerprint,
        topic=topic,
    )
    console = make_console(stderr=as_json)
    with service() as svc:
        flt = svc.readable_filter(flt, reader=False)
        if simulate:
            simulation = svc.simulate(flt, actor=actor_name(actor), limit=limit, force=force)
            if as_json:
                print_json(simulation.as_dict())
            else:
                print_simulation(console, simulation)
            if simulation.outcomes["fail"]:
                raise typer.Exit(WOULD_FAIL)
            return
        plan = svc.preview(
            flt, limit=limit, to_topic=to_topic, force=force, rows=DRY_RUN_ROWS if dry_run else 0
        )
        if dry_run:
            if as_json:
                print_json({"matched": plan.matched, "dry_run": True, "ids": [r.dlq_id for r in plan.rows]})
            else:
                console.print(rows_table(plan.rows))
                console.print(
                    f"dry run: {plan.matched} rows would be replayed"
                    + (f" to {to_topic}" if to_topic else "")
                )
            return
        if plan.matched == 0:
            if as_json:
                print_json({"matched": 0, "published": 0, "failed": 0})
            else:
                console.print("nothing to replay: no row matches")
            return
        checked = None
        if canary is not None and to_topic is not None:
            fail("a canary waits for the workers of the rows' own topics: not with --to-topic")
        if canary is not None:
            checked = Canary(CanarySize.parse(canary), canary_success, canary_timeout)
        confirm("replay", plan.matched, yes)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=as_json or not console.is_terminal,
        ) as bar:
            task = bar.add_task("replaying", total=plan.matched)

            def shown(outcomes: Outcomes) -> None:
                bar.update(task, description=f"canary: {_outcomes_text(outcomes)}")

            report = svc.replay(
                flt,
                actor=actor_name(actor),
                limit=limit,
                to_topic=to_topic,
                rate=rate,
                force=force,
                progress=lambda n: bar.advance(task, n),
                canary=checked,
                on_outcomes=shown,
            )
    if as_json:
        print_json(report.as_dict())
    else:
        _print_report(console, report)
    if report.stopped:
        raise typer.Exit(CANARY_STOPPED)
    if report.failed:
        raise typer.Exit(1)


def _outcomes_text(outcomes: Outcomes) -> str:
    return f"{outcomes.resolved} resolved, {outcomes.failed} failed again, {outcomes.waiting} waiting" + (
        f", {outcomes.not_published} not published" if outcomes.not_published else ""
    )


def _print_report(console: Console, report: ReplayReport) -> None:
    if report.canary is not None:
        verdict = report.canary
        line = (
            f"canary: {verdict['rows']} rows, {_outcomes_text(Outcomes(**verdict['outcomes']))} "
            f"after {verdict['seconds']:.1f} s; {verdict['ratio']:.0%} resolved, "
            f"{verdict['required']:.0%} required"
        )
        console.print(line, markup=False)
        if report.stopped:
            console.print("stopped: the canary failed; the other rows were left as they were", markup=False)
    console.print(f"matched {report.matched}, published {report.published}, failed {report.failed}")
    if report.outcomes is not None:
        console.print(f"outcomes so far: {_outcomes_text(Outcomes(**report.outcomes))}", markup=False)
    for dlq_id, why in list(report.failures.items())[:20]:
        console.print(f"  not published: {dlq_id}: {why}", markup=False)

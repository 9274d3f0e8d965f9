"""`eventhandler circuit …`: the flood guard's circuits — see them, and close one to let its failure
be dead-lettered after all."""

from __future__ import annotations

from typing import Annotated

import typer

from eventhandler.cli.render import circuits_table, make_console
from eventhandler.cli.settings import fail
from eventhandler.cli.shared import ActorOpt, ConsumerOpt, JsonOpt, NoteOpt, actor_name, print_json, service
from eventhandler.filters import parse_duration

circuit_app = typer.Typer(
    help="The flood guard's circuits: failures judged systemic, for which the workers hold the line.",
    no_args_is_help=True,
)


@circuit_app.command("list")
def list_circuits(consumer: ConsumerOpt = None, as_json: JsonOpt = False) -> None:
    """Open circuits (since when, what judged them), then the latest closed ones."""
    with service() as svc:
        circuits = svc.circuits(consumer)
    if as_json:
        print_json([c.model_dump(mode="json") for c in circuits])
        return
    console = make_console()
    console.print(circuits_table(circuits))
    opened = sum(c.state == "open" for c in circuits)
    console.print(f"{opened} open, {len(circuits) - opened} closed")


@circuit_app.command()
def close(
    fingerprint: Annotated[str, typer.Argument(help="The circuit's fingerprint (see `circuit list`).")],
    consumer: ConsumerOpt = None,
    for_: Annotated[
        str,
        typer.Option(
            "--for",
            help="How long the failure is dead-lettered instead of holding the line (e.g. 30m, 2h, 1d); "
            "after that the guard judges it again.",
        ),
    ] = "1h",
    note: NoteOpt = None,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Close a circuit: the workers dead-letter its failure (at their next trial) instead of holding."""
    try:
        seconds = parse_duration(for_)
    except ValueError as exc:
        fail(f"--for: {exc}", 2)
    with service() as svc:
        closed = svc.close_circuit(
            fingerprint, consumer=consumer, seconds=seconds, actor=actor_name(actor), note=note
        )
    if as_json:
        print_json(closed.model_dump(mode="json"))
        return
    typer.echo(
        f"closed circuit {closed.fingerprint} of {closed.consumer}: its failures are dead-lettered "
        f"until {closed.dead_letter_until:%Y-%m-%d %H:%M:%S}Z"
    )

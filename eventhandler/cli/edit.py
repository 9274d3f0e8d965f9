"""`eventhandler dlq edit ID`: repair a pending row's payload (kept beside the original bytes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from eventhandler.cli.render import make_console, print_diff, row_json
from eventhandler.cli.settings import fail
from eventhandler.cli.shared import ActorOpt, JsonOpt, NoteOpt, actor_name, print_json, service
from eventhandler.detail import row_detail
from eventhandler.repair import parse_assignments
from eventhandler.service import DLQService


def edit(
    dlq_id: Annotated[int, typer.Argument(help="The DLQ row id.", min=1)],
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="PATH=VALUE",
            help="Set a field, e.g. data.value=21.5 (repeatable; VALUE is JSON, else text).",
        ),
    ] = None,
    patch: Annotated[
        Path | None, typer.Option("--patch", help="A JSON Patch (RFC 6902) file to apply.", exists=True)
    ] = None,
    payload: Annotated[
        Path | None, typer.Option("--payload", help="A file with the whole new payload (JSON).", exists=True)
    ] = None,
    note: NoteOpt = None,
    actor: ActorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Repair a pending row's payload: in $EDITOR (the default), with --set, --patch or --payload.

    The original bytes are kept; a replay publishes the repair with the original key and headers.
    The repair must read with the current deserializer and keep the event's id and source."""
    if sum(x is not None for x in (assignments, patch, payload)) > 1:
        fail("give one of --set, --patch and --payload")
    with service() as svc:
        if assignments:
            view = svc.edit(dlq_id, actor=actor_name(actor), patch=parse_assignments(assignments), note=note)
        elif patch is not None:
            view = svc.edit(dlq_id, actor=actor_name(actor), patch=_patch_file(patch), note=note)
        else:
            new = payload.read_bytes() if payload is not None else _edited_in_editor(svc, dlq_id)
            if new is None:
                make_console(stderr=True).print("no change: the payload was not saved")
                return
            view = svc.edit(dlq_id, actor=actor_name(actor), payload=new, note=note)
    if as_json:
        print_json(row_json(row_detail(view), view.entry))
        return
    console = make_console()
    print_diff(console, view.diff)
    console.print(f"DLQ row {dlq_id}: repair kept beside the original; replay it with --id {dlq_id}")


def _patch_file(path: Path) -> list[dict[str, Any]]:
    try:
        operations = json.loads(path.read_bytes())
    except ValueError as exc:
        fail(f"--patch {path}: not JSON ({exc})")
    if not isinstance(operations, list) or not all(isinstance(op, dict) for op in operations):
        fail(f"--patch {path}: a JSON Patch is a list of operations")
    return operations


def _edited_in_editor(svc: DLQService, dlq_id: int) -> bytes | None:
    """The payload (its repair, if there is one) opened in $EDITOR as indented JSON."""
    if svc.redactor.active:
        fail(
            "EVENTHANDLER_API_REDACT_FIELDS is set: the editor would show redacted fields; "
            "repair with --set or --patch, which do not show the payload"
        )
    entry = svc.view(dlq_id).entry
    current = entry.edited_payload if entry.edited_payload is not None else entry.event_payload
    try:
        text = json.dumps(json.loads(current or b""), indent=2, ensure_ascii=False)
    except ValueError:
        text = (current or b"").decode("utf-8", "replace")
    edited = click.edit(text + "\n", extension=".json", require_save=True)
    if edited is None or edited.strip() == text.strip():
        return None
    return edited.encode()

"""What `eventhandler replay` and `eventhandler dlq …` share: their options, the filter the options
make, the service a command opens, the question before a large change, and JSON output."""

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
from pydantic import ValidationError

from eventhandler.app import build_service
from eventhandler.cli.settings import fail, settings_or_exit
from eventhandler.errors import EventHandlerError
from eventhandler.models import STAGES, STATUSES, DLQFilter
from eventhandler.service import DLQService

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
PayloadOpt = Annotated[
    str | None,
    typer.Option("--payload-contains", help="Payload (or its repair) contains this text (case-sensitive)."),
]
FingerprintOpt = Annotated[str | None, typer.Option(help="Error group fingerprint (see `dlq stats`).")]
TopicOpt = Annotated[str | None, typer.Option(help="Original topic.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
ActorOpt = Annotated[
    str | None, typer.Option(help="Who is acting, for the audit log (default: your user name).")
]
NoteOpt = Annotated[str | None, typer.Option(help="Why, for the audit log.")]


def dlq_filter(**options: Any) -> DLQFilter:
    """The `DLQFilter` the options name (its fields, by name; None: not given). A bad value exits
    with one line naming the option."""
    given = {name: value for name, value in options.items() if value is not None and value != ""}
    try:
        return DLQFilter.model_validate(given)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0])
        if field == "stage":
            fail(f"--stage must be one of {', '.join(STAGES)} (got {error['input']!r})", 2)
        if field == "statuses":
            fail(f"--status must be one of {', '.join(STATUSES)} (got {error['input']!r})", 2)
        message = str(error["msg"]).removeprefix("Value error, ")
        if field in ("since", "until"):
            fail(f"--since/--until: {message}", 2)
        fail(f"--{field.replace('_', '-')}: {message}", 2)


@contextmanager
def service() -> Iterator[DLQService]:
    """The operators' service for one command; a service error is one line and exit 1."""
    settings = settings_or_exit()
    svc, pool = build_service(settings)
    # what the audit rows of this run name as its request and its client
    structlog.contextvars.bind_contextvars(request_id=uuid.uuid4().hex, client=_client())
    try:
        yield svc
    except EventHandlerError as exc:
        fail(str(exc))
    finally:
        pool.close()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _client() -> str:
    return f"cli:{_user()}@{socket.gethostname()}"


def actor_name(actor: str | None) -> str:
    return actor or f"cli:{_user()}"


def confirm(what: str, count: int, yes: bool) -> None:
    """Ask before acting on more than a few rows; without a terminal to ask on, refuse."""
    if yes or count <= CONFIRM_ABOVE:
        return
    if not sys.stdin.isatty():
        fail(f"refusing to {what} {count} rows without --yes (no terminal to ask on)")
    if not typer.confirm(f"{what} {count} rows?"):
        fail("cancelled")


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))

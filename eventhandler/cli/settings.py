"""What every command starts with: the settings, or one line and a clean exit."""

from __future__ import annotations

from typing import NoReturn

import typer

from eventhandler.config import Settings, load_settings
from eventhandler.errors import ConfigError
from eventhandler.logs import configure_logging


def fail(message: str, code: int = 1) -> NoReturn:
    """`error: …` on stderr, then exit with `code` (2: bad usage or settings)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def settings_or_exit() -> Settings:
    """The settings, with logging configured from them (the one place a command does that); a bad
    setting is one line and exit 2."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        fail(str(exc), code=2)
    configure_logging(settings.log_level, settings.log_format, consumer_group=settings.consumer_group)
    return settings

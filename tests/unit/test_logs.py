from __future__ import annotations

import io
import json

from pydantic import SecretStr

from eventhandler.config import load_settings
from eventhandler.logs import configure_logging, get_logger, redact_text


def _capture(**context: object) -> io.StringIO:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream, **context)
    return stream


def test_json_lines_when_not_on_a_terminal() -> None:
    stream = _capture(consumer_group="g1")
    get_logger("t").info("batch_committed", messages=3)
    line = json.loads(stream.getvalue().strip())
    assert line["event"] == "batch_committed"
    assert line["messages"] == 3
    assert line["consumer_group"] == "g1"
    assert line["level"] == "info"
    assert "timestamp" in line


def test_console_format_is_readable() -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)
    get_logger("t").info("worker_started", topics=["a"])
    text = stream.getvalue()
    assert "worker_started" in text
    assert not text.lstrip().startswith("{")


def test_secrets_never_reach_a_log_line(monkeypatch: object) -> None:
    settings = load_settings(
        database_url="postgresql://app:db-password-123@db:5432/app",
        admin_token=SecretStr("admin-token-abcdefghijkl"),
    )
    stream = _capture()
    log = get_logger("t")
    log.info("settings_loaded", settings=settings.model_dump())
    log.info("connecting", url=settings.dsn)
    log.info(
        "token_check", admin_token="admin-token-abcdefghijkl", authorization="Bearer admin-token-abcdefghijkl"
    )
    log.warning("db_error", error="connection to postgresql://app:db-password-123@db:5432/app failed")
    log.info("libpq", conninfo="host=db password=db-password-123 dbname=app")
    output = stream.getvalue()
    assert "db-password-123" not in output
    assert "admin-token-abcdefghijkl" not in output
    assert output.count("\n") == 5


def test_redact_text_keeps_the_rest_of_the_url() -> None:
    assert redact_text("postgresql://u:p@h:5432/d") == "postgresql://u:**********@h:5432/d"
    assert redact_text("postgresql://u@h/d") == "postgresql://u@h/d"

from __future__ import annotations

import io
import json
import time

import pytest
from pydantic import SecretStr

from eventhandler.config import load_settings
from eventhandler.logs import MAX_FIELD_CHARS, configure_logging, get_logger, redact_text


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


# Each shaped to make a backtracking regex rescan the text from every position (about 1 MB each).
ADVERSARIAL = {
    "letters before ://": "a" * 1_000_000 + "://x@",
    "a long user": "a://" + "b" * 1_000_000 + "@",
    "many schemes": ("ab" * 16 + "://b:") * 30_000 + "@",
    "colons": "a:" * 500_000 + "//@",
    "unclosed quoted password": "pwd='" + "x" * 1_000_000,
    "password and spaces": ("password" + " " * 100) * 10_000 + "=",
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_redaction_is_linear_on_hostile_text(name: str) -> None:
    text = ADVERSARIAL[name]
    started = time.perf_counter()
    redact_text(text)
    # Linear redaction of 1 MB takes milliseconds; the quadratic pattern it replaces took minutes.
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_a_hostile_megabyte_in_a_log_field_is_cut_and_costs_little(name: str) -> None:
    stream = _capture()
    started = time.perf_counter()
    get_logger("t").warning("events_dead_lettered", error=ADVERSARIAL[name], event_id=ADVERSARIAL[name])
    assert time.perf_counter() - started < 2.0
    line = json.loads(stream.getvalue())
    for field in ("error", "event_id"):
        assert len(line[field]) < MAX_FIELD_CHARS + 100
        assert "characters left out]" in line[field] or "**********" in line[field]


def test_a_password_in_a_url_is_masked_wherever_the_url_stands() -> None:
    text = 'connect postgresql://app:s3cr3t@db/x failed; (kafka://u:p4ss@h) "postgres://a:b@c" x.pg://d:e@f'
    masked = redact_text(text)
    for secret in ("s3cr3t", "p4ss", ":b@", ":e@"):
        assert secret not in masked
    assert masked.count("**********") == 4


def test_a_console_log_of_an_exception_never_shows_the_frames_local_variables() -> None:
    """A rich traceback lists each frame's locals: a token a handler held would be printed."""
    stream = io.StringIO()
    configure_logging("info", "console", stream)
    token = "admin-token-0123456789abcdef"
    try:
        raise ValueError(f"failed with a token of {len(token)} characters")
    except ValueError:
        get_logger("test").exception("it_failed")
    assert "ValueError" in stream.getvalue()
    assert token not in stream.getvalue()

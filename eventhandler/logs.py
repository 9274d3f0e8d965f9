"""structlog, configured once: JSON lines in containers, readable output on a terminal.

A redaction processor runs last before rendering, so no secret reaches a log line whatever a caller
passes: `SecretStr` values, passwords inside connection URLs, and keys that name a secret. It then cuts
every string to `MAX_FIELD_CHARS`. Both are linear in the text's length, whatever the text.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from pydantic import SecretStr

# Linear on any input. A scheme starts only where a run of scheme characters starts (the lookbehind) and is
# at most 64 long, so each "://" is tried from one position; user and password stop at the next separator.
# (An unbounded scheme made every position of a long run of letters rescan the run: O(n²).)
_URL_PASSWORD = re.compile(
    r"(?<![a-zA-Z0-9+.-])(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]{0,63}://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@"
)
_KV_PASSWORD = re.compile(r"(?i)\b(password|passwd|pwd)\s*=\s*('[^']*'|\S+)")
_SECRET_KEYS = re.compile(r"(?i)(password|passwd|secret|token|authorization|api[_-]?key|sasl)")
_REDACTED = "**********"
MAX_FIELD_CHARS = 4096  # per string in a log line, after redaction


@functools.lru_cache(maxsize=4096)
def _is_secret_key(key: str) -> bool:
    return _SECRET_KEYS.search(key) is not None


def redact_text(text: str) -> str:
    """Mask passwords embedded in URLs and libpq key=value strings."""
    if "@" in text and "://" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{_REDACTED}@", text)
    if "=" in text:
        lowered = text.lower()
        if "pass" in lowered or "pwd" in lowered:
            text = _KV_PASSWORD.sub(lambda m: f"{m[1]}={_REDACTED}", text)
    return text


def bound(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`text` cut to about `limit` characters, its start and its end kept (a traceback ends with the
    exception) and the count of what was left out between: a 10 MB error message or event id must not
    become a 10 MB log line."""
    if len(text) <= limit:
        return text
    head, tail = limit // 4, limit - limit // 4
    return f"{text[:head]} … [{len(text) - head - tail} characters left out] … {text[-tail:]}"


def _redact_value(key: str, value: Any) -> Any:
    if isinstance(value, int | float | bool) or value is None:
        return value
    if isinstance(value, SecretStr):
        return _REDACTED
    if _is_secret_key(key) and value not in (None, ""):
        return _REDACTED
    if isinstance(value, str):
        return bound(redact_text(value))
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(key, value)
    return event_dict


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None, **context: Any
) -> None:
    """Configure structlog and the standard library root logger (for uvicorn and friends)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        # plain tracebacks: a rich one prints the frames' local variables, a token among them
        else structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if fmt == "json" else _passthrough,
        redact_secrets,
    ]
    processors = [*shared, renderer]
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**context)
    # Library logs (psycopg_pool, librdkafka, uvicorn) get the same format and redaction.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def _passthrough(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return event_dict


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

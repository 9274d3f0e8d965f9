"""SQL statements by name, kept whole in `.sql` files beside this module (procrastinate's
`queries.sql` is the model): each statement follows a `-- name: NAME` line, comments included, up to
the next one. Statements take parameters only through psycopg placeholders."""

from __future__ import annotations

import functools
import importlib.resources
import re
from typing import LiteralString, cast

_NAME = re.compile(r"^-- name: ([a-z_]+)$", re.MULTILINE)


@functools.cache
def load(file: str) -> dict[str, LiteralString]:
    """The statements of `file` (e.g. "dlq_write.sql") by name."""
    text = importlib.resources.files(__name__).joinpath(file).read_text(encoding="utf-8")
    parts = _NAME.split(text)
    statements = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in statements:
            raise ValueError(f"{file}: statement {name!r} is defined twice")
        # the file is the package's own text, not input: a literal in all but the type checker's eyes
        statements[name] = cast(LiteralString, body.strip().rstrip(";"))
    return statements

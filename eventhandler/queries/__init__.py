"""SQL statements by name, kept whole in `.sql` files beside this module (procrastinate's
`queries.sql` is the model): each statement follows a `-- name: NAME` line, comments included, up to
the next one. Statements take parameters only through psycopg placeholders; a `{name}` placeholder
(filled by `psycopg.sql.SQL.format` with an identifier or a composed clause) never appears in a
comment, which `format` would fill too."""

from __future__ import annotations

import functools
import importlib.resources
import re
from typing import LiteralString, cast

_NAME = re.compile(r"^-- name: ([a-z_]+)$", re.MULTILINE)


@functools.cache
def load(file: str) -> dict[str, LiteralString]:
    """The statements of `file` (e.g. "dlq_write.sql") by name."""
    return parse(importlib.resources.files(__name__).joinpath(file).read_text(encoding="utf-8"), file)


def parse(text: str, file: str = "<text>") -> dict[str, LiteralString]:
    parts = _NAME.split(text)
    statements = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in statements:
            raise ValueError(f"{file}: statement {name!r} is defined twice")
        # the file is the package's own text, not input: a literal in all but the type checker's eyes
        statement = body.strip().rstrip(";")
        if re.search(r"--[^\n]*\{", statement):
            raise ValueError(f"{file}: statement {name!r} has a {{placeholder}} in a comment")
        statements[name] = cast(LiteralString, statement)
    return statements

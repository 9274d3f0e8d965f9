"""SQL by name: every statement file loads, and the loader refuses what would run the wrong SQL."""

from __future__ import annotations

import importlib.resources

import pytest

from eventhandler import queries


def test_every_statement_file_loads_into_named_statements() -> None:
    files = [f.name for f in importlib.resources.files(queries).iterdir() if f.name.endswith(".sql")]
    assert len(files) >= 4
    for file in files:
        statements = queries.load(file)
        assert statements, file
        assert all(text and not text.endswith(";") for text in statements.values()), file


def test_a_statement_is_its_text_up_to_the_next_name() -> None:
    text = "-- header\n\n-- name: one\n-- why\nSELECT 1;\n\n-- name: two\nSELECT {columns} FROM t;\n"
    assert queries.parse(text) == {"one": "-- why\nSELECT 1", "two": "SELECT {columns} FROM t"}


def test_a_name_defined_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="defined twice"):
        queries.parse("-- name: one\nSELECT 1;\n-- name: one\nSELECT 2;\n")


def test_a_placeholder_in_a_comment_is_refused() -> None:
    # psycopg.sql.SQL.format fills it there too, and the rest of the line would comment out real SQL
    with pytest.raises(ValueError, match="placeholder"):
        queries.parse("-- name: rows\n-- {where} is the filter\nSELECT * FROM t {where};\n")

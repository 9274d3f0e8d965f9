"""What the console's pages compute: a payload as text, bounded whatever its shape."""

from __future__ import annotations

import json
import tracemalloc

from eventhandler.console import render
from eventhandler.console.common import problem
from eventhandler.errors import DatabaseUnavailable
from eventhandler.redaction import Redactor
from tests.unit.test_repair import row


def test_a_deep_payload_is_indented_only_as_far_as_the_page_shows_it() -> None:
    """Indentation grows with depth: fully indented, this 1.2 MB payload would be ~40 MB of text."""
    deep: object = list(range(300_000))
    for _ in range(20):
        deep = [deep]
    document = json.dumps(deep).encode()
    view = Redactor([]).view(row(document, None))
    tracemalloc.start()
    shown = render.payload(view)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert shown.kind == "json"
    assert shown.cut
    assert len(shown.text) == render.TEXT_CHARS
    assert peak < 10_000_000


def test_bytes_that_are_not_text_are_a_bounded_hex_dump() -> None:
    shown = render.payload(Redactor([]).view(row(b"\xff\x00" * 10_000, None)))
    assert shown.kind == "hex"
    assert shown.cut
    assert (
        shown.text.splitlines()[0]
        == "00000000  ff 00 ff 00 ff 00 ff 00 ff 00 ff 00 ff 00 ff 00  |................|"
    )


def test_a_service_error_is_told_as_the_apis_fixed_message() -> None:
    text = problem(DatabaseUnavailable('connection to server at "10.0.0.5", port 5432 failed: password'))
    assert text == "the database is unavailable; try again later"

"""`/readyz` says what is missing as JSON, whatever the text of the error it reports."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from eventhandler.health import HealthServer
from eventhandler.metrics import Metrics

HOSTILE_ERRORS = [
    'broker said "no", then \\ and a newline\n',
    "GroupCoordinator: 127.0.0.1:9092: Connect to ipv4#127.0.0.1:9092 failed: Connection refused",
    "\u0000\u001f control characters and \u2028 a line separator",
    '{"injected": true}',
]


@pytest.mark.parametrize("error", HOSTILE_ERRORS)
def test_readyz_is_valid_json_whatever_the_error_text(error: str) -> None:
    detail: dict[str, Any] = {"postgres": "ok", "kafka": error, "assigned_partitions": 3}
    server = HealthServer("127.0.0.1", 0, Metrics().registry, lambda: (False, detail))
    server.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=5)
        with caught.value as response:
            assert response.code == 503
            assert json.loads(response.read()) == detail
    finally:
        server.stop()

"""Run `eventhandler …` exactly as a user does, as a separate process."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventhandler", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
    )


def cli_json(env: dict[str, str], *args: str, timeout: float = 120) -> Any:
    result = run_cli(env, *args, "--json", timeout=timeout)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stderr}"
    return json.loads(result.stdout)


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 60) -> list[Any]:
    """Read a topic from the start until `expected` messages arrived (fails after `timeout`)."""
    import time
    import uuid

    from confluent_kafka import Consumer

    from tests.support.kafka import TEST_CONSUMER_OPTIONS

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
        | TEST_CONSUMER_OPTIONS
    )
    consumer.subscribe([topic])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            messages += [m for m in consumer.consume(500, 0.5) if m.error() is None]
    finally:
        consumer.close()
    assert len(messages) >= expected, f"only {len(messages)} of {expected} messages on {topic}"
    return messages

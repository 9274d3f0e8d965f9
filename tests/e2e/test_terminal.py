"""The interactive side, on a real pseudo-terminal: the confirmation prompt and the progress bar."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg

from eventhandler.config import Settings
from tests.conftest import settings_env
from tests.support import kafka as k
from tests.support.worker import run_until_idle, scalar

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A command on a pseudo-terminal: read what it shows, type answers."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            args,
            env=env | {"COLUMNS": "120", "TERM": "xterm"},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            close_fds=True,
        )
        os.close(slave)
        self.screen = ""

    def read_until(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} never appeared; screen:\n{self.screen}"
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the command exited and the terminal closed
                    chunk = b""
                if not chunk:
                    assert text in self.screen, f"{text!r} never appeared; screen:\n{self.screen}"
                self.screen += _ANSI.sub("", chunk.decode("utf-8", "replace"))
        return self.screen

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        code = self.process.wait(timeout=60)
        os.close(self.master)
        return code


def test_replay_asks_on_a_terminal_and_shows_progress(
    make_settings: Callable[..., Settings], kafka_bootstrap: str, topic: str, db: psycopg.Connection[Any]
) -> None:
    settings = make_settings()
    producer = k.TestProducer(kafka_bootstrap)
    producer.send_events(topic, [k.reading("nobody", value=i) for i in range(12)])
    producer.flush()
    run_until_idle(settings, idle=2)

    terminal = Terminal([sys.executable, "-m", "eventhandler", "replay"], settings_env(settings))
    terminal.read_until("replay 12 rows? [y/N]")
    terminal.type("y\n")
    screen = terminal.read_until("matched 12, published 12, failed 0")
    assert terminal.close() == 0
    assert "replaying" in screen  # the progress bar
    assert scalar(db, "SELECT count(*) FROM dlq WHERE status = 'replayed'") == 12


def test_answering_no_changes_nothing(
    make_settings: Callable[..., Settings], kafka_bootstrap: str, topic: str, db: psycopg.Connection[Any]
) -> None:
    settings = make_settings()
    producer = k.TestProducer(kafka_bootstrap)
    producer.send_events(topic, [k.reading("nobody", value=i) for i in range(12)])
    producer.flush()
    run_until_idle(settings, idle=2)
    ids = [str(r[0]) for r in db.execute("SELECT dlq_id FROM dlq")]

    terminal = Terminal(
        [sys.executable, "-m", "eventhandler", "dlq", "discard", *ids], settings_env(settings)
    )
    terminal.read_until("discard 12 rows? [y/N]")
    terminal.type("n\n")
    terminal.read_until("cancelled")
    assert terminal.close() == 1
    assert scalar(db, "SELECT count(*) FROM dlq WHERE status = 'pending'") == 12

"""What `eventhandler run` says when it cannot start, run as a user runs it (no broker or database
needed: each fails before it would reach one). A metrics port already taken is a bad setting: one
line naming it, exit 2 (under a supervisor, restarting a child cannot help). Any other failure is
told as what it is, never as a port problem, and exits 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg_pool
import pytest

from eventhandler.app import build_worker
from eventhandler.config import Settings
from eventhandler.errors import ConfigError

ENV = {"PATH": "/usr/bin:/bin", "EVENTHANDLER_METRICS_PORT": "0"}
# The CLI with Python's temporary directory set to its first argument: TMPDIR itself cannot make the
# supervisor's state fail (an unusable TMPDIR is passed over for /tmp).
WITH_TEMPDIR = (
    "import sys, tempfile; tempfile.tempdir = sys.argv.pop(1); from eventhandler.cli import main; main()"
)


def run(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    """The exit code, and the lines of stderr (nothing else: no log record comes before the error)."""
    result = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    return result.returncode, result.stderr.splitlines()


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as other:
        other.bind(("0.0.0.0", 0))  # where the metrics server binds
        other.listen()
        yield other.getsockname()[1]


@pytest.mark.parametrize("processes", ["1", "2"])  # the worker itself, and the supervisor
def test_a_metrics_port_in_use_is_one_line_naming_the_setting_and_exit_2(
    taken_port: int, processes: str
) -> None:
    env = ENV | {"EVENTHANDLER_METRICS_PORT": str(taken_port)}
    code, said = run(env, "-m", "eventhandler", "run", "--processes", processes)
    assert said == [
        f"error: invalid setting EVENTHANDLER_METRICS_PORT: cannot serve metrics on port {taken_port}: "
        "Address already in use"
    ]
    assert code == 2


def test_a_metrics_port_in_use_fails_before_the_pool_tries_postgresql(
    taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its background connection attempt would log a warning (a JSON line) before the one-line error.
    for name in [n for n in os.environ if n.upper().startswith("EVENTHANDLER_")]:
        monkeypatch.delenv(name)  # the developer's own settings must not change what is built
    opened: list[psycopg_pool.ConnectionPool] = []
    monkeypatch.setattr(psycopg_pool.ConnectionPool, "open", lambda pool, *a, **k: opened.append(pool))
    settings = Settings(metrics_port=taken_port, database_url="postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(ConfigError, match="EVENTHANDLER_METRICS_PORT"):
        build_worker(settings)
    assert opened == []


def test_an_admin_api_port_in_use_is_one_line_and_exit_2(taken_port: int) -> None:
    env = ENV | {"EVENTHANDLER_ADMIN_TOKEN": "a-token-of-twenty-chars"}
    code, said = run(env, "-m", "eventhandler", "api", "--port", str(taken_port))
    assert said == [
        f"error: invalid setting --host/--port: cannot listen on 127.0.0.1:{taken_port}: Address already in use"
    ]
    assert code == 2


def test_a_supervisor_that_cannot_make_its_state_says_so_not_a_port_problem(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    code, said = run(ENV, "-c", WITH_TEMPDIR, str(missing), "run", "--processes", "2")
    assert said == [
        f"error: cannot create the processes' state in {missing} (TMPDIR): No such file or directory"
    ]
    assert code == 1


def test_a_child_that_cannot_write_its_metrics_cannot_start_and_exits_1_to_be_restarted(
    tmp_path: Path,
) -> None:
    # Exit 2 would tell its supervisor the settings are bad and stop every child.
    env = ENV | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "gone")}
    child = ("--process-slot", "0", "--supervisor-pid", str(os.getpid()), "--state-dir", str(tmp_path))
    code, said = run(env, "-m", "eventhandler", "run", *child)
    [line] = said
    assert line.startswith("error: cannot start the worker: [Errno 2] No such file or directory: ")
    assert "port" not in line
    assert code == 1

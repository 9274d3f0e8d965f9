"""`eventhandler demo` end to end, as a newcomer runs it: on the local PostgreSQL, and on a machine with
nothing but Python (its embedded PostgreSQL)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support.cli import cli_json
from tests.support.services import free_port
from tests.support.waiting import wait_for


def _demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventhandler", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_demo_tells_the_whole_story_and_runs_twice(pg_admin_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTHANDLER_")}
    given = pg_admin_url != "postgresql://postgres@127.0.0.1:5432/postgres"
    if given:
        # a PostgreSQL other than the developer default: point the demo at a database there
        env["EVENTHANDLER_DATABASE_URL"] = pg_admin_url.rsplit("/", 1)[0] + "/eventhandler_demo_test"
    for run in (1, 2):
        if given:  # a database the user gives must exist, and the demo leaves its rows alone: a fresh one
            with psycopg.connect(pg_admin_url, autocommit=True) as admin:
                admin.execute("DROP DATABASE IF EXISTS eventhandler_demo_test WITH (FORCE)")
                admin.execute("CREATE DATABASE eventhandler_demo_test")
        result = _demo(env)
        assert result.returncode == 0, f"run {run}:\n{result.stdout}\n{result.stderr}"
        out = result.stdout
        for step in (
            "bundled Tansu broker",
            "messages failed and are in the dead letter queue",
            "fixing the cause",
            "matched 25, published 25",
            "later events of its order are parked behind it",
            "28 resolved",  # 25 readings, and the order's placement with its 2 parked events
            "every reading counted exactly once",
            "every order took its events in order",
        ):
            assert step in out, f"run {run}: {step!r} missing from\n{out}"
        assert "Traceback" not in out + result.stderr
    url = env.get("EVENTHANDLER_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/eventhandler_demo")
    last_run = "SELECT consumer FROM dlq ORDER BY dlq_id DESC LIMIT 1"
    with psycopg.connect(url) as conn:
        statuses = dict(
            conn.execute(
                f"SELECT status, count(*) FROM dlq WHERE consumer = ({last_run}) GROUP BY status"
            ).fetchall()
        )
        runs = conn.execute("SELECT count(DISTINCT consumer) FROM dlq").fetchone()
    assert statuses == {"pending": 7, "resolved": 28}
    if "EVENTHANDLER_DATABASE_URL" not in env:
        assert runs == (1,)  # the demo's own database starts clean on every run


def test_the_demo_on_its_embedded_postgres_keeps_the_data_and_its_closing_lines_work(tmp_path: Path) -> None:
    """A machine with nothing but Python: the demo starts a private PostgreSQL, stops it at the end,
    and the instruction it closes with (`demo --explore`) brings the rows back for `dlq list`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTHANDLER_")}
    data_dir = tmp_path / "demo"
    for run in (1, 2):  # the second run starts the kept server again and resets the demo's database
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "eventhandler",
                "demo",
                "--postgres",
                "embedded",
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"run {run}:\n{result.stdout}\n{result.stderr}"
        assert "embedded server, started for the demo" in result.stdout
        assert "every reading counted exactly once" in result.stdout
    instruction = f"eventhandler demo --explore --data-dir {data_dir}"
    assert instruction in result.stdout
    assert (data_dir / "postgres" / "PG_VERSION").exists()

    url = None
    with subprocess.Popen(
        [sys.executable, "-m", "eventhandler", *instruction.split()[1:]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as explore:
        try:
            assert explore.stdout is not None
            for line in explore.stdout:  # ends when the process does, so a failure cannot hang here
                match = re.search(r"export EVENTHANDLER_DATABASE_URL=(\S+)", line)
                if match:
                    url = match.group(1)
                    break
            assert url, "demo --explore printed no EVENTHANDLER_DATABASE_URL"
            listed = cli_json({**env, "EVENTHANDLER_DATABASE_URL": url}, "dlq", "list", "--limit", "100")
            assert sorted(row["status"] for row in listed["items"]) == ["pending"] * 7 + ["resolved"] * 28
        finally:
            explore.send_signal(signal.SIGINT)
            assert explore.wait(timeout=60) == 0
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2).close()  # the server stopped with it

    # The other closing line: the console on the same rows, signed in with the token it prints.
    console_line = f"eventhandler demo --console --data-dir {data_dir}"
    assert console_line in result.stdout
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "eventhandler", *console_line.split()[1:], "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as served:
        try:
            assert served.stdout is not None
            token = None
            for line in served.stdout:
                match = re.search(r"admin token, made for this run: (\S+)", line)
                if match:
                    token = match.group(1)
                    break
            assert token, "demo --console printed no token"
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: _answers(base), timeout=60, message="the console")
            with httpx.Client(base_url=base, follow_redirects=True, timeout=10) as browser:
                assert browser.get("/ui").url.path == "/ui/signin"
                overview = browser.post("/ui/signin", data={"token": token, "next": "/ui"})
                assert overview.status_code == 200
                assert "<strong>7</strong> pending" in overview.text
        finally:
            served.send_signal(signal.SIGINT)
            assert served.wait(timeout=60) == 0


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

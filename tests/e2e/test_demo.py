"""`eventhandler demo` end to end, as a newcomer runs it: nothing running but PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg


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
    if pg_admin_url != "postgresql://postgres@127.0.0.1:5432/postgres":
        # a PostgreSQL other than the developer default: point the demo at a database on it
        env["EVENTHANDLER_DATABASE_URL"] = pg_admin_url.rsplit("/", 1)[0] + "/eventhandler_demo_test"
    for run in (1, 2):
        result = _demo(env)
        assert result.returncode == 0, f"run {run}:\n{result.stdout}\n{result.stderr}"
        out = result.stdout
        for step in (
            "bundled Tansu broker",
            "messages failed and are in the dead letter queue",
            "fixing the cause",
            "matched 25, published 25",
            "25 resolved",
            "every reading counted exactly once",
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
    assert statuses == {"pending": 7, "resolved": 25}
    if "EVENTHANDLER_DATABASE_URL" not in env:
        assert runs == (1,)  # the demo's own database starts clean on every run

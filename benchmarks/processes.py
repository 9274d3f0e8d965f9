"""Processes: `eventhandler run --processes N` as a container runs it, for N = 1 and 2, on the happy
path's workload, beside the raw ceiling measured in the same scenario.

The worker runs as a subprocess (the supervisor and its children), so it is measured from outside:
the stored positions in PostgreSQL are read every 20 ms, and the rate is the events between 10 % and
90 % of the topic over the time between those two readings. That leaves out the processes' start, the
group join and the idle wait at the end, as the in-process figures leave out their first batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import psycopg

from benchmarks.baselines import raw_ceiling
from benchmarks.report import Row
from benchmarks.runner import Bench, check_database
from benchmarks.workload import Workload, produce
from eventhandler.config import Settings

SCENARIO = "1b processes"
POLL_SECONDS = 0.02
COMMAND = (sys.executable, "-m", "eventhandler", "run")
PROGRESS = "SELECT coalesce(sum(next_offset), 0) FROM consumer_positions"


def processes(bench: Bench) -> None:
    profile, services = bench.profile, bench.services
    topic = services.topic("processes", profile.partitions)
    workload = Workload(profile.devices, profile.happy_events, tag="processes")
    bench.say(f"processes: producing {workload.messages:,} messages to {profile.partitions} partitions")
    produce(services.bootstrap, topic, workload)
    batch = Settings.model_fields["batch_max_messages"].default
    raw = max(
        (
            raw_ceiling(services.bootstrap, topic, profile.partitions, workload.messages, batch)
            for _ in range(2)
        ),
        key=lambda clock: clock.rate or 0.0,
    )
    bench.say(f"processes: raw ceiling {raw.rate or 0:,.0f} ev/s")
    bench.report.note(
        "Processes: `python -m eventhandler run --processes N --stop-when-idle` on the happy path's "
        "workload (a fresh database and group each), measured from outside: stored positions read every "
        "20 ms, the rate is the events between 10 % and 90 % of the topic over the time between. The raw "
        "ceiling is one process (no Python worker that validates its input can beat it on one core)."
    )
    for count in (1, 2):
        rate, problems = _run(bench, topic, workload, count)
        bench.say(f"processes: --processes {count}: {rate or 0:,.0f} ev/s")
        bench.report.add(
            Row(
                SCENARIO,
                f"--processes {count} vs raw ceiling",
                rate,
                "ev/s",
                raw.rate,
                "raw consume+validate, 1 process",
                note="; ".join(problems) or f"{os.cpu_count()} CPUs shared with the broker and PostgreSQL",
                status="WRONG" if problems else "INFO",
            )
        )


def _run(bench: Bench, topic: str, workload: Workload, count: int) -> tuple[float | None, list[str]]:
    services = bench.services
    with services.database() as url:
        settings = services.settings(url, topic)
        log = bench.logdir / f"processes-{count}.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                [*COMMAND, *_processes(count), "--stop-when-idle", str(bench.profile.idle_seconds + 3)],
                env=_env(settings),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            rate = _watch(url, workload.messages, worker)
            code = worker.wait(timeout=120)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        problems = check_database(url, workload)
        if code != 0:
            problems.append(f"exit code {code} (see {log})")
    return rate, problems


def _processes(count: int) -> list[str]:
    """One process is the plain `eventhandler run` (the default), so the scenario also measures
    commits from before `--processes` existed."""
    return [] if count == 1 else ["--processes", str(count)]


def _watch(url: str, total: int, worker: subprocess.Popen[bytes], timeout: float = 600) -> float | None:
    """Events per second between 10 % and 90 % of `total`, from the stored positions."""
    low, high = total // 10, total - total // 10
    marks: dict[str, tuple[float, int]] = {}
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as db:
        while "high" not in marks and time.monotonic() < deadline and worker.poll() is None:
            row = db.execute(PROGRESS).fetchone()
            done, at = int(row[0]) if row else 0, time.monotonic()
            if done >= low and "low" not in marks:
                marks["low"] = (at, done)
            if done >= high:
                marks["high"] = (at, done)
            time.sleep(POLL_SECONDS)
    if "low" not in marks or "high" not in marks:
        return None
    (start, first), (end, last) = marks["low"], marks["high"]
    return (last - first) / (end - start) if end > start else None


def _env(settings: Settings) -> dict[str, str]:
    values: dict[str, Any] = {
        "DATABASE_URL": settings.dsn,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOPICS": ",".join(settings.topics),
        "CONSUMER_GROUP": settings.consumer_group,
        "METRICS_PORT": "0",
        "KAFKA_CONSUMER_OPTIONS": json.dumps(settings.kafka_consumer_options),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
    }
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("EVENTHANDLER_")}
    return inherited | {f"EVENTHANDLER_{k}": str(v) for k, v in values.items()}

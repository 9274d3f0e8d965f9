"""Simulation throughput: DLQ rows per second through `DLQService.simulate` (what `eventhandler replay
--simulate` and `POST /dlq/simulate` run), beside the worker applying the same readings from Kafka.

The DLQ is filled by the real worker with one error group: readings of devices never registered
("device … is not registered"). The devices are then registered directly in PostgreSQL, so the
simulation predicts "apply" for every row — the case after the fix, where every row runs the
handlers and the projection writes before the transaction is rolled back."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import LiteralString

import psycopg

from benchmarks.report import Row
from benchmarks.runner import Bench, WorkerRun, run_worker
from benchmarks.workload import Message, Workload, device_name, produce
from eventhandler.app import build_service
from eventhandler.models import DLQFilter
from eventhandler.simulate import CHUNK, Simulation

SCENARIO = "3 simulate"
RUNS = 2  # best of two, for the simulation as for the worker: one run alone swings by ±20 %
TAIL_WAIT = 0.01  # the baseline worker's batch_max_wait_seconds (see _worker_baseline)

REGISTER_DEVICES: LiteralString = (
    "INSERT INTO devices (device_id, name, site, status) "
    "SELECT d, upper(d), NULL, 'active' FROM unnest(%s::text[]) AS d"
)
SIMULATION_LEFT: LiteralString = (  # what a rolled-back simulation must have left as it was
    "SELECT (SELECT coalesce(sum(reading_count), 0)::bigint FROM devices), "
    "(SELECT count(*) FROM applied_events), "
    "(SELECT count(*) FROM dlq WHERE status = 'pending')"
)


def simulate(bench: Bench) -> None:
    profile, services = bench.profile, bench.services
    readings = Workload(profile.devices, profile.simulate_rows, tag="simulate")
    # What the worker must leave after the fill: every message of the topic in the DLQ, nothing applied.
    dead = Workload(profile.devices, profile.simulate_rows, poison_every=1)
    source = services.topic("simulate-source", profile.partitions)
    bench.say(f"simulate: filling the DLQ with {dead.poison:,} readings of unregistered devices")
    produce(services.bootstrap, source, _unregistered(readings))
    with services.database() as url:
        # 100 % failures over many keys is what the flood guard holds: it must dead-letter them here.
        filled = run_worker(bench, "simulate-fill", source, dead, database_url=url, flood_guard=False)
        if filled.problems:
            raise RuntimeError("DLQ not filled as expected: " + filled.note)
        with psycopg.connect(url) as conn:
            conn.execute(REGISTER_DEVICES, [[device_name(i) for i in range(profile.devices)]])
        service, pool = build_service(services.settings(url, source))
        simulations: list[tuple[float, Simulation]] = []
        try:
            for run in range(1, RUNS + 1):
                bench.say(f"simulate: simulating a replay of every pending row ({run}/{RUNS})")
                started = time.perf_counter()
                simulation = service.simulate(DLQFilter(statuses=("pending",)), actor="benchmark")
                simulations.append((time.perf_counter() - started, simulation))
        finally:
            pool.close()
        problems = _problems(url, simulations, dead.poison)

    baseline = _worker_baseline(bench, readings)
    seconds, best = min(simulations, key=lambda run: run[0])
    bench.say(f"simulate: {best.matched / seconds:,.0f} rows/s; worker {baseline.rate or 0:,.0f} ev/s")
    bench.report.note(
        "Simulate: DLQService.simulate(DLQFilter(statuses=pending)) from build_service(), timed around "
        "the call (select the ids, read the rows in chunks, decode, ledger check, handlers, projection "
        "writes, rollback), best of 2 on the same rows; the devices were registered by SQL, so every row "
        "applies. Baseline: the worker (fresh database and group; batch_max_messages="
        f"{CHUNK}, the simulation's chunk, and batch_max_wait_seconds={TAIL_WAIT}, instead of 5,000 and "
        "0.2) consuming the same readings after their devices' registrations, timed as the happy path "
        "(messages of every batch but the first, from the end of the first batch to the end of the last: "
        "consume, decode, handlers, projection writes, PostgreSQL commit, offsets); best of 2."
    )
    both = ", ".join(f"{s:.2f} s" for s, _ in simulations)
    bench.report.add(
        Row(
            SCENARIO,
            f"DLQ rows simulated, all apply ({best.matched:,})",
            best.matched / seconds if seconds else None,
            "rows/s",
            baseline.rate,
            "worker, same readings",
            note="; ".join(problems) or baseline.note or f"one error group; runs took {both}",
            status="WRONG" if problems or baseline.problems else "INFO",
        )
    )
    bench.report.add(
        Row(
            SCENARIO,
            f"  seconds for {best.matched:,} rows",
            seconds,
            "s",
            note=f"the simulation's own clock: {best.seconds:.2f} s",
            status="WRONG" if problems else "INFO",
        )
    )


def _unregistered(workload: Workload) -> Iterator[Message]:
    """The workload's readings without the registrations before them: each fails in the handler."""
    return itertools.islice(workload, workload.registrations, None)


def _problems(url: str, simulations: list[tuple[float, Simulation]], rows: int) -> list[str]:
    problems = []
    for _, simulation in simulations:
        if simulation.matched != rows or simulation.outcomes["apply"] != rows:
            problems.append(f"matched {simulation.matched}, outcomes {simulation.outcomes}")
    with psycopg.connect(url, autocommit=True) as conn:
        left = conn.execute(SIMULATION_LEFT).fetchone()
    if left != (0, 0, rows):
        problems.append(f"after the simulations: readings, applied, pending = {left}")
    return problems


def _worker_baseline(bench: Bench, readings: Workload) -> WorkerRun:
    profile, services = bench.profile, bench.services
    topic = services.topic("simulate-worker", profile.partitions)
    bench.say(f"simulate: the worker applying {readings.messages:,} messages (registrations first)")
    produce(services.bootstrap, topic, readings)
    # Batches of the simulation's chunk size (at the default 5,000 the topic is two or three batches, and
    # the first is left out of the rate), read without the default 0.2 s wait: the last, partial batch
    # would wait that long for messages that never come, 40 % of the window at 10,000 readings.
    return max(
        (
            run_worker(
                bench,
                "simulate-worker",
                topic,
                readings,
                batch_max_messages=CHUNK,
                batch_max_wait_seconds=TAIL_WAIT,
            )
            for _ in range(RUNS)
        ),
        key=lambda run: (not run.problems, run.rate or 0.0),
    )

"""Produce-to-projection latency at a steady rate.

Method: every record's Kafka timestamp (CreateTime, stamped by the producer when `produce()` is
called, in ms) is subtracted from the wall-clock time at which the worker's batch transaction
committed — measured when the worker records the batch (after its transaction and Kafka
commit), i.e. when the projection is visible in PostgreSQL. Producer, broker and worker share one
host and one clock.

Baseline: a bare consumer on the same stream at the same time, calling `consume()` with the worker's
own batch size and wait, timing when each record reaches Python. The difference is what processing
and committing add; the bare figure is the broker's fetch wait plus the batch wait.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from benchmarks.probes import WorkerProbe, percentile
from benchmarks.profiles import Profile
from benchmarks.report import Row
from benchmarks.runner import Bench, Running, check_database
from benchmarks.services import unique
from benchmarks.workload import BulkProducer, Workload, device_name, produce_steadily, registration
from eventhandler.app import build_worker
from eventhandler.logs import configure_logging
from tests.support.waiting import wait_for


def latency(bench: Bench) -> None:
    profile, services = bench.profile, bench.services
    topic = services.topic("latency", profile.partitions)
    total = int(profile.latency_rate * profile.latency_seconds)
    with services.database() as url:
        settings = services.settings(url, topic)
        configure_logging("info", "json", stream=bench.log_stream("latency"))
        app = build_worker(settings, serve_http=False)
        probe = WorkerProbe(app)
        running = Running(app, stop_when_idle=None)
        try:
            _register(services.bootstrap, topic, profile.devices)
            bench.say("latency: waiting for the worker to join its group and apply the registrations")
            wait_for(
                lambda: probe.clock.total >= profile.devices or not running.alive,
                timeout=60,
                message="the worker to apply the registrations",
            )
            probe.latency_after_ms = time.time() * 1000
            bench.say(f"latency: {total:,} readings at {profile.latency_rate:,.0f}/s")
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                achieved, bare_ms = pool.submit(
                    steady_stream,
                    services.bootstrap,
                    topic,
                    profile,
                    settings.batch_max_messages,
                    settings.batch_max_wait_seconds,
                ).result(timeout=profile.latency_seconds * 3 + 120)
            wait_for(
                lambda: probe.clock.total >= profile.devices + total or not running.alive,
                timeout=60,
                message="the worker to apply every reading",
            )
        finally:
            stats = running.finish(timeout=60, stop=True)
        problems = check_database(url, Workload(profile.devices, total), stats)

    scenario = "4 latency"
    bench.report.note(
        "Latency: Kafka CreateTime of each record (stamped at produce()) to the wall clock right after "
        "the worker recorded the batch (committed in PostgreSQL); one host, one clock, ms resolution. "
        "Producer and bare consumer run in a child process. Baseline: a bare consumer calling consume() "
        "with the worker's batch_max_messages/batch_max_wait_seconds on the same stream at the same time."
    )
    note = f"{len(probe.latencies_ms):,} events, producer achieved {achieved:,.0f}/s"
    for q in (50, 99):
        bench.report.add(
            Row(
                scenario,
                f"produce→projection committed p{q}",
                percentile(probe.latencies_ms, q),
                "ms",
                percentile(bare_ms, q),
                "ms bare consumer",
                note="; ".join(problems) or (note if q == 50 else "Kafka CreateTime → after COMMIT"),
                status="WRONG" if problems else "INFO",
            )
        )
    bench.report.add(
        Row(scenario, "produce→projection committed max", max(probe.latencies_ms, default=None), "ms")
    )


def _register(bootstrap: str, topic: str, devices: int) -> None:
    producer = BulkProducer(bootstrap)
    at = "2024-01-01T00:00:00+00:00"
    for i in range(devices):
        name = device_name(i)
        producer.send(topic, name.encode(), registration(name, at))
    producer.flush()


def steady_stream(
    bootstrap: str, topic: str, profile: Profile, batch: int, wait: float
) -> tuple[float, list[float]]:
    """Runs in a child process, so that neither side competes with the worker for its GIL: the
    steady producer, and beside it the bare consumer, started first so it reads live, not a backlog."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("bench-bare"),
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(profile.partitions)])
    consumer.consume(num_messages=batch, timeout=5)  # connected and fetching: the registrations
    total = int(profile.latency_rate * profile.latency_seconds)
    after_ms = time.time() * 1000
    latencies: list[float] = []
    stop = threading.Event()

    def consume() -> None:
        deadline = time.monotonic() + profile.latency_seconds + 60
        while len(latencies) < total and time.monotonic() < deadline and not stop.is_set():
            messages: list[Any] = consumer.consume(num_messages=batch, timeout=wait)
            now_ms = time.time() * 1000
            for message in messages:
                if message.error() is None:
                    _, stamp = message.timestamp()
                    if stamp >= after_ms:
                        latencies.append(now_ms - stamp)

    thread = threading.Thread(target=consume, name="bare-consumer")
    thread.start()
    try:
        achieved = produce_steadily(
            bootstrap, topic, profile.devices, profile.latency_rate, profile.latency_seconds
        )
        thread.join(60)
    finally:
        stop.set()
        thread.join(10)
        consumer.close()
    return achieved, latencies

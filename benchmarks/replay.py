"""Replay throughput: DLQ rows republished per second by the operator-side service (what
`eventhandler replay` runs), beside a bare producer sending the very same bytes with the same
producer configuration. The DLQ is filled by the real worker from a topic of poison messages."""

from __future__ import annotations

import importlib.util
import time

import psycopg
from confluent_kafka import Producer

from benchmarks.report import Row
from benchmarks.runner import Bench, run_worker
from benchmarks.workload import Workload, produce
from eventhandler.config import Settings

SCENARIO = "3 replay"


def available() -> bool:
    return importlib.util.find_spec("eventhandler.replay") is not None


def replay(bench: Bench) -> None:
    if not available():
        bench.report.add(
            Row(SCENARIO, "DLQ rows republished", None, "rows/s", note="not available yet", status="SKIP")
        )
        return
    from eventhandler.app import build_service
    from eventhandler.models import DLQFilter

    profile, services = bench.profile, bench.services
    source = services.topic("replay-source", profile.partitions)
    workload = Workload(profile.devices, profile.replay_rows, poison_every=1, tag="replay")
    bench.say(f"replay: filling the DLQ with {workload.poison:,} rows through the worker")
    produce(services.bootstrap, source, workload)
    with services.database() as url:
        filled = run_worker(bench, "replay-fill", source, workload, database_url=url)
        if filled.problems:
            raise RuntimeError("DLQ not filled as expected: " + filled.note)
        settings = services.settings(url, source)
        service, pool = build_service(settings)
        try:
            bench.say("replay: republishing every pending row")
            target = services.topic("replay-target", profile.partitions)
            started = time.perf_counter()
            report = service.replay(DLQFilter(statuses=("pending",)), actor="benchmark", to_topic=target)
            seconds = time.perf_counter() - started
        finally:
            pool.close()
        messages = _dlq_messages(url)
        bench.say("replay: a bare producer sending the same bytes")
        cold, warm = _bare_producer_rates(
            services.bootstrap, services.topic("replay-bare", profile.partitions), messages, settings
        )

    bench.report.note(
        "Replay: DLQService.replay(DLQFilter(statuses=pending), to_topic=…) from build_service(), timed "
        "around the call (count, claim, publish, mark replayed, audit). Baseline: a confluent-kafka Producer "
        "with the same producer_config() sending the same keys/values/headers, once started (starting an "
        "idempotent producer takes about 0.5 s on Tansu; replay's figure includes its own start)."
    )
    problems = [] if report.published == workload.poison else [f"published {report.published}"]
    size = sum(len(m[1] or b"") for m in messages) / max(len(messages), 1)
    bench.report.add(
        Row(
            SCENARIO,
            f"DLQ rows republished ({report.published:,})",
            report.published / seconds if seconds else None,
            "rows/s",
            warm,
            "raw producer, same bytes",
            note="; ".join(problems)
            or f"avg payload {size:.0f} B; raw producer incl. its start: {cold:,.0f}/s",
            status="WRONG" if problems else "INFO",
        )
    )


Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]


def _dlq_messages(url: str) -> list[Message]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT message_key, event_payload, header_keys, header_values FROM dlq ORDER BY dlq_id"
        ).fetchall()
    return [
        (
            bytes(key) if key is not None else None,
            bytes(value) if value is not None else None,
            [(k, bytes(v) if v is not None else None) for k, v in zip(keys, values, strict=True)],
        )
        for key, value, keys, values in rows
    ]


def _bare_producer_rates(
    bootstrap: str, topic: str, messages: list[Message], settings: Settings
) -> tuple[float, float]:
    """The replayer's own producer configuration, no database: how fast these bytes can go, from a
    new producer (as the replay command starts one) and then from the same producer, warm."""
    producer = Producer(settings.producer_config())
    rates = []
    for _ in range(2):
        started = time.perf_counter()
        for key, value, headers in messages:
            while True:
                try:
                    producer.produce(topic, value, key, headers=headers or None)  # type: ignore[arg-type]  # invariant list
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        if producer.flush(60):
            raise RuntimeError("bare producer: messages left undelivered")
        rates.append(len(messages) / (time.perf_counter() - started))
    return rates[0], rates[1]

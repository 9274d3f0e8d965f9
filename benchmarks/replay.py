"""Replay throughput: DLQ rows republished per second by the operator-side service (what
`eventhandler replay` runs), beside a bare producer sending the very same bytes with the same
producer configuration. The DLQ is filled by the real worker from a topic of poison messages."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any
from unittest.mock import patch

import psycopg
from confluent_kafka import Producer

from benchmarks.report import Row
from benchmarks.runner import Bench, run_worker
from benchmarks.workload import Workload, produce
from eventhandler.app import build_service
from eventhandler.config import Settings
from eventhandler.models import DLQFilter
from eventhandler.replay import Replayer, ReplayReport

SCENARIO = "3 replay"


def replay(bench: Bench) -> None:
    profile, services = bench.profile, bench.services
    source = services.topic("replay-source", profile.partitions)
    workload = Workload(profile.devices, profile.replay_rows, poison_every=1, tag="replay")
    produce(services.bootstrap, source, workload)
    target = services.topic("replay-target", profile.partitions)
    with services.database() as url:
        _fill(bench, source, workload, url)
        bench.say("replay: republishing every pending row")
        settings = services.settings(url, source)
        report, seconds = _replay(settings, target)
        problems = _unmarked(url, report, workload.poison)
        messages = _dlq_messages(url)
    # Filled again (not copied: a copy's WAL and checkpoints would slow the replay beside it), so that
    # both replays start from the same state, just after their fill.
    with services.database() as url:
        _fill(bench, source, workload, url)
        bench.say("replay: the same rows again, to a broker that confirms each at once")
        floor, floor_seconds = _replay(services.settings(url, source), target, broker=InstantBroker)
        floor_problems = _unmarked(url, floor, workload.poison)
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
    size = sum(len(m[1] or b"") for m in messages) / max(len(messages), 1)
    rate = report.published / seconds if seconds else None
    floor_rate = floor.published / floor_seconds if floor_seconds else None
    bench.report.add(
        Row(
            SCENARIO,
            f"DLQ rows republished ({report.published:,})",
            rate,
            "rows/s",
            warm,
            "raw producer, same bytes",
            note="; ".join(problems)
            or f"avg payload {size:.0f} B; raw producer incl. its start: {cold:,.0f}/s",
            status="WRONG" if problems else "INFO",
        )
    )
    bench.report.add(
        Row(
            SCENARIO,
            f"same rows, client and broker taken out ({floor.published:,})",
            floor_rate,
            "rows/s",
            rate,
            "the replay above",
            note="; ".join(floor_problems)
            or f"{floor_rate / warm if floor_rate else 0:.2f}x of the raw producer",
            status="WRONG" if floor_problems else "INFO",
        )
    )
    bench.report.note(
        "Replay, client and broker taken out: the same replay of the same rows (filled again the same way), "
        "with a producer that confirms every message at its next poll (no librdkafka, no network, no broker, "
        "no producer start): what the replay's own work — taking the rows, building the messages, marking "
        "each row replayed, the audit, in PostgreSQL and in Python — allows. Both replays are checked: every "
        "row replayed once and named by the replay's audit rows."
    )


Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]


def _unmarked(url: str, report: ReplayReport, rows: int) -> list[str]:
    """What a replay left undone: rows not published, not marked replayed once, or not audited."""
    with psycopg.connect(url) as conn:
        marked = conn.execute(
            "SELECT count(*) FROM dlq WHERE status = 'replayed' AND replay_count = 1"
        ).fetchone()
        audited = conn.execute(
            "SELECT coalesce(sum(cardinality(dlq_ids)), 0) FROM dlq_audit WHERE action = 'replay'"
        ).fetchone()
    found = {
        "published": report.published,
        "marked": marked[0] if marked else 0,
        "audited": audited[0] if audited else 0,
    }
    return [f"{what} {count:,} of {rows:,}" for what, count in found.items() if count != rows]


def _fill(bench: Bench, source: str, workload: Workload, url: str) -> None:
    bench.say(f"replay: filling the DLQ with {workload.poison:,} rows through the worker")
    filled = run_worker(bench, "replay-fill", source, workload, database_url=url)
    if filled.problems:
        raise RuntimeError("DLQ not filled as expected: " + filled.note)


def _replay(
    settings: Settings, to_topic: str, *, broker: Callable[[], Any] | None = None
) -> tuple[ReplayReport, float]:
    """Every pending row replayed by the operators' service (`build_service`), timed around the call;
    with `broker`, the replayer's producer is that instead of a real one."""
    service, pool = build_service(settings)
    try:
        with patch.object(Replayer, "connect", lambda _self: broker()) if broker else nullcontext():
            started = time.perf_counter()
            report = service.replay(DLQFilter(statuses=("pending",)), actor="benchmark", to_topic=to_topic)
            return report, time.perf_counter() - started
    finally:
        pool.close()


class InstantBroker:
    """The producer calls a replay makes, each message confirmed at the next poll."""

    def __init__(self) -> None:
        self._waiting: list[Callable[[Any, Any], None]] = []

    def produce(self, _topic: str, *, on_delivery: Callable[[Any, Any], None], **_message: Any) -> None:
        self._waiting.append(on_delivery)

    def poll(self, _timeout: float = 0) -> int:
        confirmed, self._waiting = self._waiting, []
        for report in confirmed:
            report(None, None)
        return len(confirmed)

    def flush(self, _timeout: float = 0) -> int:
        self.poll()
        return 0


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

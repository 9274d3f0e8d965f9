"""Fuzzing the whole batch path against a real PostgreSQL: decode → ledger claim → handlers → projection
writes → dead letters → positions, run the way the worker runs it (a suspect failure is retried, then
isolated).

Every message, whatever its bytes — key, value, header keys and values; any CloudEvents shape; empty to
several megabytes; nesting thousands deep — must end in exactly one outcome: applied, a duplicate,
skipped by policy, or one DLQ row holding its exact bytes. A batch never raises, never stalls on a
transient error it caused, and its time stays bounded by its size.

CI runs a fast slice; `EVENTHANDLER_TEST_FUZZ_EXAMPLES=3000 .venv/bin/pytest tests/integration/test_fuzz_batch.py
--hypothesis-show-statistics` is the long run.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, LiteralString

import psycopg
import psycopg_pool
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventhandler.batch import BatchResult, DecodedBatch, Record
from eventhandler.config import Settings
from eventhandler.db import create_pool, translate_db_errors
from eventhandler.errors import SuspectFailure
from eventhandler.handlers.loading import load_registry
from eventhandler.ledger import Ledger
from eventhandler.librdkafka import RawProducer, header_key
from eventhandler.pipeline import BatchProcessor
from eventhandler.policy import SUSPECT_ATTEMPTS, FailurePolicy
from tests.support import kafka as k
from tests.support.dlq import DLQ
from tests.support.worker import run_until_idle

EXAMPLES = int(os.environ.get("EVENTHANDLER_TEST_FUZZ_EXAMPLES", "300"))
GROUP = "fuzz-group"
_topics = (f"fuzz-{n}" for n in itertools.count())

# -- what a hostile producer can send ---------------------------------------------------------------------

texts = st.text(max_size=40) | st.sampled_from(["", "\x00", "\ud800", "a" * 3000, "%s", "'; --", "::"])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
device_ids = st.sampled_from(["dev-1", "dev-2", "dev-3"]) | texts
device_data = st.fixed_dictionaries(
    {"device_id": device_ids},
    optional={
        "name": texts,
        "site": texts | st.none(),
        "metric": st.sampled_from(["t", "humidity", "m" * 5000]) | texts,
        "value": st.floats() | st.integers() | json_values,
        "unit": texts,
    },
)
event_types = (
    st.sampled_from(["device.registered", "device.reading", "device.decommissioned", "device.unknown", ""])
    | json_values
)
attributes = st.fixed_dictionaries(
    {},
    optional={
        "specversion": st.sampled_from(["1.0", "0.3", ""]) | json_values,
        "id": st.sampled_from(["e-1", "e-2", "e-3"]) | texts | json_values,  # repeats make duplicates
        "source": st.sampled_from(["/s", "/t"]) | texts | json_values,
        "type": event_types,
        "time": st.sampled_from(["2026-01-01T00:00:00Z", "yesterday", "9999-12-31T23:59:59Z"]) | json_values,
        "datacontenttype": st.sampled_from(["application/json", "text/plain"]) | json_values,
        "subject": texts,
        "data": device_data | json_values,
        "data_base64": st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()) | texts,
        "eventhandler-dlq-id": st.integers(),  # a forged replay attribute is just an attribute
    },
)
fresh_ids = st.builds(lambda: str(uuid.uuid4()))
# Events the handlers accept, so that ledger claims, handlers and projection writes are reached too.
valid_data = st.fixed_dictionaries(
    {
        "device_id": st.sampled_from(["dev-1", "dev-2", "dev-3"]),
        "name": st.sampled_from(["boiler", "pump", "\u00e9t\u00e9", "n\x00ul"]),
        "metric": st.sampled_from(["t", "humidity", "m" * 5000]),
        "value": st.integers(-1000, 1000),
    }
)
well_formed = st.fixed_dictionaries(
    {
        "specversion": st.just("1.0"),
        # mostly fresh ids (hypothesis would draw the same few uuids), some repeats for duplicates
        "id": st.one_of(fresh_ids, fresh_ids, fresh_ids, st.sampled_from(["e-1", "e-2"])),
        "source": st.just("/s"),
        "type": st.sampled_from(
            [
                "device.registered",
                "device.reading",
                "device.reading",
                "device.decommissioned",
                "device.unknown",
            ]
        ),
        "data": valid_data | device_data,
    }
)


@st.composite
def values(draw: st.DrawFn, huge: int = 3_000_000) -> tuple[bytes | None, list[tuple[bytes, bytes | None]]]:
    """A message value and the CloudEvents headers that go with it (binary binding), if any."""
    kind = draw(st.sampled_from(["structured"] * 4 + ["binary"] * 2 + ["bytes", "deep", "huge", "none"]))
    if kind == "none":
        return None, []
    if kind == "bytes":
        return draw(st.binary(max_size=300)), []
    if kind == "deep":
        depth = draw(st.sampled_from([100, 5_000, 200_000]))
        return b'{"specversion":"1.0","id":"x","source":"/s","type":"device.reading","data":' + (
            b"[" * depth + b"]" * depth + b"}"
        ), []
    if kind == "huge":
        size = draw(st.sampled_from([huge // 3, huge]))
        event = draw(well_formed)
        where = draw(st.sampled_from(["id", "pad", "metric"]))
        if where == "metric" and isinstance(event["data"], dict):
            event["data"]["metric"] = "m" * size
        else:
            event[where] = "x" * size
        return json.dumps(event).encode(), []
    event = draw(st.one_of(well_formed, well_formed, attributes))
    ascii_only = draw(st.booleans())
    if kind == "structured":
        return json.dumps(event, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"), []
    headers = [
        (f"ce_{name}".encode(), _header_value(value)) for name, value in event.items() if name != "data"
    ]
    body = json.dumps(event.get("data"), ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    return body, headers


def _header_value(value: Any) -> bytes:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.encode("utf-8", "surrogatepass")


header_keys = st.binary(max_size=30).filter(lambda raw: b"\x00" not in raw) | st.sampled_from(
    [b"ce_specversion", b"ce_id", b"eventhandler-dlq-id", b"eventhandler-origin", b"\xff\xfe", b"\xc3("]
)
header_values = (
    st.none() | st.binary(max_size=80) | st.sampled_from([b"1", b"topic:0:0", b"t\x00:0:0", b"-1", b"9" * 30])
)


Message = tuple[int, bytes | None, bytes | None, list[tuple[bytes, bytes | None]]]


@st.composite
def messages(draw: st.DrawFn, huge: int = 3_000_000) -> Message:
    value, headers = draw(values(huge))
    headers += draw(st.lists(st.tuples(header_keys, header_values), max_size=5))
    key = draw(st.none() | st.binary(max_size=40) | st.sampled_from([b"dev-1", b"\x00" * 10]))
    return draw(st.integers(0, 2)), key, value, headers


batches = st.lists(messages(), min_size=1, max_size=12)


# -- the batch path, as the worker runs it ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(pg_admin_url: str, template_db: str) -> Iterator[psycopg_pool.ConnectionPool]:
    """One database for the whole campaign (from the migrated template)."""
    name = next(_topics).replace("-", "_") + f"_{os.getpid()}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    url = pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    made = create_pool(Settings(database_url=url, db_statement_timeout_seconds=10, db_pool_size=2))
    made.wait()
    yield made
    made.close()
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def commit_like_the_worker(
    pool: psycopg_pool.ConnectionPool, processor: BatchProcessor, batch: DecodedBatch
) -> BatchResult:
    """The worker retries a suspect failure while PostgreSQL answers, then isolates it; any other
    transient error caused by a message would stall its partition, so it fails the campaign."""
    for attempt in range(SUSPECT_ATTEMPTS + 1):
        try:
            with translate_db_errors(), pool.connection() as conn:
                return processor.write(conn, batch, isolate_suspects=attempt >= SUSPECT_ATTEMPTS)
        except SuspectFailure:
            continue
    raise AssertionError("a suspect failure survived isolation")


def test_every_message_ends_in_exactly_one_outcome(pool: psycopg_pool.ConnectionPool) -> None:
    reached: Counter[str] = Counter()
    registrations = [
        (0, None, json.dumps(k.registered(device, event_id=f"reg-{device}")).encode(), [])
        for device in ("dev-1", "dev-2", "dev-3")
    ]
    run_batch(pool, registrations, skip_unknown=False)  # so that readings can apply

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
        database=None,
    )
    @given(batch=batches, skip_unknown=st.booleans())
    def one_batch(batch: list[Message], skip_unknown: bool) -> None:
        reached.update(run_batch(pool, batch, skip_unknown))

    one_batch()
    # the strategies are worth something only if they reach every outcome
    assert reached["batches"] == EXAMPLES
    assert all(reached[outcome] for outcome in ("applied", "duplicate", "deserialize", "handler")), reached
    print(f"fuzz campaign: {dict(reached)}")


def run_batch(pool: psycopg_pool.ConnectionPool, batch: list[Message], skip_unknown: bool) -> Counter[str]:
    """One batch through the path; the outcomes it reached."""
    topic = next(_topics)
    offsets = dict.fromkeys(range(3), 0)
    records = []
    for partition, key, value, headers in batch:
        shown = [(header_key(name), header_value) for name, header_value in headers]
        records.append(Record(topic, partition, offsets[partition], key, value, shown or None))
        offsets[partition] += 1
    repository = DLQ.on(pool)
    processor = BatchProcessor(
        consumer_group=GROUP,
        registry=load_registry([]),
        ledger=Ledger(GROUP),
        dlq=repository.writer,
        policy=FailurePolicy(skip_unknown=skip_unknown),
    )
    applied_before = _count(pool, "SELECT count(*) FROM applied_events")

    started = time.perf_counter()
    decoded = processor.decode(records)
    result = commit_like_the_worker(pool, processor, decoded)
    elapsed = time.perf_counter() - started

    size = sum(len(r.value or b"") + len(r.key or b"") for r in records)
    assert elapsed < 10 + 5 * size / 1_000_000, f"{len(records)} messages, {size} bytes took {elapsed:.1f}s"
    applied = sum(result.applied.values())
    assert applied + result.duplicates + result.skipped + len(result.dlq_ids) == len(records)
    assert len(set(result.dlq_ids)) == len(result.dlq_ids)
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT dlq_id, source_partition, source_offset FROM dlq WHERE source_topic = %s", (topic,)
        ).fetchall()
        positions = dict(
            conn.execute(
                "SELECT partition, next_offset FROM consumer_positions WHERE consumer = %s AND topic = %s",
                (GROUP, topic),
            ).fetchall()
        )
    assert sorted(r[0] for r in rows) == sorted(result.dlq_ids)  # one row per failed message, no other
    assert positions == {p: n for p, n in offsets.items() if n}
    # each applied event claimed once in the ledger
    assert _count(pool, "SELECT count(*) FROM applied_events") - applied_before == applied
    by_position = {(r.partition, r.offset): r for r in records}
    entries = repository.operators.entries(result.dlq_ids)
    for dlq_id, partition, offset in rows:
        record, entry = by_position[(partition, offset)], entries[dlq_id]
        assert (entry.event_payload, entry.message_key) == (record.value, record.key)
        assert entry.headers == (record.headers or [])  # header keys and values byte for byte
        assert entry.error_message  # a clear error, whatever the input
    reached = Counter({"batches": 1, "messages": len(records), "applied": applied})
    reached.update(duplicate=result.duplicates, skipped=result.skipped, **result.failed)
    return reached


def _count(pool: psycopg_pool.ConnectionPool, query: LiteralString) -> int:
    with pool.connection() as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


# -- the same through a real broker and the real worker ---------------------------------------------------

# The broker's default limit is 1 MB a message; the raw producer writes any header key.
broker_batches = st.lists(messages(huge=600_000), min_size=40, max_size=80)


@settings(
    max_examples=2,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    database=None,
)
@given(batch=broker_batches)
def test_through_the_broker_every_message_ends_in_one_outcome_and_the_worker_keeps_going(
    make_settings: Callable[..., Settings], kafka_bootstrap: str, batch: list[Message]
) -> None:
    """What only the consumer sees: header keys that are not UTF-8 (read again through librdkafka's C
    API), Kafka's own framing of null keys and values, and every message of the batch after a bad one."""
    topic = next(_topics)
    k.create_topic(kafka_bootstrap, topic, partitions=3)
    # Random bytes fail alike often enough to look like a flood (60 empty values of 60 keys): the
    # guard would hold them, as it should; this property is about each message's own outcome.
    settings = make_settings(topics=[topic], flood_guard=False)
    producer = RawProducer({"bootstrap.servers": kafka_bootstrap, "acks": "all", "enable.idempotence": True})
    try:
        for number, (partition, key, value, headers) in enumerate(batch):
            assert producer.produce(number, topic, value, key, headers, partition=partition) is None
        assert producer.flush(60) == 0
    finally:
        producer.close()
    assert set(producer.outcomes.values()) == {None}, producer.outcomes
    stats = run_until_idle(settings, idle=2)

    assert stats.consumed == len(batch)
    assert stats.applied + stats.duplicates + stats.failed == len(batch)  # unknown types: dead-lettered
    with psycopg.connect(settings.dsn) as conn:
        rows = conn.execute(
            "SELECT source_partition, source_offset, event_payload, message_key,"
            " coalesce(header_keys_raw, header_keys::bytea[]), header_values FROM dlq WHERE source_topic = %s",
            (topic,),
        ).fetchall()
        stored = dict(
            conn.execute(
                "SELECT partition, next_offset FROM consumer_positions WHERE topic = %s", (topic,)
            ).fetchall()
        )
    assert len(rows) == stats.failed
    by_partition: dict[int, list[Message]] = {}
    for message in batch:
        by_partition.setdefault(message[0], []).append(message)
    assert stored == {p: len(sent) for p, sent in by_partition.items()}
    for partition, offset, value, key, header_keys, header_values in rows:
        _, sent_key, sent_value, sent_headers = by_partition[partition][offset]
        assert (_bytes(value), _bytes(key)) == (sent_value, sent_key)
        assert list(zip(map(bytes, header_keys), map(_bytes, header_values), strict=True)) == sent_headers


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)

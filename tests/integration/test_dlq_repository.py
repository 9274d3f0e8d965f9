from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg_pool
import pytest

from eventhandler.dlq import writer as dlq
from eventhandler.dlq.rows import LEASE_CLASS
from eventhandler.errors import NotFound
from eventhandler.models import DLQFilter, FailedMessage, ReplayOrigin
from tests.support.dlq import DLQ
from tests.support.factories import failed_message
from tests.support.waiting import wait_for
from tests.support.worker import scalar


@pytest.fixture
def pool(db_url: str) -> Iterator[psycopg_pool.ConnectionPool]:
    with psycopg_pool.ConnectionPool(db_url, min_size=1, max_size=4, open=True) as pool:
        yield pool


@pytest.fixture
def repo(pool: psycopg_pool.ConnectionPool) -> DLQ:
    return DLQ.on(pool)


def record(repo: DLQ, pool: psycopg_pool.ConnectionPool, *failures: FailedMessage) -> list[int]:
    with pool.connection() as conn, conn.transaction():
        return repo.writer.record_failures(conn, list(failures))


DEFAULT_VALUE = failed_message().value  # what a replay of a row `failed_message` made publishes

HOSTILE_PAYLOADS = {
    "not_utf8": b"\xff\xfe\xfa invalid \xc3\x28",
    "nul_bytes": b'{"a":"\x00"}\x00\x00end',
    "empty": b"",
    "one_mib": bytes(range(256)) * 4096,
    "null_tombstone": None,
}


@pytest.mark.parametrize("name", list(HOSTILE_PAYLOADS))
def test_hostile_payloads_round_trip_byte_for_byte(repo: DLQ, pool: Any, name: str) -> None:
    payload = HOSTILE_PAYLOADS[name]
    headers: list[tuple[str, bytes | None]] = [
        ("ce_id", b"\xff\x00binary"),
        ("dup", b"1"),
        ("dup", b"2"),
        ("nullable", None),
        ("empty", b""),
    ]
    key = b"\x00\xffkey"
    (dlq_id,) = record(
        repo,
        pool,
        failed_message(
            value=payload, key=key, headers=headers, stage="deserialize", event_id=None, event_type=None
        ),
    )
    entry = repo.operators.get(dlq_id)
    assert entry.event_payload == payload
    assert entry.message_key == key
    assert entry.headers == headers
    assert entry.payload_size == (None if payload is None else len(payload))


def test_insert_a_batch_in_one_call_and_read_every_field(repo: DLQ, pool: Any) -> None:
    failures = [failed_message(offset=100 + i, event_id=f"e{i}") for i in range(50)]
    ids = record(repo, pool, *failures)
    assert len(ids) == 50
    assert len(set(ids)) == 50
    entry = repo.operators.get(ids[7])
    assert entry.event_id == "e7"
    assert entry.source_topic == "device-events"
    assert entry.source_offset == 107
    assert entry.stage == "handler"
    assert entry.status == "pending"
    assert entry.error_traceback is not None
    assert entry.retry_count == 0
    assert entry.failure_count == 1
    assert entry.message_timestamp == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert entry.worker_version == "test"
    assert len(entry.fingerprint) == 16


def test_batches_with_and_without_headers_store_them_exactly(repo: DLQ, pool: Any) -> None:
    bare = record(repo, pool, *[failed_message(offset=200 + i, headers=[]) for i in range(3)])
    mixed = record(
        repo, pool, failed_message(offset=210, headers=[]), failed_message(offset=211, headers=[("h", None)])
    )
    assert [repo.operators.get(i).headers for i in bare] == [[], [], []]
    assert [repo.operators.get(i).headers for i in mixed] == [[], [("h", None)]]


def test_a_repeat_of_the_same_message_updates_its_row(repo: DLQ, pool: Any) -> None:
    first = failed_message(offset=5, error_message="first error")
    (dlq_id,) = record(repo, pool, first)
    again = failed_message(offset=5, error_message="second error", stage="projection")
    (same_id,) = record(repo, pool, again)
    assert same_id == dlq_id
    entry = repo.operators.get(dlq_id)
    assert entry.error_message == "second error"
    assert entry.stage == "projection"
    assert entry.failure_count == 2
    assert entry.last_failed_at >= entry.failed_at
    assert repo.operators.count(DLQFilter()) == 1


def test_ids_come_back_in_the_order_of_the_failures_whatever_the_mix(repo: DLQ, pool: Any) -> None:
    (replayed_row,) = record(repo, pool, failed_message(offset=40, error_message="original"))
    mixed = [
        failed_message(offset=41, error_message="a"),
        failed_message(offset=77, replay_of=origin(replayed_row, 40), error_message="replayed, failed again"),
        failed_message(consumer="group-b", offset=41, error_message="other group, same offset"),
        failed_message(offset=42, error_message="b"),
        failed_message(offset=41, error_message="a, seen twice in one batch"),
    ]
    ids = record(repo, pool, *mixed)
    assert ids[1] == replayed_row
    assert ids[0] == ids[4], "one row per message, even within one batch"
    assert len({ids[0], ids[1], ids[2], ids[3]}) == 4
    for dlq_id, failure in zip(ids, mixed, strict=True):
        entry = repo.operators.get(dlq_id)
        assert entry.consumer == failure.consumer
        if failure.replay_of is None:
            assert (entry.source_partition, entry.source_offset) == (failure.partition, failure.offset)
    assert repo.operators.get(ids[0]).error_message == "a, seen twice in one batch"
    assert repo.operators.get(replayed_row).retry_count == 1
    assert repo.operators.count(DLQFilter()) == 4


def test_repeats_upserted_twice_in_one_transaction_or_without_one_count_once_each(
    repo: DLQ, db_url: str
) -> None:
    first = [failed_message(offset=300 + i) for i in range(3)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        ids = repo.writer.record_failures(conn, first)
        assert repo.writer.record_failures(conn, first) == ids  # the upsert path, outside a transaction
        with conn.transaction():
            assert repo.writer.record_failures(conn, first[:2]) == ids[:2]
            assert (
                repo.writer.record_failures(conn, first[1:]) == ids[1:]
            )  # a second upsert, same transaction
    assert [repo.operators.get(i).failure_count for i in ids] == [3, 4, 3]


def test_a_replayed_message_failing_again_returns_its_row_to_pending(repo: DLQ, pool: Any) -> None:
    (dlq_id,) = record(repo, pool, failed_message(offset=9))
    replay_all(repo, DLQFilter(ids=(dlq_id,)), limit=10, expect=[dlq_id])
    assert repo.operators.get(dlq_id).status == "replayed"
    # the replayed copy arrives at a new offset, carrying its dlq_id
    again_failed = failed_message(offset=999, replay_of=origin(dlq_id, 9), error_message="still broken")
    (again,) = record(repo, pool, again_failed)
    assert again == dlq_id
    entry = repo.operators.get(dlq_id)
    assert (entry.status, entry.retry_count, entry.error_message) == ("pending", 1, "still broken")
    assert entry.replay_count == 1
    assert repo.operators.count(DLQFilter()) == 1


def test_resolve_replayed_rows_inside_the_worker_transaction(repo: DLQ, pool: Any) -> None:
    ids = record(
        repo,
        pool,
        failed_message(offset=1),
        failed_message(offset=2),
        failed_message(offset=3, consumer="other"),
    )
    replays = [
        (origin(dlq_id, n), "/tests", "evt-1", DEFAULT_VALUE)
        for dlq_id, n in zip(ids, (1, 2, 3), strict=True)
    ]
    with pool.connection() as conn, conn.transaction():
        resolved = repo.writer.resolve_replayed(conn, "group-a", replays)
    assert sorted(resolved) == ids[:2]
    assert repo.operators.get(ids[0]).resolved_by == "replay"
    assert repo.operators.get(ids[2]).status == "pending"


def test_a_late_failing_copy_does_not_reopen_a_row_an_operator_closed(repo: DLQ, pool: Any) -> None:
    (dlq_id,) = record(repo, pool, failed_message(offset=7))
    assert repo.operators.discard([dlq_id], actor="test", note="given up") == [dlq_id]
    (other,) = record(
        repo, pool, failed_message(offset=700, replay_of=origin(dlq_id, 7), error_message="late")
    )
    assert other != dlq_id  # the late copy's failure is a row of its own
    assert (repo.operators.get(dlq_id).status, repo.operators.get(dlq_id).retry_count) == ("discarded", 0)


def test_a_row_that_knows_no_event_is_matched_only_by_the_bytes_its_replay_publishes(
    repo: DLQ, pool: Any
) -> None:
    """Coordinates and an id are easy to guess: a message with forged replay headers took over a row of
    a message that did not deserialize (its own bytes kept nowhere), or resolved it; and a garbage
    message naming a row that knows its event overwrote that row's error."""
    poison = failed_message(
        offset=0, stage="deserialize", value=b"\xff poison", event_id=None, event_source=None
    )
    (no_event,) = record(repo, pool, poison)
    (knows_event,) = record(repo, pool, failed_message(offset=1))
    forged = [
        failed_message(offset=41, replay_of=origin(no_event, 0), value=b"other bytes", error_message="x"),
        failed_message(
            offset=42, replay_of=origin(knows_event, 1), value=b"garbage", event_id=None, event_source=None
        ),
    ]
    own = record(repo, pool, *forged)
    assert no_event not in own
    assert knows_event not in own
    with pool.connection() as conn, conn.transaction():
        applied = [(origin(no_event, 0), "/tests", "evt-9", b"a valid event, not the row's")]
        assert repo.writer.resolve_replayed(conn, "group-a", applied) == []
    assert [repo.operators.get(i).status for i in (no_event, knows_event)] == ["pending", "pending"]
    assert repo.operators.get(no_event).error_message == poison.error_message
    assert {repo.operators.get(i).source_offset for i in own} == {41, 42}

    # The row's own bytes (its repair, when an operator made one) are its replay: that copy matches.
    with pool.connection() as conn:
        conn.execute("UPDATE dlq SET edited_payload = 'fixed' WHERE dlq_id = %s", (no_event,))
        conn.execute("UPDATE dlq SET edited_payload = 'still bad' WHERE dlq_id = %s", (knows_event,))
    again = failed_message(
        offset=43, replay_of=origin(knows_event, 1), value=b"still bad", event_id=None, event_source=None
    )
    assert record(repo, pool, again) == [knows_event]
    assert repo.operators.get(knows_event).retry_count == 1
    with pool.connection() as conn, conn.transaction():
        repaired = [(origin(no_event, 0), "/tests", "evt-9", b"fixed")]
        assert repo.writer.resolve_replayed(conn, "group-a", repaired) == [no_event]


def test_the_flood_guard_is_told_which_failures_are_replays_of_open_rows(repo: DLQ, pool: Any) -> None:
    """Matched as `record_failures` matches a replay to its row: a copy of another event, or other bytes
    for a row that knows no event, is an ordinary failure; a closed row has no replays."""
    event_row, no_event, tombstone, closed = record(
        repo,
        pool,
        failed_message(offset=1),
        failed_message(offset=2, value=b"\xff", event_id=None, event_source=None),
        failed_message(offset=3, value=None, event_id=None, event_source=None),
        failed_message(offset=4),
    )
    repo.operators.discard([closed], actor="t")
    copies = [
        failed_message(offset=10, replay_of=origin(event_row, 1)),  # the same event: a replay
        failed_message(offset=11, replay_of=origin(event_row, 1), event_id="other"),
        failed_message(
            offset=12, replay_of=origin(no_event, 2), value=b"\xff", event_id=None, event_source=None
        ),
        failed_message(
            offset=13, replay_of=origin(no_event, 2), value=b"\xfe", event_id=None, event_source=None
        ),
        failed_message(
            offset=14, replay_of=origin(tombstone, 3), value=None, event_id=None, event_source=None
        ),
        failed_message(offset=15, replay_of=origin(closed, 4)),
        failed_message(offset=16, replay_of=origin(event_row, 99)),  # other coordinates
        failed_message(offset=17),  # no replay at all
    ]
    with pool.connection() as conn:
        assert repo.writer.open_replays(conn, "group-a", copies) == {0, 2, 4}


def origin(dlq_id: int, offset: int, topic: str = "device-events", partition: int = 0) -> ReplayOrigin:
    """The origin a replay of row `dlq_id` (of the message at `offset`) carries."""
    return ReplayOrigin(dlq_id, topic, partition, offset)


@pytest.mark.parametrize(
    ("claimed", "source", "event_id"),
    [
        pytest.param(origin(0, 999), "/tests", "evt-1", id="other-offset"),
        pytest.param(origin(0, 5, topic="other-topic"), "/tests", "evt-1", id="other-topic"),
        pytest.param(origin(0, 5, partition=3), "/tests", "evt-1", id="other-partition"),
        pytest.param(origin(0, 5), "/tests", "evt-other", id="other-event"),
        pytest.param(origin(0, 5), "/elsewhere", "evt-1", id="other-source"),
    ],
)
def test_a_replay_header_that_does_not_match_its_row_touches_nothing(
    repo: DLQ, pool: Any, claimed: ReplayOrigin, source: str, event_id: str
) -> None:
    """A forged `eventhandler-dlq-id`, or one left from before a restore or TRUNCATE … RESTART
    IDENTITY, names a row the message is not a copy of: it neither resolves nor overwrites it."""
    (dlq_id,) = record(repo, pool, failed_message(offset=5))
    forged = ReplayOrigin(dlq_id, claimed.topic, claimed.partition, claimed.offset)
    with pool.connection() as conn, conn.transaction():
        assert (
            repo.writer.resolve_replayed(conn, "group-a", [(forged, source, event_id, DEFAULT_VALUE)]) == []
        )
    assert repo.operators.get(dlq_id).status == "pending"
    failure = failed_message(offset=600, replay_of=forged, event_id=event_id, event_source=source)
    (other,) = record(repo, pool, failure)
    assert other != dlq_id  # an ordinary failure of its own
    original = repo.operators.get(dlq_id)
    assert (original.retry_count, original.error_message) == (0, "device 'dev-1' is not registered")
    assert (repo.operators.get(other).source_offset, repo.operators.count(DLQFilter())) == (600, 2)


def test_every_filter_selects_exactly_its_rows(repo: DLQ, pool: Any, db: psycopg.Connection[Any]) -> None:
    ids = record(
        repo,
        pool,
        failed_message(
            offset=1,
            consumer="a",
            event_type="device.reading",
            stage="handler",
            error_message="device 'x' is not registered",
        ),
        failed_message(
            offset=2,
            consumer="a",
            event_type="device.registered",
            stage="projection",
            error_message="value too long",
        ),
        failed_message(
            offset=3,
            consumer="b",
            event_type=None,
            stage="deserialize",
            error_message="not valid JSON: 100%_sure",
        ),
        failed_message(
            offset=4,
            consumer="b",
            event_type="device.reading",
            stage="handler",
            error_message="device 'y' is not registered",
            topic="other",
        ),
    )
    db.execute("UPDATE dlq SET last_failed_at = now() - interval '2 days' WHERE dlq_id = %s", (ids[0],))
    repo.operators.discard([ids[1]], actor="test")

    def matching(**kw: Any) -> list[int]:
        return [r.dlq_id for r in repo.operators.list_rows(DLQFilter(**kw), limit=100)]

    assert matching() == ids
    assert matching(ids=(ids[1], ids[3])) == [ids[1], ids[3]]
    assert matching(consumer="b") == ids[2:]
    assert matching(event_type="device.reading") == [ids[0], ids[3]]
    assert matching(stage="deserialize") == [ids[2]]
    assert matching(statuses=("discarded",)) == [ids[1]]
    assert matching(statuses=("pending",)) == [ids[0], ids[2], ids[3]]
    assert matching(since=datetime.now(UTC) - timedelta(days=1)) == ids[1:]
    assert matching(until=datetime.now(UTC) - timedelta(days=1)) == [ids[0]]
    assert matching(error_contains="NOT REGISTERED") == [ids[0], ids[3]]
    assert matching(error_contains="100%_") == [ids[2]]
    assert matching(error_contains="%") == [ids[2]]
    assert matching(topic="other") == [ids[3]]
    same_group = repo.operators.get(ids[0]).fingerprint
    assert repo.operators.get(ids[3]).fingerprint == same_group  # ids and numbers normalised away
    assert matching(fingerprint=same_group) == [ids[0], ids[3]]
    assert matching(consumer="a", stage="handler", statuses=("pending",)) == [ids[0]]


def test_keyset_pagination_visits_every_row_once(repo: DLQ, pool: Any) -> None:
    ids = record(repo, pool, *[failed_message(offset=1000 + i) for i in range(25)])
    seen: list[int] = []
    cursor = None
    while True:
        page = repo.operators.list_rows(DLQFilter(), limit=10, after_id=cursor)
        if not page:
            break
        seen += [r.dlq_id for r in page]
        cursor = page[-1].dlq_id
    assert seen == ids


def test_get_unknown_id_raises_not_found(repo: DLQ) -> None:
    with pytest.raises(NotFound, match="12345"):
        repo.operators.get(12345)


def test_resolve_discard_delete_are_audited(repo: DLQ, pool: Any, db: psycopg.Connection[Any]) -> None:
    ids = record(repo, pool, *[failed_message(offset=i) for i in range(1, 5)])
    assert repo.operators.resolve([ids[0]], actor="alice", note="fixed upstream") == [ids[0]]
    assert repo.operators.discard([ids[1]], actor="bob") == [ids[1]]
    assert repo.operators.delete([ids[2]], actor="carol") == [ids[2]]
    assert (
        repo.operators.resolve([ids[1]], actor="alice") == []
    )  # discarded rows are not resolved behind one's back
    resolved = repo.operators.get(ids[0])
    assert (resolved.status, resolved.resolved_by, resolved.resolution_note) == (
        "resolved",
        "alice",
        "fixed upstream",
    )
    assert resolved.resolved_at is not None
    assert repo.operators.get(ids[1]).status == "discarded"
    with pytest.raises(NotFound):
        repo.operators.get(ids[2])
    audit = db.execute("SELECT actor, action, dlq_ids FROM dlq_audit ORDER BY audit_id").fetchall()
    assert audit == [
        ("alice", "resolve", [ids[0]]),
        ("bob", "discarded", [ids[1]]),
        ("carol", "delete", [ids[2]]),
    ]  # the resolve that changed nothing is not a change: no audit row


def test_purge_never_deletes_pending_rows(repo: DLQ, pool: Any, db: psycopg.Connection[Any]) -> None:
    ids = record(repo, pool, *[failed_message(offset=i) for i in range(1, 5)])
    repo.operators.resolve([ids[0]], actor="t")
    repo.operators.discard([ids[1]], actor="t")
    repo.operators.resolve([ids[3]], actor="t")
    db.execute("UPDATE dlq SET updated_at = now() - interval '10 days' WHERE dlq_id <> %s", (ids[3],))
    assert repo.operators.purge(older_than_seconds=86400 * 7, actor="t") == [ids[0], ids[1]]
    remaining = [r.dlq_id for r in repo.operators.list_rows(DLQFilter(), limit=10)]
    assert remaining == [ids[2], ids[3]]


def test_depth_and_oldest_pending_age(repo: DLQ, pool: Any, db: psycopg.Connection[Any]) -> None:
    ids = record(
        repo, pool, failed_message(offset=1), failed_message(offset=2), failed_message(offset=3, consumer="b")
    )
    repo.operators.resolve([ids[1]], actor="t")
    db.execute("UPDATE dlq SET failed_at = now() - interval '1 hour' WHERE dlq_id = %s", (ids[0],))
    depth = {(r.consumer, r.status): r.count for r in repo.operators.depth()}
    assert depth == {("group-a", "pending"): 1, ("group-a", "resolved"): 1, ("b", "pending"): 1}
    ages = repo.operators.oldest_pending_age()
    assert 3590 < ages["group-a"] < 3700
    assert ages["b"] < 60


def replay_all(repo: DLQ, flt: DLQFilter, *, limit: int, expect: list[int]) -> None:
    """Take rows under a lease and mark every one taken replayed, as a replayer does."""
    with repo.replays.lease() as lease:
        rows, claim = repo.replays.take(flt, limit=limit, lease=lease, lease_seconds=60)
        assert [r.dlq_id for r in rows] == expect
        assert claim is not None
        published = {"device-events": [r.dlq_id for r in rows]}
        repo.replays.finish(lease=lease, claim=claim, published=published, actor="t", detail={})


def test_two_replayers_never_claim_the_same_row(repo: DLQ, pool: Any) -> None:
    ids = record(repo, pool, *[failed_message(offset=i) for i in range(1, 41)])
    pending = DLQFilter(statuses=("pending",))
    with repo.replays.lease() as one, repo.replays.lease() as two:
        first, first_claim = repo.replays.take(pending, limit=25, lease=one, lease_seconds=60)
        second, second_claim = repo.replays.take(
            pending, limit=25, lease=two, lease_seconds=60
        )  # while one holds
        assert [r.dlq_id for r in first] == ids[:25]
        assert [r.dlq_id for r in second] == ids[25:]
        assert repo.replays.take(pending, limit=25, lease=two, lease_seconds=60)[0] == []
        for lease, rows, claim in ((one, first, first_claim), (two, second, second_claim)):
            assert claim is not None
            published = {"device-events": [r.dlq_id for r in rows[:-1]]}  # the last one: not confirmed
            repo.replays.finish(lease=lease, claim=claim, published=published, actor="t", detail={})
    assert repo.operators.count(DLQFilter(statuses=("replayed",))) == 38
    # the two rows whose publish failed were freed: a later replay takes them
    replay_all(repo, pending, limit=10, expect=[ids[24], ids[39]])


def test_takers_racing_for_the_same_rows_never_claim_one_twice(repo: DLQ, pool: Any) -> None:
    """A take only reads the rows and claims them in a table of its own: without its lock, two takers
    could both read a row as free before either's claim commits. Four threads, small chunks, the same
    rows: every row claimed exactly once."""
    ids = record(repo, pool, *[failed_message(offset=i) for i in range(1, 201)])
    pending = DLQFilter(statuses=("pending",))
    claimed: list[list[int]] = [[] for _ in range(4)]
    start, end = threading.Barrier(4), threading.Barrier(4)

    def take_all(me: int) -> None:
        with repo.replays.lease() as lease:
            start.wait(10)
            while True:
                rows, claim = repo.replays.take(pending, limit=7, lease=lease, lease_seconds=60)
                if claim is None:
                    break
                claimed[me] += [r.dlq_id for r in rows]
            end.wait(10)  # a lease let go frees its claims (as a replayer that dies does)

    with ThreadPoolExecutor(4) as pool_of_takers:
        list(pool_of_takers.map(take_all, range(4)))
    every = [dlq_id for mine in claimed for dlq_id in mine]
    assert sorted(every) == ids  # each once, none left out
    assert all(claimed), "each taker got a share"


def test_a_lease_whose_replayer_died_frees_its_rows_at_once(repo: DLQ, pool: Any, db_url: str) -> None:
    """A replayer killed mid-chunk never marks or frees its rows; its session's lock goes with it."""
    ids = record(repo, pool, *[failed_message(offset=i) for i in range(1, 6)])
    pending = DLQFilter(statuses=("pending",))
    dead = psycopg.connect(db_url, autocommit=True)
    assert dead.execute("SELECT pg_try_advisory_lock(%s, 77)", (LEASE_CLASS,)).fetchone() == (True,)
    with repo.replays.lease() as other:
        taken, _ = repo.replays.take(
            pending, limit=10, lease=77, lease_seconds=3600
        )  # the doomed replayer's rows
        assert [r.dlq_id for r in taken] == ids
        assert (
            repo.replays.take(pending, limit=10, lease=other, lease_seconds=60)[0] == []
        )  # held while it lives
        dead.close()
        wait_for(lambda: repo.replays.take(pending, limit=10, lease=other, lease_seconds=60)[0], timeout=10)


def test_a_row_the_worker_settled_during_the_publish_keeps_the_workers_status(repo: DLQ, pool: Any) -> None:
    """The replayed copy can be processed before the replayer marks the row: its outcome stands."""
    (dlq_id,) = record(repo, pool, failed_message(offset=5))
    with repo.replays.lease() as lease:
        _, claim = repo.replays.take(DLQFilter(ids=(dlq_id,)), limit=1, lease=lease, lease_seconds=60)
        assert claim is not None
        with pool.connection() as conn, conn.transaction():
            replayed = [(origin(dlq_id, 5), "/tests", "evt-1", DEFAULT_VALUE)]
            assert repo.writer.resolve_replayed(conn, "group-a", replayed) == [
                dlq_id
            ]  # the worker, meanwhile
        repo.replays.finish(
            lease=lease, claim=claim, published={"device-events": [dlq_id]}, actor="t", detail={}
        )
    entry = repo.operators.get(dlq_id)
    assert (entry.status, entry.replay_count) == ("resolved", 1)


def test_fingerprint_groups_and_counts(repo: DLQ, pool: Any) -> None:
    record(
        repo,
        pool,
        *[failed_message(offset=i, error_message=f"device 'd{i}' is not registered") for i in range(1, 6)],
        failed_message(
            offset=50,
            stage="deserialize",
            error_type="DeserializationError",
            error_message="message value is empty",
        ),
    )
    groups = repo.operators.fingerprint_groups(DLQFilter(), limit=10)
    assert [(g.stage, g.count) for g in groups] == [("handler", 5), ("deserialize", 1)]
    by_stage = repo.operators.counts_by("stage", DLQFilter())
    assert sorted(by_stage) == [("deserialize", "pending", 1), ("handler", "pending", 5)]


def test_the_copy_statements_name_their_columns_in_the_order_of_their_types(
    db: psycopg.Connection[Any],
) -> None:
    """The statements live whole in queries/dlq_write.sql and the COPY types in dlq/writer.py: this holds the
    two together (a column added to one and not the other would write values into the wrong columns)."""
    db.execute(dlq.WRITE["create_staging"])
    for statement, types in (
        (dlq.WRITE["copy_rows"], ["int8", *dlq.COPY_TYPES]),
        (dlq.WRITE["copy_headerless_rows"], ["int8", *dlq.HEADERLESS_TYPES]),
        (dlq.WRITE["copy_staging"], dlq.COPY_TYPES),
    ):
        found = re.search(r"COPY (\w+) \(([^)]*)\)", statement)
        assert found is not None
        table, columns = found[1], [column.strip() for column in found[2].split(",")]
        actual = [
            scalar(
                db,
                "SELECT atttypid::regtype::text FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s",
                table,
                column,
            )
            for column in columns
        ]
        assert actual == [scalar(db, "SELECT %s::regtype::text", pg_type) for pg_type in types], table


def test_open_rows_by_hour_and_group_trends_come_from_the_rows_own_times(
    repo: DLQ, pool: Any, db: psycopg.Connection[Any]
) -> None:
    """Three rows: one failed 5 h ago and is still open, one failed 3 h ago and was resolved 1 h ago,
    one failed 30 min ago. Open at the end of each hour: 0 before, 1, 2 from 3 h ago, 1 after the
    resolve, 2 in the last hour."""
    ids = [record(repo, pool, failed_message())[0] for _ in range(3)]
    now = datetime.now(UTC)
    for dlq_id, failed, resolved in [
        (ids[0], now - timedelta(hours=5, minutes=30), None),
        (ids[1], now - timedelta(hours=3, minutes=30), now - timedelta(hours=1, minutes=30)),
        (ids[2], now - timedelta(minutes=30), None),
    ]:
        db.execute(
            "UPDATE dlq SET failed_at = %s, last_failed_at = %s, resolved_at = %s,"
            " status = CASE WHEN %s::timestamptz IS NULL THEN 'pending' ELSE 'resolved' END WHERE dlq_id = %s",
            [failed, failed, resolved, resolved, dlq_id],
        )
    hours = repo.operators.open_by_hour()
    assert len(hours) == 24
    assert hours[:18] == [0] * 18
    assert hours[18:] == [1, 1, 2, 2, 1, 2]  # end of 5 h ago … end of the current hour (now)
    (group,) = repo.operators.fingerprint_groups(DLQFilter())
    assert group.trend[-6:] == [1, 0, 1, 0, 0, 1]
    assert sum(group.trend) == 3


def test_payload_contains_finds_text_in_the_payload_or_its_repair(
    repo: DLQ, pool: Any, db: psycopg.Connection[Any]
) -> None:
    plain, other, binary = record(
        repo,
        pool,
        failed_message(value=b'{"device_id": "pump-7"}'),
        failed_message(value=b'{"device_id": "fan-2"}'),
        failed_message(value=b"\xff\x00pump-7\xfe"),
    )
    db.execute("UPDATE dlq SET edited_payload = %s WHERE dlq_id = %s", [b'{"device_id": "pump-8"}', other])
    found = {r.dlq_id for r in repo.operators.list_rows(DLQFilter(payload_contains="pump-7"))}
    assert found == {plain, binary}
    assert {r.dlq_id for r in repo.operators.list_rows(DLQFilter(payload_contains="pump-8"))} == {other}
    assert repo.operators.list_rows(DLQFilter(payload_contains="PUMP-7")) == []  # bytes: case-sensitive
    assert repo.operators.list_rows(DLQFilter(payload_contains="%")) == []  # no pattern characters

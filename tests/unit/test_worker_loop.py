"""The pipelined loop's ordering rules, with fakes: a batch is never committed after the batch before
it was given up, nor for partitions revoked while it waited."""

from __future__ import annotations

import time
from typing import Any

import pytest

from eventhandler.batch import DecodedBatch, Record
from eventhandler.errors import DatabaseUnavailable, SuspectFailure
from eventhandler.inflight import InFlight
from eventhandler.observer import BatchHealth, Observers, WorkerStats
from eventhandler.policy import Backoff, Decision, FailurePolicy
from eventhandler.worker import SETTLE_SLICE_SECONDS, Worker
from tests.fakes import FakeProcessor, FakeSource, FakeTransaction


def records(partition: int, *offsets: int) -> list[Record]:
    return [Record("t", partition, offset, None, b"{}", None) for offset in offsets]


def make_worker(
    wait: float = 0.5, source: FakeSource | None = None
) -> tuple[Worker, FakeSource, FakeProcessor]:
    source, processor = source or FakeSource(), FakeProcessor()
    health = BatchHealth()
    policy = FailurePolicy(Backoff(0.001, 0.002))
    inflight = InFlight(FakeTransaction(processor), source, policy, Observers([health]))
    worker = Worker(
        source=source,
        processor=processor,
        inflight=inflight,
        stats=WorkerStats(),
        health=health,
        batch_max_messages=500,
        batch_max_wait_seconds=wait,
        labels={},
    )
    return worker, source, processor


def test_batches_commit_in_order_and_kafka_hears_only_what_postgres_has() -> None:
    worker, source, processor = make_worker()
    worker.submit(records(0, 1, 2))
    worker.submit(records(0, 3, 4))
    worker.inflight.settle()
    assert processor.committed == [[("t", 0, 1), ("t", 0, 2)], [("t", 0, 3), ("t", 0, 4)]]
    assert source.committed == [{("t", 0): 3}, {("t", 0): 5}]


def test_nothing_is_committed_past_a_batch_given_up_at_shutdown() -> None:
    worker, source, processor = make_worker()
    processor.down = True
    worker.submit(records(0, 1, 2))

    def shutdown_then_postgres_returns() -> None:
        worker.stop()
        processor.down = False

    source.on_poll.append(shutdown_then_postgres_returns)
    worker.submit(records(0, 3, 4))  # settles the first batch: retried, then given up at shutdown
    worker.inflight.settle()
    assert processor.committed == []  # offsets 3-4 were not committed ahead of 1-2
    assert source.committed == []


def test_partitions_revoked_while_a_batch_waits_are_left_to_their_new_owner() -> None:
    worker, source, processor = make_worker()
    processor.down = True
    worker.submit(records(0, 1) + records(1, 1))

    def rebalance_then_postgres_returns() -> None:
        source.assignment.discard(("t", 1))
        source.on_revoked({("t", 1)})
        processor.down = False

    source.on_poll.append(rebalance_then_postgres_returns)
    worker.submit(records(0, 2) + records(1, 2))
    worker.inflight.settle()
    assert processor.committed == [[("t", 0, 1)], [("t", 0, 2)]]
    assert all(("t", 1) not in positions for positions in source.committed)


def sliced_worker(answers: list[Any], wait: float) -> tuple[Worker, FakeSource, FakeProcessor]:
    source = FakeSource(answers)
    worker, _, processor = make_worker(wait, source)
    return worker, source, processor


def test_a_batch_in_flight_is_settled_as_soon_as_it_commits_not_a_batch_wait_later() -> None:
    worker, source, _ = sliced_worker([], wait=0.5)
    worker.inflight.transaction = FakeTransaction(FakeProcessor(delay=0.05))
    worker.submit(records(0, 1, 2))
    started = time.monotonic()
    assert worker.next_batch() == []
    assert source.committed == [{("t", 0): 3}]  # Kafka heard of it within the wait ...
    assert source.timeouts[0] <= SETTLE_SLICE_SECONDS  # ... because the wait was sliced while in flight
    assert time.monotonic() - started >= 0.45  # and the batch wait itself is kept


def test_records_of_partitions_revoked_between_slices_are_left_to_their_new_owner() -> None:
    worker, source, _ = sliced_worker([], wait=0.2)
    worker.submit(records(0, 1))

    def rebalance() -> list[Record]:
        source.on_revoked({("t", 1)})
        return records(0, 3)

    source.answers = [records(1, 7) + records(0, 2), rebalance]
    got = worker.next_batch()
    assert [(r.partition, r.offset) for r in got] == [(0, 2), (0, 3)]


def test_a_partition_revoked_and_assigned_back_between_slices_is_read_again_not_lost() -> None:
    worker, source, _ = sliced_worker([], wait=0.2)
    worker.submit(records(0, 1))

    def revoke_and_reassign() -> list[Record]:
        source.on_revoked({("t", 0)})  # eager rebalance: everything revoked, the same given back
        return records(0, 2, 3, 4)  # read again from the stored position (2)

    source.answers = [records(0, 2, 3), revoke_and_reassign]
    got = worker.next_batch()
    assert [(r.partition, r.offset) for r in got] == [(0, 2), (0, 3), (0, 4)]


def test_the_revocations_it_remembers_do_not_grow_with_every_rebalance() -> None:
    worker, source, _ = make_worker(wait=0.0)
    for _ in range(1000):
        source.on_revoked({("t", 0)})
        worker.next_batch()
    assert worker.inflight.revocations.mark() <= 1


def test_a_suspect_failure_that_persists_while_postgres_answers_is_isolated_after_three_attempts() -> None:
    worker, _, processor = make_worker()
    processor.suspect = True
    worker.submit(records(0, 1, 2))
    result = worker.inflight.settle()
    assert result is not None
    assert processor.isolations == [False, False, False, True]
    assert processor.committed == [[("t", 0, 1), ("t", 0, 2)]]


def test_readiness_tells_an_outage_from_a_batch_postgres_refuses() -> None:
    worker, _, _ = make_worker()
    worker._started = True
    batch = DecodedBatch(records(0, 1))
    worker.inflight.observer.retrying(DatabaseUnavailable("connection refused"), 1, batch)
    ready, detail = worker.is_ready()
    assert not ready
    assert detail["postgres"] == "unreachable"
    worker.inflight.observer.retrying(
        SuspectFailure("canceling statement due to statement timeout"), 2, batch
    )
    ready, detail = worker.is_ready()
    assert not ready
    assert detail["postgres"] == "ok"
    assert detail["batch"] == "retrying after SuspectFailure: canceling statement due to statement timeout"


def test_a_batch_revoked_whole_while_it_waits_leaves_the_consumer_unpaused() -> None:
    worker, source, processor = make_worker()
    processor.down = True
    worker.submit(records(1, 1, 2))

    def rebalance() -> None:  # every partition of the waiting batch goes to another worker
        source.on_revoked({("t", 1)})

    source.on_poll.append(rebalance)
    assert worker.inflight.settle() is None
    assert not source.paused  # the partitions it still has, and those assigned next, are read again
    assert worker.health.retrying_after is None
    assert processor.committed == []


class StopOnOutage(FailurePolicy):
    def decide(
        self, exc: BaseException, where: Any, attempt: int = 1, *, isolating: bool = False
    ) -> Decision:
        return Decision.STOP if isinstance(exc, DatabaseUnavailable) else super().decide(exc, where, attempt)


def test_an_injected_policy_is_asked_and_its_stop_ends_the_worker() -> None:
    worker, _, processor = make_worker()
    worker.inflight.policy = StopOnOutage(Backoff(0.001, 0.002))
    processor.down = True
    worker.submit(records(0, 1))
    with pytest.raises(DatabaseUnavailable):
        worker.inflight.settle()
    assert processor.committed == []

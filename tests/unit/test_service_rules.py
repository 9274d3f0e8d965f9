"""Rules of the operators' service that need no database: the replay concurrency limit."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from eventhandler.errors import Busy, InvalidOperation
from eventhandler.models import DLQFilter
from eventhandler.replay import ReplayReport
from eventhandler.service import MAX_CONCURRENT_REPLAYS, DLQService


class CountingStore:
    """Just enough of an `OperatorStore` for a replay and its dry run: three matching rows."""

    def count(self, flt: DLQFilter) -> int:
        return 3

    def list_rows(self, flt: DLQFilter, **_: Any) -> list[Any]:
        return []


class HeldReplayer:
    """A replay that holds its slot until `release` is set."""

    def __init__(self) -> None:
        self.inside = threading.Semaphore(0)
        self.release = threading.Event()

    def replay(self, flt: DLQFilter, **_: Any) -> ReplayReport:
        self.inside.release()
        self.release.wait(10)
        return ReplayReport(matched=3, published=3)


def test_beyond_the_replay_limit_a_replay_and_its_dry_run_are_busy_until_one_ends() -> None:
    replayer = HeldReplayer()
    service = DLQService(CountingStore(), replayer)  # type: ignore[arg-type]
    running = [
        threading.Thread(target=service.replay, args=(DLQFilter(),), kwargs={"actor": "t"})
        for _ in range(MAX_CONCURRENT_REPLAYS)
    ]
    for thread in running:
        thread.start()
    for _ in running:
        assert replayer.inside.acquire(timeout=10)
    with pytest.raises(Busy):
        service.replay(DLQFilter(), actor="t")
    with pytest.raises(Busy):
        service.preview(DLQFilter())
    replayer.release.set()
    for thread in running:
        thread.join(10)
    assert service.preview(DLQFilter()).matched == 3
    assert service.replay(DLQFilter(), actor="t").published == 3


class ParkedStore(CountingStore):
    def get(self, dlq_id: int) -> Any:
        class Row:
            status = "parked"

        return Row()


@pytest.mark.parametrize(
    "flt",
    [DLQFilter(statuses=("parked",)), DLQFilter(statuses=("pending", "parked"))],
)
def test_parked_rows_are_never_replayed_not_even_with_force(flt: DLQFilter) -> None:
    service = DLQService(ParkedStore(), HeldReplayer())  # type: ignore[arg-type]
    for force in (False, True):
        with pytest.raises(InvalidOperation, match="parked rows are not replayed"):
            service.preview(flt, force=force)
    with pytest.raises(InvalidOperation, match="is parked"):
        service.retry(7, actor="t", force=True)


def test_a_forced_replay_of_every_status_leaves_the_parked_rows_out() -> None:
    seen: list[DLQFilter] = []

    class Recording(HeldReplayer):
        def replay(self, flt: DLQFilter, **_: Any) -> ReplayReport:
            seen.append(flt)
            return ReplayReport()

    DLQService(CountingStore(), Recording()).replay(DLQFilter(), actor="t", force=True)  # type: ignore[arg-type]
    assert "parked" not in seen[0].statuses
    assert set(seen[0].statuses) == {"pending", "replayed", "resolved", "discarded"}

"""Rules of the operators' service that need no database: the replay concurrency limit."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from eventhandler.errors import Busy
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

"""The canary's rules, without services: its size, its settings, and how long it waits."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from eventhandler.canary import Canary, CanarySize, watch
from eventhandler.errors import InvalidOperation
from eventhandler.models import DLQFilter


@pytest.mark.parametrize(
    ("text", "matched", "rows"),
    [
        ("10", 1000, 10),
        ("10", 3, 3),
        ("5%", 1000, 50),
        ("5%", 10, 1),
        ("1%", 1, 1),
        ("100%", 7, 7),
        (3, 9, 3),
    ],
)
def test_a_canary_is_a_count_or_a_percentage_of_at_least_one_row(
    text: str | int, matched: int, rows: int
) -> None:
    assert CanarySize.parse(text).of(matched) == rows


@pytest.mark.parametrize("text", ["0", "0%", "101%", "-1", "5.5%", "ten", "", "1e3", "9" * 12])
def test_a_bad_canary_size_is_refused_with_what_to_give(text: str) -> None:
    with pytest.raises(InvalidOperation, match="number of rows"):
        CanarySize.parse(text)


@pytest.mark.parametrize(("success", "timeout"), [(0.0, 60.0), (1.5, 60.0), (1.0, 0.0), (1.0, 7200.0)])
def test_bad_canary_settings_are_refused(success: float, timeout: float) -> None:
    with pytest.raises(InvalidOperation, match="canary"):
        Canary(CanarySize(count=1), success, timeout)


class Statuses:
    """An operator store that answers the rows' statuses: `replayed` until `resolve_at` polls."""

    def __init__(self, resolve_at: int | None) -> None:
        self.polls = 0
        self.resolve_at = resolve_at

    def list_rows(self, flt: DLQFilter, *, limit: int = 100, after_id: int | None = None) -> list[object]:
        self.polls += 1
        status = "resolved" if self.resolve_at is not None and self.polls >= self.resolve_at else "replayed"
        by = "replay" if status == "resolved" else None
        return [type("Row", (), {"status": status, "resolved_by": by})() for _ in flt.ids]


def run_watch(store: Statuses, ids: Sequence[int], timeout: float) -> tuple[object, float]:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    outcomes = watch(store, ids, len(ids), timeout=timeout, clock=lambda: now[0], sleep=sleep)  # type: ignore[arg-type]
    return outcomes, now[0]


def test_the_canary_waits_until_no_row_is_waiting() -> None:
    outcomes, waited = run_watch(Statuses(resolve_at=4), [1, 2], timeout=60)
    assert outcomes.resolved == 2  # type: ignore[attr-defined]
    assert waited == pytest.approx(1.5)


def test_the_canary_stops_waiting_at_its_timeout_and_reports_what_still_waits() -> None:
    outcomes, waited = run_watch(Statuses(resolve_at=None), [1, 2, 3], timeout=5)
    assert (outcomes.resolved, outcomes.waiting) == (0, 3)  # type: ignore[attr-defined]
    assert waited == pytest.approx(5)

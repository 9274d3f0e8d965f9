"""The one thread that breaks connections whose block overran its deadline (`db._Watchdog`)."""

from __future__ import annotations

import threading
import time

from eventhandler.db import _Watchdog
from tests.support.waiting import wait_for


def test_a_short_deadline_armed_after_a_long_one_fires_on_time() -> None:
    watchdog = _Watchdog()
    fired = threading.Event()
    watchdog.arm(3600, lambda: None)  # the thread now sleeps until its idle tick
    armed = time.monotonic()
    watchdog.arm(0.2, fired.set)
    assert fired.wait(5)
    assert 0.15 <= time.monotonic() - armed < _Watchdog.IDLE_SECONDS


def test_a_disarmed_deadline_never_fires() -> None:
    watchdog = _Watchdog()
    fired: list[str] = []
    token = watchdog.arm(0.2, lambda: fired.append("early"))
    watchdog.disarm(token)
    watchdog.arm(0.4, lambda: fired.append("late"))
    wait_for(lambda: fired, timeout=5, interval=0.05, message="the armed deadline")
    time.sleep(0.1)
    assert fired == ["late"]


def test_an_action_that_fails_does_not_stop_the_next_deadlines() -> None:
    watchdog = _Watchdog()
    fired = threading.Event()

    def broken() -> None:
        raise RuntimeError("boom")

    watchdog.arm(0.05, broken)
    watchdog.arm(0.3, fired.set)
    assert fired.wait(5)


def test_after_disarm_returns_the_action_has_run_or_never_will() -> None:
    # The action runs under the watchdog's lock: a connection given back to the pool right after its
    # block ended is never broken late by its expired deadline.
    watchdog = _Watchdog()
    running, finish = threading.Event(), threading.Event()
    done: list[float] = []

    def slow() -> None:
        running.set()
        finish.wait(5)
        done.append(time.monotonic())

    token = watchdog.arm(0.01, slow)
    assert running.wait(5)
    threading.Timer(0.2, finish.set).start()
    watchdog.disarm(token)  # waits for the running action
    disarmed = time.monotonic()
    assert done
    assert done[0] <= disarmed

"""The one thread that breaks connections whose block overran its deadline (`db._Watchdog`)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from eventhandler.db import _Watchdog, deadline
from tests.support.waiting import wait_for


def sleeping_watchdog() -> _Watchdog:
    """A watchdog whose thread sleeps a minute unless woken, and is asleep now."""
    watchdog = _Watchdog()
    watchdog.IDLE_SECONDS = 60
    watchdog.arm(3600, lambda: None)
    # The thread itself sets its wake-up to its idle tick (the arm set it to the deadline's time),
    # then waits without the lock: the next arm can only come once it sleeps.
    wait_for(
        lambda: time.monotonic() + 30 < watchdog._wake_at < time.monotonic() + 61,
        timeout=5,
        interval=0.01,
        message="the thread asleep",
    )
    return watchdog


def test_a_short_deadline_armed_while_the_thread_sleeps_wakes_it() -> None:
    watchdog = sleeping_watchdog()
    fired = threading.Event()
    armed = time.monotonic()
    watchdog.arm(0.2, fired.set)
    assert fired.wait(5)
    assert 0.15 <= time.monotonic() - armed < 0.6


def test_a_disarmed_deadline_never_fires() -> None:
    watchdog = _Watchdog()
    fired: list[str] = []
    token = watchdog.arm(0.2, lambda: fired.append("early"))
    assert watchdog.disarm(token) is False
    late = watchdog.arm(0.4, lambda: fired.append("late"))
    wait_for(lambda: fired, timeout=5, interval=0.05, message="the armed deadline")
    time.sleep(0.1)
    assert fired == ["late"]
    assert watchdog.disarm(late) is True


def test_an_action_that_fails_does_not_stop_the_next_deadlines() -> None:
    watchdog = _Watchdog()
    fired = threading.Event()

    def broken() -> None:
        raise SystemExit("not even this")

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
    assert watchdog.disarm(token) is True  # waits for the running action
    disarmed = time.monotonic()
    assert done
    assert done[0] <= disarmed


def test_a_forked_child_runs_only_its_own_deadlines_even_if_forked_while_one_ran() -> None:
    watchdog = _Watchdog()
    running = threading.Event()
    watchdog.arm(0.0, lambda: (running.set(), time.sleep(0.5)))  # holds the lock across the fork
    assert running.wait(5)
    parents = watchdog.arm(0.3, lambda: os.write(2, b"the parent's deadline ran in the child\n"))
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its own deadline fires, nothing else does, and no hang
        code = 1
        try:
            signal.alarm(5)
            mine = threading.Event()
            token = watchdog.arm(0.1, mine.set)
            fired = mine.wait(3)
            time.sleep(0.5)  # the parent's deadline would have passed by now
            code = 0 if fired and watchdog._fired == {token} else 1
        finally:
            os._exit(code)
    watchdog.disarm(parents)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"the child did not exit by itself: {status}"
    assert os.WEXITSTATUS(status) == 0


@contextmanager
def no_thread_can_start() -> Iterator[None]:
    """As in a process out of threads or memory: every new thread asks for a stack no machine has."""
    previous = threading.stack_size(1 << 46)
    try:
        yield
    finally:
        threading.stack_size(previous)


def test_an_arm_whose_thread_cannot_start_fails_and_leaves_nothing_armed() -> None:
    # The caller is told (its block never runs); the deadline must not fire later, once a thread
    # runs, on a connection given back to the pool since. And the next arm starts the thread.
    watchdog = _Watchdog()
    fired: list[str] = []
    with no_thread_can_start(), pytest.raises(RuntimeError):
        watchdog.arm(0.0, lambda: fired.append("the failed arm's"))
    later = threading.Event()
    retry = threading.Thread(target=watchdog.arm, args=(0.05, later.set), daemon=True)
    retry.start()
    retry.join(5)
    assert not retry.is_alive()  # the failed arm let go of the lock
    assert later.wait(5)
    assert fired == []  # due at once: it would have run before the later deadline


class _Conn:
    """What `deadline` touches of a psycopg connection: its socket and `close`."""

    def __init__(self, sock: socket.socket) -> None:
        self.pgconn: Any = type("PGconn", (), {"socket": sock.fileno()})()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_block_that_overruns_its_deadline_has_its_socket_shut_and_its_connection_closed() -> None:
    ours, server = socket.socketpair()
    with ours, server:
        conn = _Conn(ours)
        with deadline(conn, 0.1):  # type: ignore[arg-type]
            server.settimeout(5)
            assert server.recv(1) == b""  # the server side sees the socket shut down
        assert conn.closed  # and the pool gets it back closed, not with a dead socket


def test_a_block_within_its_deadline_keeps_its_connection() -> None:
    ours, server = socket.socketpair()
    with ours, server:
        conn = _Conn(ours)
        with deadline(conn, 5):  # type: ignore[arg-type]
            pass
        assert not conn.closed
        ours.sendall(b"x")
        assert server.recv(1) == b"x"

"""The supervisor's loop with stand-in children (plain Python processes, no broker or database):
what it does when a signal comes while it starts them, when a child dies of any signal, and when a
child runs but never says it is ready; what its HTTP thread answers while the loop empties a slot;
and the metrics of exited children folded into one archive."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from eventhandler.config import Settings
from eventhandler.metrics import SupervisorMetrics
from eventhandler.processes import STATE_PREFIX, Slot, Supervisor
from eventhandler.supervised import report_path
from tests.support.waiting import wait_for

SETTINGS = Settings(metrics_port=0)
SLEEPER = (sys.executable, "-c", "import time; time.sleep(120)")  # never reports, stops on SIGTERM


class Running:
    """`Supervisor.run` in a thread (the signal handler's part is `request_stop`, callable from any)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.supervisor.run()

    def pids(self) -> list[int]:
        """The children running now, as `/readyz` lists them."""
        return [c["pid"] for c in self.supervisor.ready()[1]["processes"] if "pid" in c]

    def join(self, timeout: float) -> int | None:
        self.thread.join(timeout)
        return self.code


@contextmanager
def supervising(**kwargs: object) -> Iterator[Running]:
    running = Running(Supervisor(SETTINGS, **kwargs))  # type: ignore[arg-type]
    try:
        yield running
    finally:
        running.supervisor.request_stop()
        running.supervisor.request_stop()  # a second time: kill whatever is left
        running.join(30)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_a_stop_asked_while_the_children_start_stops_every_one_of_them() -> None:
    with supervising(processes=6, child=SLEEPER) as running:
        wait_for(lambda: len(running.pids()) >= 1, timeout=10, message="the first child")
        running.supervisor.request_stop()  # as SIGTERM does, while the others may still be starting
        assert running.join(20) == 0, "the supervisor did not exit cleanly after SIGTERM"
        assert all(gone(pid) for pid in running.pids() or [])


def test_a_second_stop_kills_children_that_do_not_drain() -> None:
    stubborn = (
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)",
    )
    with supervising(processes=2, child=stubborn) as running:
        wait_for(lambda: len(running.pids()) == 2, timeout=10, message="two children")
        pids = running.pids()
        running.supervisor.request_stop()
        time.sleep(1)
        assert running.thread.is_alive()  # they ignore SIGTERM: still draining, as far as it knows
        running.supervisor.request_stop()
        assert running.join(10) == 1  # forced: not a clean exit
        assert all(gone(pid) for pid in pids)


@pytest.mark.parametrize("signum", [9, 40])  # SIGKILL, and a real-time signal with no name
def test_a_child_that_dies_of_any_signal_is_restarted(signum: int) -> None:
    suicide = (sys.executable, "-c", f"import os, time; time.sleep(0.3); os.kill(os.getpid(), {signum})")
    with supervising(processes=1, child=suicide) as running:
        supervisor = running.supervisor
        restarts = ("eventhandler_worker_process_restarts_total", ())
        wait_for(lambda: samples(supervisor.metrics).get(restarts, 0) >= 1, timeout=10, message="a restart")
        assert running.thread.is_alive()
        assert supervisor.alive()[0]  # restarting a child is the supervisor working, not dead


def test_a_child_that_never_reports_is_killed_and_restarted() -> None:
    with supervising(processes=1, child=SLEEPER, start_seconds=1.0) as running:
        first = wait_for(running.pids, timeout=10, message="a child")[0]
        wait_for(lambda: gone(first), timeout=10, message="the silent child killed")
        wait_for(lambda: running.pids() and running.pids()[0] != first, timeout=10, message="its replacement")
        ready, detail = running.supervisor.ready()
        assert not ready
        assert detail["processes"][0]["state"] == "starting"


class ReapedAfterOneLook(Slot):
    """A slot whose child the supervisor's loop reaps (sets `process` to None) the moment after
    another thread has read it: the race of `/metrics` and `/readyz` with the loop, made certain."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name == "process" and value is not None:
            self.process = None
        return value


class RunningChild:
    """What the health answers use of a `Popen`: a child that still runs."""

    pid = 4242

    def poll(self) -> int | None:
        return None


def test_health_asked_as_the_loop_reaps_a_child_answers_from_one_look_at_the_slot() -> None:
    # Asked from the HTTP thread, a check `slot.process is not None` and a second read of
    # `slot.process` may see two different values: the answer must come from one look, not crash.
    supervisor = Supervisor(SETTINGS, 1, child=SLEEPER)
    try:
        supervisor._slots = [ReapedAfterOneLook(0, process=RunningChild())]  # type: ignore[arg-type]
        assert supervisor.running() == 1  # what /metrics reports as eventhandler_worker_processes
        supervisor._slots = [ReapedAfterOneLook(0, process=RunningChild())]  # type: ignore[arg-type]
        ready, detail = supervisor.ready()
        assert not ready
        assert detail["processes"] == [{"slot": 0, "pid": 4242, "state": "starting"}]
    finally:
        supervisor.request_stop()
        assert supervisor.run() == 0  # every slot is empty now: it only removes its state


REPORTS_THEN_DIES = """
import os, sys, time
from pathlib import Path
from eventhandler.supervised import Report, report_path
state, slot = Path(sys.argv[sys.argv.index("--state-dir") + 1]), int(sys.argv[sys.argv.index("--process-slot") + 1])
path = report_path(state, slot)
path.parent.mkdir(parents=True, exist_ok=True)
Report(os.getpid(), True, {}, time.monotonic()).write(path)
time.sleep(float(sys.argv[1]))
sys.exit(1)
"""


def test_a_dead_childs_report_goes_with_it() -> None:
    # A later child that happened to get the same pid must not pass for ready with the dead one's
    # report. The file is gone between the death and the replacement's first report (the restart
    # waits a second); kept, it would be there all along, then overwritten.
    child = (sys.executable, "-c", REPORTS_THEN_DIES, "0.5")
    with supervising(processes=1, child=child) as running:
        supervisor = running.supervisor
        wait_for(lambda: supervisor.ready()[0], timeout=10, message="the child's report")
        report = report_path(supervisor._state, 0)
        wait_for(lambda: not report.exists(), timeout=10, interval=0.02, message="the report removed")


CHILD_COUNTS = """
import sys
from prometheus_client import CollectorRegistry, Counter, Histogram
r = CollectorRegistry()
Counter("eventhandler_messages_consumed", "c", ["topic"], registry=r).labels(topic="t").inc(int(sys.argv[1]))
Histogram("eventhandler_batch_size_messages", "h", registry=r, buckets=(10, 100)).observe(50)
"""


def test_the_counts_of_exited_children_are_kept_in_one_archive(tmp_path: Path) -> None:
    metrics = SupervisorMetrics(tmp_path, lambda: (True, {}), lambda: 0)
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for n in range(1, 6):
        child = subprocess.run([sys.executable, "-c", CHILD_COUNTS, str(n)], env=env, check=True)
        assert child.returncode == 0
    before = samples(metrics)
    assert before["eventhandler_messages_consumed_total", (("topic", "t"),)] == 15
    for path in list(tmp_path.glob("counter_*.db")):
        pid = int(path.stem.split("_")[1])
        metrics.children.fold(pid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_archive.db", "histogram_archive.db"]
    after = samples(metrics)
    assert after == before  # nothing lost, nothing counted twice
    assert after["eventhandler_batch_size_messages_count", ()] == 5


CHILD_LAG = """
import sys
from eventhandler.metrics import Metrics
metrics = Metrics(multiprocess=True)
metrics.consumer_lag.read = lambda: {("t", 0): int(sys.argv[1])}
metrics.publish_lag()
"""


def test_a_partition_handed_over_between_children_is_counted_once(tmp_path: Path) -> None:
    # For the second around a handover both the old owner and the new one report the partition;
    # the old one's last reading may still be there. The container's lag is the larger, not the sum.
    metrics = SupervisorMetrics(tmp_path, lambda: (True, {}), lambda: 0)
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for lag in ("40", "25"):
        subprocess.run([sys.executable, "-c", CHILD_LAG, lag], env=env, check=True)
    lag = ("eventhandler_consumer_lag_messages", (("partition", "0"), ("topic", "t")))
    assert samples(metrics)[lag] == 40


def samples(metrics: SupervisorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_child_is_its_own_member_with_the_shared_metrics_directory(tmp_path: Path) -> None:
    """Static membership: two members with one group.instance.id fence each other."""
    settings = Settings(
        metrics_port=0,
        worker_id="pod-7",
        kafka_options={"group.instance.id": "pod-7"},  # set for every client: moved to the consumer's
    )
    tell = (
        "import json, os, pathlib, sys, time; slot = sys.argv[sys.argv.index('--process-slot') + 1]; "
        f"pathlib.Path({str(tmp_path)!r}, slot).write_text(json.dumps(dict(os.environ))); time.sleep(60)"
    )
    running = Running(Supervisor(settings, 2, child=(sys.executable, "-c", tell)))
    try:
        wait_for(lambda: (tmp_path / "0").exists() and (tmp_path / "1").exists(), timeout=10)
        envs = [json.loads((tmp_path / str(slot)).read_text()) for slot in (0, 1)]
    finally:
        running.supervisor.request_stop()
        running.join(20)
    assert [env["EVENTHANDLER_WORKER_ID"] for env in envs] == ["pod-7-0", "pod-7-1"]
    options = [json.loads(env["EVENTHANDLER_KAFKA_CONSUMER_OPTIONS"]) for env in envs]
    assert [o["group.instance.id"] for o in options] == ["pod-7-0", "pod-7-1"]
    assert {env["EVENTHANDLER_METRICS_PORT"] for env in envs} == {"0"}  # the supervisor serves the port
    assert len({env["PROMETHEUS_MULTIPROC_DIR"] for env in envs}) == 1


def test_the_state_a_killed_supervisor_left_is_removed_by_the_next(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    pid = int(dead.stdout)  # a process that has exited
    left = Path(tempfile.gettempdir()) / f"{STATE_PREFIX}{pid}-test"
    left.mkdir()
    (left / "metrics").mkdir()
    try:
        supervisor = Supervisor(SETTINGS, 1, child=SLEEPER)
        supervisor.request_stop()
        assert supervisor.run() == 0
        assert not left.exists()
    finally:
        shutil.rmtree(left, ignore_errors=True)

"""`eventhandler run --processes N`: one container, N worker processes.

A worker process decodes and handles its batches on one core (the GIL). The supervisor starts N
copies of `eventhandler run`, each a full member of the consumer group with its own consumer and
pool, so every guarantee holds as it does with N replicas: positions and the ledger live in
PostgreSQL, and a rebalance moves partitions between the processes. The supervisor touches neither
Kafka nor PostgreSQL. It serves the container's `/metrics` (its children's added up: prometheus-
client's multiprocess mode), `/healthz` and `/readyz` (every child), restarts a child that died with
a backoff, and on SIGTERM asks every child to drain and exits 0 once they have. A child whose
supervisor died drains and exits by itself (`supervised.Reporter`).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prometheus_client import multiprocess

from eventhandler.config import Settings
from eventhandler.health import HealthServer
from eventhandler.logs import get_logger
from eventhandler.metrics import SupervisorMetrics
from eventhandler.supervised import Report, metrics_dir, report_path

log = get_logger("eventhandler.processes")

RESTART_FIRST_SECONDS = 1.0  # the first restart of a child that died; doubled for each quick death
RESTART_MAX_SECONDS = 30.0
STEADY_SECONDS = 60.0  # a child that ran this long before it died starts its backoff afresh
WATCH_SECONDS = 0.2  # how often the supervisor looks at its children
EXIT_SETTINGS = 2  # a child's exit code for bad settings: restarting cannot help


def available_cores(
    cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a container
    run with `--cpus 2`, or a Kubernetes CPU limit, sees the host's cores but gets two of them).
    A fractional quota rounds up: 1.5 cores keep two processes busy."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup_root, own_cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota(root: Path, own_cgroup: Path) -> float | None:
    candidates = []
    try:  # cgroup v2: "0::/path" names this process's group under the unified hierarchy
        for line in own_cgroup.read_text(encoding="utf-8").splitlines():
            if line.startswith("0::"):
                candidates.append(root / line[3:].strip().lstrip("/") / "cpu.max")
    except OSError:
        pass
    candidates.append(root / "cpu.max")  # the group's root, as a container usually mounts it
    for path in candidates:
        try:
            limit, period = path.read_text(encoding="utf-8").split()[:2]
            return None if limit == "max" else int(limit) / int(period)
        except (OSError, ValueError, ZeroDivisionError):
            continue
    try:  # cgroup v1
        v1_quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
        v1_period = int((root / "cpu" / "cpu.cfs_period_us").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return v1_quota / v1_period if v1_quota > 0 and v1_period > 0 else None


def count(setting: int | Literal["auto"]) -> int:
    """EVENTHANDLER_PROCESSES as a number of processes."""
    return available_cores() if setting == "auto" else setting


def restart_delay(quick_deaths: int) -> float:
    """1 s after a first death, doubling with each death in a row, at most 30 s: a child that
    cannot start (PostgreSQL gone) is not restarted in a tight loop."""
    return float(min(RESTART_MAX_SECONDS, RESTART_FIRST_SECONDS * 2.0 ** min(quick_deaths - 1, 16)))


@dataclass
class Slot:
    """One of the N places a child runs in; a restarted child takes its place."""

    number: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row, each before STEADY_SECONDS
    restart_at: float | None = None
    done: bool = False  # exited by itself (--stop-when-idle): not restarted

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, settings: Settings, processes: int, *, stop_when_idle: float | None = None) -> None:
        self._settings = settings
        self._stop_when_idle = stop_when_idle
        self._state = Path(tempfile.mkdtemp(prefix="eventhandler-processes-"))
        metrics_dir(self._state).mkdir()
        self._slots = [Slot(n) for n in range(processes)]
        self._stopping = False
        self._exit_code = 0
        self._wake = threading.Event()
        self.metrics = SupervisorMetrics(metrics_dir(self._state), self.ready, self.running)
        self._http: HealthServer | None = None
        if settings.metrics_port:
            self._http = HealthServer(
                "0.0.0.0",  # noqa: S104 - scraped from outside the container
                settings.metrics_port,
                self.metrics.registry,
                self.ready,
                alive=self.alive,
            )

    def run(self) -> int:
        """Until SIGTERM (or, with --stop-when-idle, until every child stopped by itself): the exit
        code, 0 when every child drained cleanly."""
        if self._http is not None:
            self._http.start()
        log.info("supervisor_started", processes=len(self._slots), pid=os.getpid())
        try:
            for slot in self._slots:
                self._spawn(slot)
            while not self._finished():
                for slot in self._slots:
                    self._watch(slot)
                self._wake.wait(WATCH_SECONDS)
                self._wake.clear()
        finally:
            for slot in self._slots:  # only after an error of the supervisor's own: don't leave them
                if slot.running():
                    assert slot.process is not None
                    slot.process.terminate()
                    slot.process.wait()
            if self._http is not None:
                self._http.stop()
            shutil.rmtree(self._state, ignore_errors=True)
        log.info("supervisor_stopped", exit_code=self._exit_code)
        return self._exit_code

    def stop(self, exit_code: int = 0) -> None:
        """Ask every child to finish its batch, commit and leave (SIGTERM, as `docker stop` does)."""
        self._stopping = True
        self._exit_code = max(self._exit_code, exit_code)
        for slot in self._slots:
            if slot.running():
                assert slot.process is not None
                slot.process.send_signal(signal.SIGTERM)
        self._wake.set()

    def _finished(self) -> bool:
        if self._stopping:
            return not any(slot.running() for slot in self._slots)
        return all(slot.done for slot in self._slots)

    def _spawn(self, slot: Slot) -> None:
        command = [sys.executable, "-m", "eventhandler", "run", "--process-slot", str(slot.number)]
        command += ["--supervisor-pid", str(os.getpid()), "--state-dir", str(self._state)]
        if self._stop_when_idle is not None:
            command += ["--stop-when-idle", str(self._stop_when_idle)]
        env = os.environ | {
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir(self._state)),
            "EVENTHANDLER_METRICS_PORT": "0",  # the supervisor serves the container's
            "EVENTHANDLER_PROCESSES": "1",
        }
        if self._settings.worker_id:
            env["EVENTHANDLER_WORKER_ID"] = f"{self._settings.worker_id}-{slot.number}"
        # Same process group: a Ctrl-C on a terminal reaches every child, as SIGTERM from us does.
        slot.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        slot.started_at = time.monotonic()
        slot.restart_at = None
        log.info("worker_process_started", slot=slot.number, pid=slot.process.pid)

    def _watch(self, slot: Slot) -> None:
        now = time.monotonic()
        if slot.process is None:
            if slot.restart_at is not None and now >= slot.restart_at and not self._stopping:
                self.metrics.restarts.inc()
                self._spawn(slot)
            return
        code = slot.process.poll()
        if code is None:
            return
        pid, slot.process = slot.process.pid, None
        multiprocess.mark_process_dead(pid, str(metrics_dir(self._state)))  # type: ignore[no-untyped-call]
        how: dict[str, Any] = {"slot": slot.number, "pid": pid, "exit_code": code}
        if code < 0:
            how["signal"] = signal.Signals(-code).name
        if self._stopping:
            log.info("worker_process_stopped", **how)
            if code != 0:
                self._exit_code = max(self._exit_code, 1)
        elif code == 0 and self._stop_when_idle is not None:
            slot.done = True
            log.info("worker_process_stopped", **how)
        elif code == EXIT_SETTINGS:
            log.error("worker_process_refused_its_settings", **how)
            self.stop(EXIT_SETTINGS)
        else:
            slot.quick_deaths = 1 if now - slot.started_at >= STEADY_SECONDS else slot.quick_deaths + 1
            delay = restart_delay(slot.quick_deaths)
            slot.restart_at = now + delay
            log.error("worker_process_died", **how, restart_in_seconds=delay)

    # -- health ---------------------------------------------------------------------------------------

    def running(self) -> int:
        return sum(slot.running() for slot in self._slots)

    def alive(self) -> tuple[bool, dict[str, Any]]:
        """Every child process runs (or stopped by itself when idle)."""
        children = [
            {"slot": s.number, "pid": s.process.pid if s.process else None, "running": s.running()}
            for s in self._slots
        ]
        ok = all(s.running() or s.done for s in self._slots)
        return ok, {"status": "ok" if ok else "a worker process is down", "processes": children}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Every child reported itself ready within the last few seconds."""
        now, children, ready = time.time(), [], True
        for slot in self._slots:
            child, ok = self._child_readiness(slot, now)
            children.append(child)
            ready = ready and ok
        reported = [c for c in children if "postgres" in c]
        detail: dict[str, Any] = {
            "postgres": "ok" if all(c["postgres"] == "ok" for c in reported) else "unreachable",
            "kafka": next((c["kafka"] for c in reported if c["kafka"] != "ok"), "ok"),
            "assigned_partitions": sum(int(c.get("assigned_partitions", 0)) for c in reported),
            "processes": children,
        }
        return ready, detail

    def _child_readiness(self, slot: Slot, now: float) -> tuple[dict[str, Any], bool]:
        if slot.done:
            return {"slot": slot.number, "state": "stopped when idle"}, True
        process = slot.process
        if process is None or process.poll() is not None:
            return {"slot": slot.number, "state": "restarting"}, False
        report = Report.read(report_path(self._state, slot.number))
        if report is None or report.pid != process.pid:
            return {"slot": slot.number, "pid": process.pid, "state": "starting"}, False
        if not report.fresh(now):
            silent = round(now - report.at, 1)
            return {"slot": slot.number, "pid": process.pid, "state": f"no report for {silent} s"}, False
        return {"slot": slot.number, "pid": process.pid, "ready": report.ready, **report.detail}, report.ready


def install_signal_handlers(supervisor: Supervisor) -> None:
    def handle(signum: int, _frame: object) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        supervisor.stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)

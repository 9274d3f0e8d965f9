"""`eventhandler run --processes N`: one container, N worker processes.

A worker process decodes and handles its batches on one core (the GIL). The supervisor starts N
copies of `eventhandler run`, each a full member of the consumer group with its own consumer and
pool, so every guarantee holds as it does with N replicas: positions and the ledger live in
PostgreSQL, and a rebalance moves partitions between the processes. The supervisor touches neither
Kafka nor PostgreSQL. It serves the container's `/metrics` (its children's added up: prometheus-
client's multiprocess mode), `/healthz` (its own loop turns) and `/readyz` (every child is ready),
restarts a child that died or stopped answering, with a backoff, and on SIGTERM asks every child to
drain and exits 0 once they have (a second signal kills them). A child whose supervisor died drains
and exits by itself (`supervised.Reporter`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from eventhandler.config import MAX_PROCESSES, Settings
from eventhandler.cores import available_cores
from eventhandler.errors import ConfigError, EventHandlerError
from eventhandler.health import HealthServer
from eventhandler.logs import get_logger
from eventhandler.metrics import SupervisorMetrics
from eventhandler.supervised import Report, metrics_dir, report_path

log = get_logger("eventhandler.processes")

RESTART_FIRST_SECONDS = 1.0  # the first restart of a child that died; doubled for each quick death
RESTART_MAX_SECONDS = 30.0
STEADY_SECONDS = 60.0  # a child that ran this long before it died starts its backoff afresh
START_SECONDS = 120.0  # a child that has not reported by then is stuck starting: killed, restarted
SILENT_SECONDS = 60.0  # a child whose last report is this old is stuck: killed, restarted
ALIVE_SECONDS = 10.0  # /healthz fails once the supervisor's own loop has not turned for this long
STOP_SECONDS = 30.0  # how long a supervisor that fails itself waits for its children before killing them
WATCH_SECONDS = 0.2  # how often the supervisor looks at its children
EXIT_SETTINGS = 2  # a child's exit code for bad settings: restarting cannot help
STATE_PREFIX = "eventhandler-processes-"


def count(setting: int | Literal["auto"]) -> int:
    """EVENTHANDLER_PROCESSES as a number of processes."""
    return min(MAX_PROCESSES, available_cores()) if setting == "auto" else setting


def restart_delay(quick_deaths: int) -> float:
    """1 s after a first death, doubling with each death in a row, at most 30 s: a child that
    cannot start (PostgreSQL gone) is not restarted in a tight loop."""
    return float(min(RESTART_MAX_SECONDS, RESTART_FIRST_SECONDS * 2.0 ** min(quick_deaths - 1, 16)))


def exit_detail(code: int) -> dict[str, Any]:
    """A child's exit for a log line: its code, and the signal's name when a signal ended it."""
    detail: dict[str, Any] = {"exit_code": code}
    if code < 0:
        try:
            detail["signal"] = signal.Signals(-code).name
        except ValueError:  # a real-time signal has no name
            detail["signal"] = f"signal {-code}"
    return detail


@dataclass
class Slot:
    """One of the N places a child runs in; a restarted child takes its place."""

    number: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row, each before STEADY_SECONDS
    restart_at: float | None = 0.0  # when to start its next child (0: at once); None: never
    done: bool = False  # exited by itself (--stop-when-idle): not restarted
    signalled: bool = False  # asked to stop


WORKER = (sys.executable, "-m", "eventhandler", "run")


class Supervisor:
    """`child` is the command a child runs (tests give a stand-in); `start_seconds`/`silent_seconds`
    how long a child may go without reporting before it counts as stuck."""

    def __init__(
        self,
        settings: Settings,
        processes: int,
        *,
        stop_when_idle: float | None = None,
        child: Sequence[str] = WORKER,
        start_seconds: float = START_SECONDS,
        silent_seconds: float = SILENT_SECONDS,
    ) -> None:
        self._settings = settings
        self._stop_when_idle = stop_when_idle
        self._child = list(child)
        self._start_seconds, self._silent_seconds = start_seconds, silent_seconds
        self._slots = [Slot(n) for n in range(processes)]
        self._stopping = False
        self._forced = False  # a second signal: children are killed, not drained
        self._announced = False
        self._exit_code = 0
        self._wake = threading.Event()
        self._beat = time.monotonic()
        _sweep_stale_states()
        try:
            self._state = Path(tempfile.mkdtemp(prefix=f"{STATE_PREFIX}{os.getpid()}-"))
            metrics_dir(self._state).mkdir()
        except OSError as exc:
            where = tempfile.gettempdir()
            raise EventHandlerError(
                f"cannot create the processes' state in {where} (TMPDIR): {exc.strerror}"
            ) from None
        self.metrics = SupervisorMetrics(metrics_dir(self._state), self.ready, self.running)
        self._http: HealthServer | None = None
        try:
            if settings.metrics_port:
                self._http = HealthServer(
                    "0.0.0.0",  # noqa: S104 - scraped from outside the container
                    settings.metrics_port,
                    self.metrics.registry,
                    self.ready,
                    alive=self.alive,
                )
        except OSError as exc:
            shutil.rmtree(self._state, ignore_errors=True)
            raise ConfigError(
                "EVENTHANDLER_METRICS_PORT",
                f"cannot serve metrics on port {settings.metrics_port}: {exc.strerror}",
            ) from None

    def run(self) -> int:
        """Until SIGTERM (or, with --stop-when-idle, until every child stopped by itself): the exit
        code, 0 when every child drained cleanly."""
        if self._http is not None:
            self._http.start()
        log.info("supervisor_started", processes=len(self._slots), pid=os.getpid())
        try:
            while not self._finished():
                self._beat = time.monotonic()
                if self._stopping:
                    self._signal_children()
                    if not self._announced:  # logged here: a signal handler must not take the log's locks
                        self._announced = True
                        log.info("shutdown_requested", forced=self._forced)
                for slot in self._slots:
                    self._watch(slot)
                self._wake.wait(WATCH_SECONDS)
                self._wake.clear()
        finally:
            self._abandon_children()
            if self._http is not None:
                self._http.stop()
            shutil.rmtree(self._state, ignore_errors=True)
        log.info("supervisor_stopped", exit_code=self._exit_code)
        return self._exit_code

    def request_stop(self, exit_code: int = 0) -> None:
        """Drain every child (SIGTERM, as `docker stop` does); asked again, kill them. Only flags:
        safe in a signal handler, whatever the loop was doing when the signal came."""
        if self._stopping and not self._forced:
            self._forced, self._announced = True, False
        self._stopping = True
        self._exit_code = max(self._exit_code, exit_code, 1 if self._forced else 0)
        self._wake.set()

    def _finished(self) -> bool:
        if self._stopping:
            return all(slot.process is None for slot in self._slots)
        return all(slot.done for slot in self._slots)

    def _signal_children(self) -> None:
        for slot in self._slots:
            process = slot.process
            if process is None or process.poll() is not None:
                continue
            if self._forced:
                process.kill()
            elif not slot.signalled:
                slot.signalled = True
                process.send_signal(signal.SIGTERM)

    def _spawn(self, slot: Slot) -> None:
        command = [*self._child, "--process-slot", str(slot.number)]
        command += ["--supervisor-pid", str(os.getpid()), "--state-dir", str(self._state)]
        if self._stop_when_idle is not None:
            command += ["--stop-when-idle", str(self._stop_when_idle)]
        slot.started_at, slot.restart_at, slot.signalled = time.monotonic(), None, False
        try:
            # Same process group: a Ctrl-C on a terminal reaches every child, as SIGTERM from us does.
            slot.process = subprocess.Popen(command, env=self._child_env(slot), stdin=subprocess.DEVNULL)
        except OSError as exc:  # out of processes or memory: a death like any other
            self._died(slot, {"slot": slot.number, "error": str(exc)}, time.monotonic())
            return
        log.info("worker_process_started", slot=slot.number, pid=slot.process.pid)

    def _child_env(self, slot: Slot) -> dict[str, str]:
        settings = self._settings
        env = os.environ | {
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir(self._state)),
            "EVENTHANDLER_METRICS_PORT": "0",  # the supervisor serves the container's
            "EVENTHANDLER_PROCESSES": "1",
        }
        if settings.worker_id:
            env["EVENTHANDLER_WORKER_ID"] = f"{settings.worker_id}-{slot.number}"
        # Static membership: each process is its own member, so each needs its own instance id (two
        # members with one id fence each other).
        instance = settings.consumer_config().get("group.instance.id")
        if instance:
            options = settings.kafka_consumer_options | {"group.instance.id": f"{instance}-{slot.number}"}
            env["EVENTHANDLER_KAFKA_CONSUMER_OPTIONS"] = json.dumps(options)
        return env

    def _watch(self, slot: Slot) -> None:
        now = time.monotonic()
        process = slot.process
        if process is None:
            if not self._stopping and slot.restart_at is not None and now >= slot.restart_at:
                if slot.started_at:
                    self.metrics.restarts.inc()
                self._spawn(slot)
            return
        code = process.poll()
        if code is None:
            if not self._stopping:
                self._kill_if_stuck(slot, process, now)
            return
        slot.process = None
        self._forget(slot, process.pid)
        how = {"slot": slot.number, "pid": process.pid, **exit_detail(code)}
        if self._stopping:
            log.info("worker_process_stopped", **how)
            # SIGTERM before the child could install its handler ends it as cleanly as a drain
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                self._exit_code = max(self._exit_code, 1)
        elif code == 0 and self._stop_when_idle is not None:
            slot.done = True
            log.info("worker_process_stopped", **how)
        elif code == EXIT_SETTINGS:
            log.error("worker_process_refused_its_settings", **how)
            self.request_stop(EXIT_SETTINGS)
        else:
            self._died(slot, how, now)

    def _died(self, slot: Slot, how: dict[str, Any], now: float) -> None:
        slot.quick_deaths = 1 if now - slot.started_at >= STEADY_SECONDS else slot.quick_deaths + 1
        delay = restart_delay(slot.quick_deaths)
        slot.restart_at = now + delay
        log.error("worker_process_died", **how, restart_in_seconds=delay)

    def _kill_if_stuck(self, slot: Slot, process: subprocess.Popen[bytes], now: float) -> None:
        """A child that never reported, or stopped reporting, holds its partitions and does nothing:
        kill it (its batch in flight is simply done again) and let the restart take over."""
        report = Report.read(report_path(self._state, slot.number))
        if report is None or report.pid != process.pid:
            if now - slot.started_at < self._start_seconds:
                return
            why = f"no report {self._start_seconds:.0f} s after its start"
        elif not report.fresh(now, self._silent_seconds):
            why = f"no report for {now - report.at:.0f} s"
        else:
            return
        log.error("worker_process_unresponsive", slot=slot.number, pid=process.pid, reason=why)
        process.kill()

    def _forget(self, slot: Slot, pid: int) -> None:
        """An exited child's files: its counts folded into the archive, its report removed (a later
        process with the same pid must not inherit it)."""
        self.metrics.children.fold(pid)
        path = report_path(self._state, slot.number)
        for leftover in (path, path.with_suffix(f".{pid}.tmp")):
            leftover.unlink(missing_ok=True)

    def _abandon_children(self) -> None:
        """Only when the supervisor itself fails: stop every child, kill those that do not stop."""
        running = [s.process for s in self._slots if s.process is not None and s.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # -- health (asked from the HTTP thread) -------------------------------------------------------

    def running(self) -> int:
        return sum(1 for slot in self._slots if (p := slot.process) is not None and p.poll() is None)

    def alive(self) -> tuple[bool, dict[str, Any]]:
        """The supervisor's loop turns: it restarts what dies. A child down or restarting is a
        matter for `/readyz`, not a reason to restart the container and its healthy children."""
        silent = time.monotonic() - self._beat
        ok = silent < ALIVE_SECONDS
        return ok, {"status": "ok" if ok else f"the supervisor's loop has not turned for {silent:.0f} s"}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Every child reported itself ready within the last few seconds."""
        now, children, ready = time.monotonic(), [], True
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
        supervisor.request_stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _sweep_stale_states() -> None:
    """State directories of supervisors that are gone (killed with -9: nothing removed them). A
    container's supervisor is often pid 1, so a directory named with our own pid is an old one too."""
    for path in Path(tempfile.gettempdir()).glob(f"{STATE_PREFIX}*"):
        try:
            owner = int(path.name[len(STATE_PREFIX) :].split("-", 1)[0])
            if path.stat().st_uid != os.getuid() or (owner != os.getpid() and _alive(owner)):
                continue
        except (ValueError, OSError):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

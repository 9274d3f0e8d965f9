"""A worker process started by the supervisor (`eventhandler run --processes N`, `processes`).

The child is an ordinary worker — its own consumer in the group, its own pool — with three
differences: its metrics go to prometheus-client's multiprocess files (the supervisor serves one
`/metrics` adding up every child), it reports its readiness to a small JSON file each second (the
supervisor's `/readyz` reads them), and it drains and exits when the supervisor is gone, so a
supervisor killed with -9 leaves no worker behind.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eventhandler.logs import get_logger
from eventhandler.metrics import Metrics
from eventhandler.worker import Worker

log = get_logger("eventhandler.supervised")

REPORT_SECONDS = 1.0  # how often a child writes its readiness and its lag
STALE_SECONDS = 5.0  # a report older than this is a child that stopped answering: not ready


def metrics_dir(state: Path) -> Path:
    return state / "metrics"


def report_path(state: Path, slot: int) -> Path:
    return state / "health" / f"{slot}.json"


@dataclass(frozen=True)
class Report:
    """What a child last said about itself."""

    pid: int
    ready: bool
    detail: dict[str, Any]
    at: float  # time.monotonic() of the report: one clock for every process on Linux, and no steps

    @classmethod
    def read(cls, path: Path) -> Report | None:
        try:
            raw = json.loads(path.read_bytes())
            return cls(int(raw["pid"]), bool(raw["ready"]), dict(raw["detail"]), float(raw["at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not written yet, or by a child that died mid-write of an older format

    def write(self, path: Path) -> None:
        """Atomically: a reader sees the old report or the new one, never half of one."""
        body = json.dumps(
            {"pid": self.pid, "ready": self.ready, "detail": self.detail, "at": self.at}, default=str
        )
        partial = path.with_suffix(f".{self.pid}.tmp")
        partial.write_text(body, encoding="utf-8")
        os.replace(partial, path)

    def fresh(self, now: float, seconds: float = STALE_SECONDS) -> bool:
        return now - self.at <= seconds


class Reporter:
    """The child's background thread: each second it writes the worker's readiness for the
    supervisor, copies the consumer lag into the shared metrics, and stops the worker once its
    parent is no longer the supervisor that started it (reparented: the supervisor died)."""

    def __init__(self, worker: Worker, metrics: Metrics, state: Path, slot: int, parent: int) -> None:
        self._worker = worker
        self._metrics = metrics
        self._path = report_path(state, slot)
        self._parent = parent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervised-report", daemon=True)

    def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def report(self) -> None:
        ready, detail = self._worker.is_ready()
        self._metrics.publish_lag()
        Report(os.getpid(), ready, detail, time.monotonic()).write(self._path)

    def _run(self) -> None:
        while not self._stop.wait(REPORT_SECONDS):
            if os.getppid() != self._parent:
                log.warning("supervisor_gone", parent_pid=self._parent)
                self._worker.stop()
                return
            try:
                self.report()
            except OSError as exc:  # a full disk must not kill the worker; the supervisor sees a stale report
                log.warning("supervised_report_failed", error=str(exc))

"""Running the real worker for a scenario: `build_worker(settings)` then `App.run(stop_when_idle=…)`, in a
thread with a deadline, probed from outside, and the database checked afterwards — a fast run that
lost or doubled events is reported as WRONG, not as fast."""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, LiteralString, TextIO

import psycopg

from benchmarks.probes import WorkerProbe
from benchmarks.profiles import Profile
from benchmarks.report import Report
from benchmarks.services import Services
from benchmarks.workload import Workload
from eventhandler.app import App, build_worker
from eventhandler.logs import configure_logging
from eventhandler.observer import WorkerStats
from tests.support.services import free_port


@dataclass
class Bench:
    """What every scenario gets: the services, the sizes, the report and a place for logs."""

    services: Services
    profile: Profile
    report: Report
    logdir: Path
    stack: ExitStack
    started: float = field(default_factory=time.monotonic)
    happy_rate: float | None = None  # the failure storms and the memory run compare against it

    def say(self, message: str) -> None:
        """Progress on stderr; stdout is kept for the table."""
        print(f"[bench {time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def log_stream(self, name: str) -> TextIO:
        """A log file kept open until the end of the run (background threads may log late)."""
        return self.stack.enter_context(open(self.logdir / f"{name}.log", "w", encoding="utf-8"))


@dataclass
class WorkerRun:
    probe: WorkerProbe
    stats: WorkerStats
    problems: list[str]

    @property
    def rate(self) -> float | None:
        return self.probe.clock.rate

    @property
    def note(self) -> str:
        return "; ".join(self.problems)


class Running:
    """`App.run` in a thread, so the caller can produce, scrape or wait while it works."""

    def __init__(self, app: App, stop_when_idle: float | None) -> None:
        self.app = app
        self.stats: WorkerStats | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(stop_when_idle,), name="bench-worker", daemon=True
        )
        self._thread.start()

    def _run(self, stop_when_idle: float | None) -> None:
        try:
            self.stats = self.app.run(stop_when_idle=stop_when_idle)
        except BaseException as exc:
            self.error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def finish(self, timeout: float, stop: bool = False) -> WorkerStats:
        if stop:
            self.app.worker.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.app.worker.stop()
            self._thread.join(30)
            raise TimeoutError(f"worker still running after {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats


class Scraper:
    """Fetches /metrics every `interval` seconds, as Prometheus would (it defaults to every 15 s)."""

    def __init__(self, port: int, interval: float) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.scrapes += 1
            except OSError:
                pass  # not listening yet, or already stopped

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def run_worker(
    bench: Bench,
    name: str,
    topic: str,
    workload: Workload,
    *,
    database_url: str | None = None,
    serve_http: bool = False,
    log_level: str = "info",
    scrape_every: float | None = None,
    timeout: float = 600,
    **overrides: Any,
) -> WorkerRun:
    """Consume the whole topic with a fresh group (and a fresh database unless one is given),
    until idle; `overrides` go to the worker's settings."""
    with ExitStack() as stack:
        url = database_url or stack.enter_context(bench.services.database())
        port = free_port() if serve_http else 0
        settings = bench.services.settings(url, topic, log_level=log_level, metrics_port=port, **overrides)
        configure_logging(log_level, "json", stream=bench.log_stream(name))
        app = build_worker(settings, serve_http=serve_http)
        probe = WorkerProbe(app)
        scraper = Scraper(port, scrape_every) if serve_http and scrape_every else None
        try:
            stats = Running(app, bench.profile.idle_seconds).finish(timeout)
        finally:
            if scraper is not None:
                scraper.stop()
        problems = check_database(url, workload, stats)
        if scraper is not None and scraper.scrapes == 0:
            problems.append("/metrics was never scraped")
    return WorkerRun(probe, stats, problems)


def check_database(url: str, workload: Workload, stats: WorkerStats | None = None) -> list[str]:
    """Each reading counted once, each poison message in the DLQ once, every message consumed."""
    with psycopg.connect(url, autocommit=True) as db:
        readings = _scalar(db, "SELECT coalesce(sum(reading_count), 0) FROM devices")
        dead = _scalar(db, "SELECT count(*) FROM dlq")
        applied = _scalar(db, "SELECT count(*) FROM applied_events")
        consumed = _scalar(db, "SELECT coalesce(sum(next_offset), 0) FROM consumer_positions")
    expected = {
        "readings counted": (readings, workload.readings),
        "DLQ rows": (dead, workload.poison),
        "applied events": (applied, workload.readings + workload.registrations),
        "stored positions": (consumed, workload.messages),
    }
    if stats is not None:
        expected["consumed"] = (stats.consumed, workload.messages)
    return [f"{what} {got} ≠ {want}" for what, (got, want) in expected.items() if got != want]


def _scalar(db: psycopg.Connection[Any], query: LiteralString) -> int:
    row = db.execute(query).fetchone()
    return int(row[0]) if row else 0

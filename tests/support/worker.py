"""Run the real worker from tests: in a thread (fast, same process) or as `eventhandler run` in a
subprocess (for kill -9 and signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from eventhandler.app import App, build_worker
from eventhandler.config import Settings
from eventhandler.handlers import Registry
from eventhandler.metrics import Metrics
from eventhandler.observer import WorkerStats


def run_until_idle(settings: Settings, idle: float = 2.0, registry: Registry | None = None) -> WorkerStats:
    """Run the worker in this thread until no message has arrived for `idle` seconds."""
    return build_worker(settings, registry=registry, serve_http=False).run(stop_when_idle=idle)


class ThreadedWorker:
    def __init__(
        self, settings: Settings, *, serve_http: bool = False, metrics: Metrics | None = None
    ) -> None:
        self.app: App = build_worker(settings, serve_http=serve_http, metrics=metrics)
        self.stats: WorkerStats | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def _run(self) -> None:
        try:
            self.stats = self.app.run()
        except BaseException as exc:
            self.error = exc

    def start(self) -> ThreadedWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> WorkerStats:
        self.app.worker.stop()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "worker did not stop"
        if self.error:
            raise self.error
        assert self.stats is not None
        return self.stats


@contextmanager
def threaded_worker(settings: Settings, **kwargs: Any) -> Iterator[ThreadedWorker]:
    worker = ThreadedWorker(settings, **kwargs).start()
    try:
        yield worker
    finally:
        if worker._thread.is_alive():
            worker.stop()


def spawn_worker(env: dict[str, str], *args: str, log_path: str | None = None) -> subprocess.Popen[bytes]:
    """`python -m eventhandler run …` as a separate process (its own process group)."""
    command = [sys.executable, "-m", "eventhandler", "run", *args]
    if log_path is None:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
    with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def exit_code(process: subprocess.Popen[bytes], timeout: float, log_path: str) -> int:
    """The worker's exit code; if it has not exited in `timeout` seconds, fail with its threads'
    stacks (it prints them on SIGUSR1) and the end of its log, which say what it is waiting on."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        with open(log_path, "rb") as log:
            tail = log.read()[-12_000:].decode(errors="replace")
        raise AssertionError(f"the worker did not exit in {timeout} s; its log ends:\n{tail}") from None


def kill9(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def scalar(db: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = db.execute(query, params).fetchone()  # type: ignore[arg-type]
    return row[0] if row else None

"""The worker's HTTP side: `/metrics`, `/healthz` (alive) and `/readyz` (can make progress), plus
the background refresh of the DLQ depth gauges (one indexed query per interval)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from eventhandler.dlq import DepthSource
from eventhandler.errors import EventHandlerError
from eventhandler.logs import get_logger
from eventhandler.metrics import Metrics

log = get_logger("eventhandler.health")

ReadyCheck = Callable[[], tuple[bool, dict[str, Any]]]


def _always_alive() -> tuple[bool, dict[str, Any]]:
    return True, {"status": "ok"}


class HealthServer:
    """`alive` answers `/healthz` (a worker that serves HTTP is alive; the supervisor asks its
    children), `ready` answers `/readyz`."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: ReadyCheck,
        alive: ReadyCheck = _always_alive,
    ) -> None:
        metrics_registry = registry

        def answer(check: ReadyCheck) -> tuple[int, bytes]:
            ok, detail = check()
            return 200 if ok else 503, (
                json.dumps(detail, default=str) + "\n"
            ).encode()  # error text may hold quotes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(metrics_registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(*answer(alive), "application/json")
                elif path == "/readyz":
                    self._send(*answer(ready), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # scrapes every few seconds are not worth a log line

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class DepthRefresher:
    """Keeps `eventhandler_dlq_depth` and the oldest pending age current from a background thread."""

    def __init__(
        self,
        repository: DepthSource,
        metrics: Metrics,
        consumers: list[str],
        interval: float,
        timeout: float = 10.0,
    ) -> None:
        self._repository = repository
        self._metrics = metrics
        self._consumers = consumers
        self._interval = interval
        self._timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlq-depth", daemon=True)
        self._last_success = 0.0
        self._last_ok: bool | None = None

    @property
    def last_ok(self) -> bool | None:
        """None before the first refresh; False after a failure, or when the last success is stale
        (a refresh stuck longer than its deadline counts as a failure)."""
        if self._last_ok and time.monotonic() - self._last_success > 2 * self._interval + 2 * self._timeout:
            return False
        return self._last_ok

    def refresh(self) -> bool:
        try:
            snapshot = self._repository.depth_snapshot(self._timeout)
        except EventHandlerError as exc:
            if self._last_ok is not False:
                log.warning("dlq_depth_refresh_failed", error=str(exc))
            self._last_ok = False
            return False
        self._metrics.set_dlq_depth(self._consumers, snapshot)
        self._last_ok = True
        self._last_success = time.monotonic()
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self._interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

"""The admin REST API: the DLQ operations of `DLQService` over HTTP, behind bearer tokens.

`auth` says who may call (tokens and roles), `http` what every request goes through (the gate, the
request log line, error bodies), `models` what requests and responses hold, `routes` the endpoints.
This module assembles the app, with the operator's console (`eventhandler.console`), and serves it.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager

import anyio
import anyio.to_thread
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.middleware.base import BaseHTTPMiddleware

from eventhandler import __version__, console
from eventhandler.api.auth import TokenChecker
from eventhandler.api.http import gate, service_error, validation_error
from eventhandler.api.routes import ApiState, circuits, operations, router
from eventhandler.app import build_service
from eventhandler.config import Settings
from eventhandler.console.sessions import SessionStore
from eventhandler.errors import ConfigError, EventHandlerError
from eventhandler.health import DepthRefresher
from eventhandler.logs import get_logger
from eventhandler.metrics import Metrics
from eventhandler.service import DLQService

__all__ = ["create_app", "serve"]

log = get_logger("eventhandler.api")


def create_app(
    service: DLQService, settings: Settings, metrics: Metrics, sessions: SessionStore | None = None
) -> FastAPI:
    """The admin API on `service`, and with `sessions` the operator's console at `/ui`. The DLQ depth
    gauges are refreshed while the app runs."""
    tokens = TokenChecker(settings)
    if not tokens.configured:
        log.warning("api_without_tokens", detail="no token is configured: every /api/ request gets 401")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        refresher = DepthRefresher(
            service.repository, metrics, [settings.consumer_group], settings.dlq_refresh_seconds
        )
        refresher.start()
        _app.state.eventhandler.probe_threads = anyio.CapacityLimiter(2)
        log.info("api_started", redact_fields=len(service.redactor.paths))
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(refresher.stop)
            log.info("api_stopped")

    app = FastAPI(
        title="eventhandler admin API",
        version=__version__,
        description="Inspect, replay and resolve the rows of the eventhandler dead letter queue.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # the redirect of `/healthz/` to `/healthz` was built from the request's Host header
        redirect_slashes=False,
    )
    app.state.eventhandler = ApiState(service=service, metrics=metrics)
    app.add_middleware(BaseHTTPMiddleware, dispatch=gate(tokens))
    app.add_exception_handler(EventHandlerError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(router)
    app.include_router(circuits)
    app.include_router(operations)
    if sessions is not None:
        console.install(app, service, console.Gate(tokens, sessions, settings.console_secure_cookie))
    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run the admin API under uvicorn until SIGTERM/SIGINT, then finish in-flight requests and stop.
    Logging is the caller's to configure (`eventhandler api` does, from the settings)."""
    if settings.admin_token is None and settings.admin_read_token is None:
        raise ConfigError("EVENTHANDLER_ADMIN_TOKEN", "the admin API needs a token (or a read-only one)")
    # Bound before the pool opens: a port in use is one line, not the pool's warnings and uvicorn's exit.
    with closing(_listen(host, port)) as listening:
        metrics = Metrics()
        service, pool = build_service(settings, metrics=metrics)
        try:
            app = create_app(service, settings, metrics, SessionStore(pool))
            config = uvicorn.Config(
                app,
                host=host,
                port=port,
                log_config=None,  # keep the structlog configuration
                access_log=False,  # one line per request comes from the app, with its request id
                server_header=False,
                # X-Forwarded-For is believed only from the proxies named in the settings (none by default)
                proxy_headers=bool(settings.api_trusted_proxies),
                forwarded_allow_ips=",".join(settings.api_trusted_proxies) or None,
                lifespan="on",
                timeout_graceful_shutdown=30,
            )
            log.info("api_starting", host=host, port=port)
            with _exit_cleanly_after_uvicorn():
                uvicorn.Server(config).run(sockets=[listening])
        finally:
            pool.close()


def _listen(host: str, port: int) -> socket.socket:
    """The API's socket, bound as uvicorn binds it (which on failure logs and exits 1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError("--host/--port", f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


@contextmanager
def _exit_cleanly_after_uvicorn() -> Iterator[None]:
    """Uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the handler
    it found. With this no-op handler found instead, `serve` returns, closes the pool, and the process
    exits 0, as the worker does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

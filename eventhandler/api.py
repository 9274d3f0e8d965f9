"""The admin REST API: the DLQ operations of `DLQService` over HTTP, behind bearer tokens.

Two roles: `reader` (any GET) and `admin` (also POST, PUT and DELETE). The check runs in a middleware
before the request is parsed at all, so nothing under `/api/` answers a caller without a valid token —
not even with a validation error. Tokens are compared in constant time and never logged; the audit
trail records the role as the actor (`api:admin`), the log line carries the request id and client.

Responses carry no stack trace, connection string or setting: service errors map to fixed messages,
anything unexpected becomes `500 {"detail": "internal error"}` and a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
import structlog
import uvicorn
from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware.base import BaseHTTPMiddleware

from eventhandler import __version__
from eventhandler.api_models import (
    MAX_ID,
    DLQDetail,
    DLQPage,
    ErrorResponse,
    Health,
    ListQuery,
    ReplayResponse,
    ResolveRequest,
    ResolveResponse,
    RetryAllRequest,
    RetryRequest,
    StatsQuery,
    StatsResponse,
    ValidationErrorResponse,
    encode_cursor,
    render_entry,
)
from eventhandler.app import build_service
from eventhandler.config import Settings
from eventhandler.errors import (
    BrokerUnavailable,
    Busy,
    ConfigError,
    DatabaseUnavailable,
    EventHandlerError,
    InvalidOperation,
    NotFound,
    NotPermitted,
    PermanentError,
    PublishFailed,
    TransientError,
)
from eventhandler.health import DepthRefresher
from eventhandler.logs import configure_logging, get_logger
from eventhandler.metrics import Metrics
from eventhandler.models import DLQFilter
from eventhandler.service import DLQService

log = get_logger("eventhandler.api")

API_ROOT = "/api/"
PREFIX = "/api/v1/events/dlq"
READ_METHODS = frozenset({"GET"})
API_METHODS = frozenset({"GET", "POST", "PUT", "DELETE"})  # any other method on /api/ is a 405
# Every response: never cached by a browser or proxy (rows hold payloads), never content-sniffed.
SECURITY_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
MAX_ISSUES = 20  # a 422 names at most this many problems,
MAX_ISSUE_CHARS = 200  # each part of them cut to this length: a 40 kB parameter name is not echoed
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

Role = Literal["admin", "reader"]


# -- authorization --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    role: Role

    @property
    def actor(self) -> str:
        """Who the audit log names for a change made with this token."""
        return f"api:{self.role}"

    @property
    def may_change(self) -> bool:
        return self.role == "admin"


class TokenChecker:
    """Bearer tokens from the settings. Every configured token is compared, in constant time."""

    def __init__(self, settings: Settings) -> None:
        self._tokens: list[tuple[bytes, Role]] = []
        if settings.admin_token is not None:
            self._tokens.append((_digest(settings.admin_token.get_secret_value().encode()), "admin"))
        if settings.admin_read_token is not None:
            self._tokens.append((_digest(settings.admin_read_token.get_secret_value().encode()), "reader"))

    @property
    def configured(self) -> bool:
        return bool(self._tokens)

    def role_for(self, authorization: str | None) -> Role | None:
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return None
        # Starlette decodes header bytes as latin-1; this gives back the bytes the client sent.
        presented = _digest(credentials.strip().encode("latin-1"))
        found: Role | None = None
        for token, role in self._tokens:
            if hmac.compare_digest(presented, token) and found is None:
                found = role
        return found


def _digest(token: bytes) -> bytes:
    """Tokens are compared as SHA-256 digests: equal lengths, so the comparison time tells nothing."""
    return hashlib.sha256(token).digest()


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="BearerToken",
    description="EVENTHANDLER_ADMIN_TOKEN (read and change) or EVENTHANDLER_ADMIN_READ_TOKEN (read only).",
)


def _principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """The caller the middleware authenticated (the bearer dependency puts the scheme in OpenAPI)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    return principal


def _admin(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if not principal.may_change:
        raise HTTPException(403, "this token may read but not change the DLQ")
    return principal


def _service(request: Request) -> DLQService:
    state: ApiState = request.app.state.eventhandler
    return state.service


Reader = Annotated[Principal, Depends(_principal)]
Admin = Annotated[Principal, Depends(_admin)]
Service = Annotated[DLQService, Depends(_service)]
DlqIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="The DLQ row id.")]


# -- routes ------------------------------------------------------------------------------------------------


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "The request body cannot be parsed.",
        401: "No valid bearer token.",
        403: "Not with this token (changes need the admin token; so does error_contains while redacting).",
        404: "No DLQ row with this id.",
        409: "The row's status does not allow this.",
        502: "The broker did not confirm the publish.",
    }
    return {code: {"model": ErrorResponse, "description": descriptions[code]} for code in codes}


router = APIRouter(
    prefix=PREFIX,
    tags=["dlq"],
    responses={
        **_errors(400, 401),
        422: {"model": ValidationErrorResponse, "description": "Invalid input."},
        500: {"model": ErrorResponse, "description": "Internal error (details are in the log)."},
        503: {"model": ErrorResponse, "description": "PostgreSQL or Kafka is unavailable; try again."},
    },
)


def _links_to_row(id_expression: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI links from a response that names a row to what can be done with it (clients and
    stateful API tests follow them)."""
    targets = {
        "GetRow": "get_row",
        "RetryRow": "retry_row",
        "ResolveRow": "resolve_row",
        "DeleteRow": "delete_row",
    }
    links = {
        name: {"operationId": op, "parameters": {"dlq_id": id_expression}} for name, op in targets.items()
    }
    return {200: {"links": links}}


@router.get(
    "",
    response_model=DLQPage,
    summary="List DLQ rows",
    operation_id="list_rows",
    responses=_errors(403) | _links_to_row("$response.body#/items/0/dlq_id"),
)
def list_rows(query: Annotated[ListQuery, Query()], principal: Reader, service: Service) -> DLQPage:
    """Rows matching the filters in id order, one page at a time (keyset pagination)."""
    flt = service.readable_filter(query.dlq_filter(), reader=not principal.may_change)
    rows = service.list_rows(flt, limit=query.limit + 1, after_id=query.after_id)
    page = rows[: query.limit]
    more = len(rows) > query.limit
    return DLQPage(
        items=page,
        next_cursor=encode_cursor(page[-1].dlq_id) if more else None,
        total=service.count(flt),
    )


@router.get(
    "/stats",
    response_model=StatsResponse,
    summary="DLQ depth by consumer, stage and status",
    responses=_errors(403),
)
def stats(query: Annotated[StatsQuery, Query()], principal: Reader, service: Service) -> StatsResponse:
    flt = service.readable_filter(query.dlq_filter(), reader=not principal.may_change)
    return StatsResponse.model_validate(service.stats(flt).as_dict())


@router.post(
    "/retry-all",
    response_model=ReplayResponse,
    summary="Replay every row matching the filters",
    responses=_errors(403, 404, 409),
)
def retry_all(request: RetryAllRequest, principal: Admin, service: Service) -> ReplayResponse:
    """Republishes up to `limit` matching rows (status `pending` unless `statuses` says otherwise).

    A filter is required; replaying everything needs `all: true`. Rows the broker confirmed become
    `replayed`; the worker marks them `resolved` once they are processed."""
    report = service.replay(
        service.readable_filter(request.dlq_filter(), reader=False),
        actor=principal.actor,
        limit=request.limit,
        to_topic=request.to_topic,
        dry_run=request.dry_run,
        force=request.force,
    )
    return ReplayResponse.model_validate(report.as_dict())


# Without these, `DELETE /stats` or `GET /retry-all` reach the `/{dlq_id}` routes and get a 422 for
# an id that is not a number; the right answer is 405 with the methods the path has.
@router.api_route("/stats", methods=["POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
def _stats_other_methods() -> Response:
    return _not_allowed("GET")


@router.api_route("/retry-all", methods=["GET", "PUT", "DELETE", "PATCH"], include_in_schema=False)
def _retry_all_other_methods() -> Response:
    return _not_allowed("POST")


def _not_allowed(allow: str) -> Response:
    return JSONResponse({"detail": "method not allowed here"}, status_code=405, headers={"Allow": allow})


@router.get(
    "/{dlq_id}",
    response_model=DLQDetail,
    summary="One DLQ row",
    operation_id="get_row",
    responses=_errors(404) | _links_to_row("$response.body#/dlq_id"),
)
def get_row(dlq_id: DlqIdPath, principal: Reader, service: Service) -> DLQDetail:
    """The whole row; `error_traceback` is null for the read-only token."""
    return render_entry(service.view(dlq_id, reader=not principal.may_change))


@router.post(
    "/{dlq_id}/retry",
    response_model=ReplayResponse,
    summary="Replay one row",
    operation_id="retry_row",
    responses=_errors(403, 404, 409, 502),
)
def retry(
    dlq_id: DlqIdPath,
    principal: Admin,
    service: Service,
    request: Annotated[RetryRequest | None, Body()] = None,
) -> ReplayResponse:
    """Republishes the row to its original topic (or `to_topic`). Pending and replayed rows can be
    replayed; a resolved or discarded row needs `force: true`."""
    options = request or RetryRequest()
    report = service.retry(dlq_id, actor=principal.actor, force=options.force, to_topic=options.to_topic)
    return ReplayResponse.model_validate(report.as_dict())


@router.delete(
    "/{dlq_id}",
    status_code=204,
    response_class=Response,
    summary="Delete one row",
    operation_id="delete_row",
    responses=_errors(403, 404),
)
def delete_row(dlq_id: DlqIdPath, principal: Admin, service: Service) -> Response:
    service.delete([dlq_id], actor=principal.actor)
    return Response(status_code=204)


@router.put(
    "/{dlq_id}/resolve",
    response_model=ResolveResponse,
    summary="Mark one row resolved",
    operation_id="resolve_row",
    responses=_errors(403, 404, 409),
)
def resolve(
    dlq_id: DlqIdPath,
    principal: Admin,
    service: Service,
    request: Annotated[ResolveRequest | None, Body()] = None,
) -> ResolveResponse:
    """Pending and replayed rows become resolved; resolving a resolved row changes nothing (200);
    a discarded row cannot be resolved (409)."""
    changed = service.resolve([dlq_id], actor=principal.actor, note=request.note if request else None)
    if changed:
        return ResolveResponse(dlq_id=dlq_id, status="resolved", changed=True)
    status = service.status(dlq_id)
    if status == "resolved":
        return ResolveResponse(dlq_id=dlq_id, status=status, changed=False)
    raise InvalidOperation(f"DLQ row {dlq_id} is {status}; only pending or replayed rows can be resolved")


operations = APIRouter(tags=["operations"])


@operations.get("/healthz", response_model=Health, summary="Alive (no token needed)")
async def healthz() -> Health:
    """On the event loop, never behind requests that wait for a thread (replays hold one each)."""
    return Health(status="ok")


@operations.get(
    "/readyz",
    response_model=Health,
    summary="Ready: PostgreSQL answers (no token needed)",
    responses={503: {"model": Health, "description": "PostgreSQL does not answer."}},
)
async def readyz(request: Request, service: Service) -> Response:
    state: ApiState = request.app.state.eventhandler
    try:  # on threads of its own, so that busy request threads cannot delay it
        await anyio.to_thread.run_sync(service.count, DLQFilter(ids=(0,)), limiter=state.probe_threads)
    except EventHandlerError as exc:
        log.warning("api_not_ready", error_type=type(exc).__name__)
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ready"})


@operations.get("/metrics", include_in_schema=False)
def metrics_text(request: Request) -> Response:
    state: ApiState = request.app.state.eventhandler
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- errors -------------------------------------------------------------------------------------------------


def _error_status(exc: EventHandlerError) -> tuple[int, str]:
    if isinstance(exc, NotFound):
        return 404, str(exc)
    if isinstance(exc, InvalidOperation):
        return 409, str(exc)
    if isinstance(exc, NotPermitted):
        return 403, str(exc)
    if isinstance(exc, DatabaseUnavailable):
        return 503, "the database is unavailable; try again later"
    if isinstance(exc, BrokerUnavailable):
        return 503, "the Kafka broker is unavailable; try again later"
    if isinstance(exc, Busy):
        return 503, str(exc)
    if isinstance(exc, TransientError):
        return 503, "a service this API needs is unavailable; try again later"
    if isinstance(exc, PublishFailed):
        return 502, f"the broker did not confirm the publish: {exc}"
    if isinstance(exc, PermanentError):
        return 400, "the database rejected a value of this request"
    return 500, "internal error"


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EventHandlerError)
    status, detail = _error_status(exc)
    headers = {"Retry-After": "5"} if status == 503 else None
    if status >= 500 or status == 400:
        log.warning("api_request_failed", status=status, error_type=type(exc).__name__, error=str(exc))
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    issues = []
    for error in errors[:MAX_ISSUES]:
        message = _cut(str(error.get("msg", "invalid value")).removeprefix("Value error, "))
        location = [part if isinstance(part, int) else _cut(str(part)) for part in error.get("loc", ())]
        issues.append({"loc": location, "msg": message, "type": _cut(str(error.get("type", "value_error")))})
    summary = "; ".join(f"{'.'.join(map(str, i['loc'])) or 'request'}: {i['msg']}" for i in issues)
    if len(errors) > MAX_ISSUES:
        summary += f"; and {len(errors) - MAX_ISSUES} more"
    return JSONResponse({"detail": issues, "message": summary}, status_code=422)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ISSUE_CHARS else text[: MAX_ISSUE_CHARS - 1] + "…"


# -- the application ------------------------------------------------------------------------------------


@dataclass
class ApiState:
    service: DLQService
    metrics: Metrics
    probe_threads: anyio.CapacityLimiter | None = None  # made in the lifespan (it needs the event loop)


def _request_id(given: str | None) -> str:
    return given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex


Next = Callable[[Request], Awaitable[Response]]


def _gate(tokens: TokenChecker) -> Callable[[Request, Next], Awaitable[Response]]:
    """Authenticate and authorize `/api/` requests, then run them; log one line per request."""

    async def dispatch(request: Request, call_next: Next) -> Response:
        started = time.perf_counter()
        request_id = _request_id(request.headers.get("x-request-id"))
        client = request.client.host if request.client else None
        role: Role | None = None
        with structlog.contextvars.bound_contextvars(request_id=request_id, client=client):
            response: Response | None = None
            if request.url.path.startswith(API_ROOT):
                role = tokens.role_for(request.headers.get("authorization"))
                if role is None:
                    response = JSONResponse(
                        {"detail": "a valid bearer token is required"},
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                elif request.method not in API_METHODS:
                    response = JSONResponse(
                        {"detail": f"method {request.method} is not allowed here"},
                        status_code=405,
                        headers={"Allow": "GET, POST, PUT, DELETE"},
                    )
                elif request.method not in READ_METHODS and role != "admin":
                    response = JSONResponse(
                        {"detail": "this token may read but not change the DLQ"}, status_code=403
                    )
                else:
                    request.state.principal = Principal(role)
            if response is None:
                try:
                    response = await call_next(request)
                except Exception:
                    log.exception("api_unhandled_error", method=request.method, path=request.url.path)
                    response = JSONResponse({"detail": "internal error"}, status_code=500)
            response.headers["X-Request-ID"] = request_id
            response.headers.update(SECURITY_HEADERS)
            level = log.debug if request.url.path in _QUIET_PATHS else log.info
            level(
                "api_request",
                method=request.method,
                path=request.url.path,
                status=response.status_code,
                role=role,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
        return response

    return dispatch


def create_app(service: DLQService, settings: Settings, metrics: Metrics) -> FastAPI:
    """The admin API on `service`. The DLQ depth gauges are refreshed while the app runs."""
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
    app.add_middleware(BaseHTTPMiddleware, dispatch=_gate(tokens))
    app.add_exception_handler(EventHandlerError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(router)
    app.include_router(operations)
    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run the admin API under uvicorn until SIGTERM/SIGINT, then finish in-flight requests and stop."""
    configure_logging(settings.log_level, settings.log_format, consumer_group=settings.consumer_group)
    if settings.admin_token is None and settings.admin_read_token is None:
        raise ConfigError("EVENTHANDLER_ADMIN_TOKEN", "the admin API needs a token (or a read-only one)")
    metrics = Metrics()
    service, pool = build_service(settings, metrics=metrics)
    try:
        app = create_app(service, settings, metrics)
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
            uvicorn.Server(config).run()
    finally:
        pool.close()


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

"""What every request goes through: the gate (token, method, role) before the request is parsed at
all, one log line per request, security headers, and error bodies that leak nothing.

Nothing under `/api/` answers a caller without a valid token — not even with a validation error.
Service errors map to fixed messages; anything unexpected becomes `500 {"detail": "internal error"}`
and a log line, never a stack trace, connection string or setting.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from eventhandler.api.auth import Principal, Role, TokenChecker
from eventhandler.errors import (
    BrokerUnavailable,
    Busy,
    DatabaseUnavailable,
    EventHandlerError,
    InvalidOperation,
    NotFound,
    NotPermitted,
    PermanentError,
    PublishFailed,
    TransientError,
)
from eventhandler.logs import get_logger

log = get_logger("eventhandler.api")

API_ROOT = "/api/"
READ_METHODS = frozenset({"GET"})
API_METHODS = frozenset({"GET", "POST", "PUT", "DELETE"})  # any other method on /api/ is a 405
# Every response: never cached by a browser or proxy (rows hold payloads), never content-sniffed.
SECURITY_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
MAX_ISSUES = 20  # a 422 names at most this many problems,
MAX_ISSUE_CHARS = 200  # each part of them cut to this length: a 40 kB parameter name is not echoed
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

Next = Callable[[Request], Awaitable[Response]]


def _request_id(given: str | None) -> str:
    return given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex


def gate(tokens: TokenChecker) -> Callable[[Request, Next], Awaitable[Response]]:
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


def error_status(exc: EventHandlerError) -> tuple[int, str]:
    """The status and the fixed message an operator is told for a service error (never a DSN or a
    broker address)."""
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


async def service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EventHandlerError)
    status, detail = error_status(exc)
    headers = {"Retry-After": "5"} if status == 503 else None
    if status >= 500 or status == 400:
        log.warning("api_request_failed", status=status, error_type=type(exc).__name__, error=str(exc))
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def validation_error(request: Request, exc: Exception) -> Response:
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

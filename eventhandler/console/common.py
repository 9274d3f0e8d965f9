"""What every console page shares: the session check, the CSRF check, the headers, the filters in
the URL, and the rendering of a template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import Depends, Form, Request
from fastapi.responses import HTMLResponse
from pydantic import ValidationError
from starlette.datastructures import QueryParams

import eventhandler.console.render as render
from eventhandler import __version__
from eventhandler.api.auth import TokenChecker
from eventhandler.api.http import error_status
from eventhandler.console.sessions import Session, SessionStore
from eventhandler.errors import EventHandlerError

HERE = Path(__file__).parent
COOKIE = "eventhandler_console"
PAGE = 50
STATIC = {"htmx.min.js": "text/javascript", "console.css": "text/css"}
# The console's pages load only their own script and style; nothing frames them.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
FILTER_FIELDS = (
    "consumer",
    "event_type",
    "stage",
    "since",
    "until",
    "error_contains",
    "payload_contains",
    "fingerprint",
    "topic",
)
DONE = {
    "replayed": "Replayed: the broker has it; the worker resolves the row once it has processed it.",
    "resolved": "Resolved.",
    "discarded": "Discarded.",
}


class SignIn(Exception):
    """No live session: the browser is sent to the sign-in page."""


class Forbidden(Exception):
    """A change without an admin session or without the session's CSRF token."""


@dataclass(frozen=True)
class Gate:
    """What the console's pages check a browser against, kept on the app."""

    tokens: TokenChecker
    sessions: SessionStore
    secure_cookie: bool = False  # Secure even on plain HTTP (TLS ends at a proxy)


def current(request: Request) -> Session:
    """The browser's live session, or off to the sign-in page."""
    gate: Gate = request.app.state.console
    session = gate.sessions.find(request.cookies.get(COOKIE), gate.tokens.roles)
    if session is None:
        raise SignIn(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    request.state.console_session = session
    return session


def changing(
    request: Request, session: Annotated[Session, Depends(current)], csrf: Annotated[str, Form()] = ""
) -> Session:
    """An admin session, its CSRF token in the form, and a request from the console's own pages."""
    site = request.headers.get("sec-fetch-site")
    if not session.may_change or not session.csrf_ok(csrf) or site not in (None, "same-origin"):
        raise Forbidden()
    return session


Reader = Annotated[Session, Depends(current)]
Admin = Annotated[Session, Depends(changing)]
Note = Annotated[str, Form(max_length=2000)]


class Pages:
    """The templates, rendered with what every page shows (the session, the version, the path)."""

    def __init__(self) -> None:
        self._environment = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._environment.filters |= render.FILTERS

    def __call__(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        session: Session | None = getattr(request.state, "console_session", None)
        html = self._environment.get_template(name).render(
            session=session, version=__version__, path=request.url.path, **context
        )
        return HTMLResponse(html, status_code=status, headers=HEADERS)


def given(params: QueryParams) -> dict[str, Any]:
    """The filters in a query string, blank fields left out (a GET form sends them all)."""
    found: dict[str, Any] = {k: v for k in FILTER_FIELDS if (v := params.get(k, "").strip())}
    statuses = [s for s in params.getlist("status") if s]
    if statuses:
        found["status"] = statuses
    return found


def pairs(filters: dict[str, Any]) -> list[tuple[str, Any]]:
    """The filters as a query string's pairs (a status once per value)."""
    found: list[tuple[str, Any]] = []
    for key, value in filters.items():
        found += [(key, v) for v in value] if isinstance(value, list) else [(key, value)]
    return found


def problem(exc: Exception) -> str:
    """What was wrong, in a line: an operator's input, or the service's fixed message (the API's: never
    a connection string or a broker's address)."""
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return f"{where}: {str(error['msg']).removeprefix('Value error, ')}"[:300]
    if isinstance(exc, EventHandlerError):
        return error_status(exc)[1][:300]
    return "internal error"

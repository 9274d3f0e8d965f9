"""What every console page shares: the session check, the CSRF check, the headers, the filters in
the URL, and the rendering of a template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import Depends, Form, Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import eventhandler.console.render as render
from eventhandler import __version__
from eventhandler.api.auth import TokenChecker
from eventhandler.api.http import error_status
from eventhandler.api.models import storable
from eventhandler.console.sessions import Session, SessionStore
from eventhandler.errors import EventHandlerError, InvalidOperation

HERE = Path(__file__).parent
COOKIE = "eventhandler_console"
PAGE = 50
# The largest form the console sends is a replay's filters (at most 4,000 characters) or a note (2,000),
# URL-encoded: up to about 72 kB of non-ASCII text.
MAX_FORM_BYTES = 131_072
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
Note = Annotated[str, Form()]  # checked by `note_text`, so that a wrong one is said on the row's page
MAX_NOTE = 2000  # the API's limit


def note_text(note: str) -> str | None:
    """An operator's note as the service takes it (None: no note), or why not."""
    if len(note) > MAX_NOTE:
        raise InvalidOperation(f"a note is at most {MAX_NOTE:,} characters")
    try:
        storable(note)
    except ValueError as exc:
        raise InvalidOperation(f"a note {exc}") from None
    return note or None


class FormLimit:
    """Answers 413 to a console request whose body is larger than any form the console sends, before
    anything reads it: a form is parsed before the session is looked at, so anyone could otherwise make
    the server hold a large body (the API's gate refuses before the body is read)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/ui") or scope["method"] == "GET":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        too_large = PlainTextResponse("request body too large", status_code=413, headers=HEADERS)
        if declared is not None and not (declared.isdigit() and int(declared) <= MAX_FORM_BYTES):
            await too_large(scope, receive, send)
            return
        body, more = bytearray(), True
        while more and len(body) <= MAX_FORM_BYTES:  # counted as it comes: a length may be left out
            message = await receive()
            if message["type"] != "http.request":
                return  # the browser went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if len(body) > MAX_FORM_BYTES:
            await too_large(scope, receive, send)
            return
        whole = {"type": "http.request", "body": bytes(body), "more_body": False}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return whole

        await self.app(scope, replay, send)


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

"""The console's pages: sign-in, overview, the rows (filtered, paged), a row, and the changes an admin
session may make. Each page is one `DLQService` read, rendered; each change one service operation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

import eventhandler.console.render as render
from eventhandler import __version__
from eventhandler.api.auth import TokenChecker
from eventhandler.api.models import ListQuery
from eventhandler.console.sessions import Session, SessionStore
from eventhandler.detail import row_detail
from eventhandler.errors import EventHandlerError, InvalidOperation, NotFound
from eventhandler.models import STAGES, STATUSES
from eventhandler.service import DLQService

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


def current(request: Request) -> Session:
    """The browser's live session, or off to the sign-in page."""
    gate: Gate = request.app.state.console
    session = gate.sessions.find(request.cookies.get(COOKIE), gate.tokens.digests)
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


def console_router(service: DLQService, gate: Gate) -> APIRouter:
    tokens, sessions = gate.tokens, gate.sessions
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    environment.filters |= render.FILTERS
    router = APIRouter(prefix="/ui", include_in_schema=False)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        session: Session | None = getattr(request.state, "console_session", None)
        html = environment.get_template(name).render(
            session=session, version=__version__, path=request.url.path, **context
        )
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    # -- signing in and out ------------------------------------------------------------------

    @router.get("/signin")
    def signin_form(request: Request, next: str = "/ui") -> HTMLResponse:
        return page(request, "signin.html", next=_inside(next), error=None)

    @router.post("/signin")
    def signin(
        request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/ui"
    ) -> Response:
        found = tokens.role_of_token(token)
        if found is None:
            return page(request, "signin.html", 401, next=_inside(next), error="That token is not valid.")
        role, digest = found
        value = sessions.create(role, digest, request.client.host if request.client else None)
        response = RedirectResponse(_inside(next), status_code=303, headers=HEADERS)
        secure = request.url.scheme == "https"
        response.set_cookie(
            COOKIE,
            value,
            max_age=sessions.seconds,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=secure,
        )
        return response

    @router.post("/signout")
    def signout(request: Request, session: Reader, csrf: Annotated[str, Form()] = "") -> Response:
        if not session.csrf_ok(csrf):
            raise Forbidden()
        sessions.delete(request.cookies.get(COOKIE))
        response = RedirectResponse("/ui/signin", status_code=303, headers=HEADERS)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    # -- reading ---------------------------------------------------------------------------

    @router.get("")
    def overview(request: Request, session: Reader) -> HTMLResponse:
        stats = service.stats(ListQuery().dlq_filter())
        return page(request, "overview.html", stats=stats, depth=render.depth_table(stats))

    @router.get("/rows")
    def rows(request: Request, session: Reader) -> HTMLResponse:
        given = _given(request)
        context: dict[str, Any] = {"given": given, "filters": _choices(), "next_url": None}
        try:
            query = ListQuery.model_validate(given | {"limit": PAGE})
            flt = service.readable_filter(query.dlq_filter(), reader=not session.may_change)
        except (ValidationError, EventHandlerError) as exc:
            return page(request, "rows.html", 400, rows=[], total=0, error=_problem(exc), **context)
        found = service.list_rows(flt, limit=PAGE, after_id=_int(request.query_params.get("after")))
        if len(found) == PAGE:
            context["next_url"] = f"/ui/rows?{urlencode([*_pairs(given), ('after', found[-1].dlq_id)])}"
        return page(request, "rows.html", rows=found, total=service.count(flt), error=None, **context)

    def row_page(
        request: Request, dlq_id: int, session: Session, done: str | None = None, problem: str | None = None
    ) -> HTMLResponse:
        try:
            view = service.view(dlq_id, reader=not session.may_change)
        except NotFound as exc:
            return page(request, "error.html", 404, message=str(exc))
        repaired = render.payload(view, edited=True) if view.edited is not None else None
        context = {
            "payload": render.payload(view),
            "repaired": repaired,
            "diff": render.diff_lines(view.diff),
        }
        return page(
            request,
            "row.html",
            409 if problem else 200,
            row=row_detail(view),
            entry=view.entry,
            history=service.history(dlq_id),
            done=done,
            messages=DONE,
            problem=problem,
            **context,
        )

    @router.get("/rows/{dlq_id}")
    def row(request: Request, dlq_id: int, session: Reader, done: str | None = None) -> HTMLResponse:
        return row_page(request, dlq_id, session, done)

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            return Response(status_code=404)
        return FileResponse(
            HERE / "static" / name, media_type=STATIC[name], headers={"Cache-Control": "max-age=3600"}
        )

    # -- changing (admin) --------------------------------------------------------------------

    def change(
        request: Request, session: Session, dlq_id: int, done: str, operation: Callable[[], object]
    ) -> Response:
        """The change, then the row again (a refusal is said on the row's page, with 409)."""
        try:
            operation()
        except (InvalidOperation, NotFound) as exc:
            return row_page(request, dlq_id, session, problem=str(exc))
        return RedirectResponse(f"/ui/rows/{dlq_id}?done={done}", status_code=303, headers=HEADERS)

    @router.post("/rows/{dlq_id}/replay")
    def replay(request: Request, dlq_id: int, session: Admin) -> Response:
        return change(
            request, session, dlq_id, "replayed", lambda: service.retry(dlq_id, actor=session.actor)
        )

    @router.post("/rows/{dlq_id}/resolve")
    def resolve(request: Request, dlq_id: int, session: Admin, note: Note = "") -> Response:
        def resolve_it() -> object:
            return service.resolve_row(dlq_id, actor=session.actor, note=note or None)

        return change(request, session, dlq_id, "resolved", resolve_it)

    @router.post("/rows/{dlq_id}/discard")
    def discard(request: Request, dlq_id: int, session: Admin, note: Note = "") -> Response:
        def discard_it() -> object:
            return service.discard([dlq_id], actor=session.actor, note=note or None)

        return change(request, session, dlq_id, "discarded", discard_it)

    return router


def install(app: Any, service: DLQService, gate: Gate) -> None:
    """The console on `app`, with its answers to a missing session and a refused change."""
    app.state.console = gate
    router = console_router(service, gate)

    async def to_signin(request: Request, exc: Exception) -> Response:
        return RedirectResponse(f"/ui/signin?{urlencode({'next': str(exc)})}", 303, HEADERS)

    async def forbidden(request: Request, exc: Exception) -> Response:
        return HTMLResponse(
            "<!doctype html><title>403</title><p>This session may not make that change.",
            status_code=403,
            headers=HEADERS,
        )

    app.include_router(router)
    app.add_exception_handler(SignIn, to_signin)
    app.add_exception_handler(Forbidden, forbidden)


def _inside(target: str) -> str:
    """A place to go after signing in: a console page, never another site (`//evil`, `/\\evil`)."""
    if target.startswith("/ui") and not target.startswith(("//", "/\\")) and "\\" not in target:
        return target
    return "/ui"


def _given(request: Request) -> dict[str, Any]:
    """The filters in the URL, blank fields left out (a GET form sends them all)."""
    given: dict[str, Any] = {k: v for k in FILTER_FIELDS if (v := request.query_params.get(k, "").strip())}
    statuses = [s for s in request.query_params.getlist("status") if s]
    if statuses:
        given["status"] = statuses
    return given


def _pairs(given: dict[str, Any]) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = []
    for key, value in given.items():
        pairs += [(key, v) for v in value] if isinstance(value, list) else [(key, value)]
    return pairs


def _choices() -> dict[str, Any]:
    return {"stages": STAGES, "statuses": STATUSES}


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() and len(text) < 19 else None


def _problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return f"{where}: {str(error['msg']).removeprefix('Value error, ')}"[:300]
    return str(exc)[:300]

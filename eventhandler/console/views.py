"""The console's pages: sign-in, overview, the rows (filtered, paged), a row, and the changes an admin
session may make. Each page is one `DLQService` read, rendered; each change one service operation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

import eventhandler.console.render as render
from eventhandler.api.models import ListQuery
from eventhandler.console.common import (
    COOKIE,
    DONE,
    HEADERS,
    HERE,
    PAGE,
    STATIC,
    Admin,
    Forbidden,
    FormLimit,
    Gate,
    Note,
    Pages,
    Reader,
    SignIn,
    given,
    note_text,
    pairs,
    problem,
)
from eventhandler.console.replaying import add_replay_routes
from eventhandler.console.sessions import Session
from eventhandler.detail import row_detail
from eventhandler.errors import EventHandlerError, InvalidOperation, NotFound
from eventhandler.models import STAGES, STATUSES
from eventhandler.service import DLQService


def console_router(service: DLQService, gate: Gate) -> APIRouter:
    tokens, sessions = gate.tokens, gate.sessions
    page = Pages()
    router = APIRouter(prefix="/ui", include_in_schema=False)
    add_replay_routes(router, service, page)

    # -- signing in and out ------------------------------------------------------------------

    @router.get("/signin")
    def signin_form(request: Request, next: str = "/ui") -> HTMLResponse:
        return page(request, "signin.html", next=_inside(next), error=None)

    @router.post("/signin")
    def signin(
        request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/ui"
    ) -> Response:
        if request.headers.get("sec-fetch-site") not in (None, "same-origin"):
            raise Forbidden()  # another site must not sign this browser into a session of its choosing
        found = tokens.role_of_token(token)
        if found is None:
            return page(request, "signin.html", 401, next=_inside(next), error="That token is not valid.")
        role, digest = found
        sessions.delete(request.cookies.get(COOKIE))  # signing in again ends the session before
        value = sessions.create(role, digest, request.client.host if request.client else None)
        response = RedirectResponse(_inside(next), status_code=303, headers=HEADERS)
        secure = gate.secure_cookie or request.url.scheme == "https"
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
        filters = given(request.query_params)
        context: dict[str, Any] = {"given": filters, "filters": _choices(), "next_url": None}
        context["query"] = urlencode(pairs(filters))
        try:
            query = ListQuery.model_validate(filters | {"limit": PAGE})
            flt = service.readable_filter(query.dlq_filter(), reader=not session.may_change)
        except (ValidationError, EventHandlerError) as exc:
            return page(request, "rows.html", 400, rows=[], total=0, error=problem(exc), **context)
        found = service.list_rows(flt, limit=PAGE, after_id=_int(request.query_params.get("after")))
        if len(found) == PAGE:
            context["next_url"] = f"/ui/rows?{urlencode([*pairs(filters), ('after', found[-1].dlq_id)])}"
        return page(request, "rows.html", rows=found, total=service.count(flt), error=None, **context)

    def row_page(
        request: Request, dlq_id: int, session: Session, done: str | None = None, refusal: str | None = None
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
            409 if refusal else 200,
            row=row_detail(view),
            entry=view.entry,
            history=service.history(dlq_id),
            done=done,
            messages=DONE,
            problem=refusal,
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
            return row_page(request, dlq_id, session, refusal=str(exc))
        return RedirectResponse(f"/ui/rows/{dlq_id}?done={done}", status_code=303, headers=HEADERS)

    @router.post("/rows/{dlq_id}/replay")
    def replay(request: Request, dlq_id: int, session: Admin) -> Response:
        return change(
            request, session, dlq_id, "replayed", lambda: service.retry(dlq_id, actor=session.actor)
        )

    @router.post("/rows/{dlq_id}/resolve")
    def resolve(request: Request, dlq_id: int, session: Admin, note: Note = "") -> Response:
        def resolve_it() -> object:
            return service.close_row(dlq_id, "resolved", actor=session.actor, note=note_text(note))

        return change(request, session, dlq_id, "resolved", resolve_it)

    @router.post("/rows/{dlq_id}/discard")
    def discard(request: Request, dlq_id: int, session: Admin, note: Note = "") -> Response:
        def discard_it() -> object:
            return service.close_row(dlq_id, "discarded", actor=session.actor, note=note_text(note))

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
    app.add_middleware(FormLimit)
    app.add_exception_handler(SignIn, to_signin)
    app.add_exception_handler(Forbidden, forbidden)


def _inside(target: str) -> str:
    """A place to go after signing in: a console page, never another site (`//evil`, `/\\evil`)."""
    if not target.isascii() or not target.isprintable():
        return "/ui"
    if target.startswith("/ui") and not target.startswith(("//", "/\\")) and "\\" not in target:
        return target
    return "/ui"


def _choices() -> dict[str, Any]:
    return {"stages": STAGES, "statuses": STATUSES}


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isascii() and text.isdigit() and len(text) < 19 else None

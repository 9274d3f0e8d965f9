"""The console's replay of many rows — an error group, or whatever the rows page filters: a preview
first (how many rows, the first of them), a simulation or a canary if the operator wants one, a
confirmation that names the count, then a page that follows the replay and the workers' outcomes."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.datastructures import QueryParams

from eventhandler.api.models import ListQuery
from eventhandler.canary import Canary, CanarySize, Outcomes, outcomes
from eventhandler.console.common import HEADERS, Admin, Pages, Reader, given, pairs, problem
from eventhandler.console.jobs import Job, JobBoard
from eventhandler.console.sessions import Session
from eventhandler.errors import EventHandlerError
from eventhandler.models import DLQFilter
from eventhandler.replay import ReplayReport
from eventhandler.service import DLQService

PREVIEW_ROWS = 10
MAX_ROWS = 10_000  # one replay from the console takes at most this many rows (the API's limit)
Query = Annotated[str, Form(max_length=4000)]  # the rows page's filters, carried by the form


def add_replay_routes(router: APIRouter, service: DLQService, page: Pages) -> None:
    board = JobBoard()

    def selection(session: Session, filters: dict[str, Any]) -> DLQFilter:
        """The rows a replay from these filters takes: pending ones, unless a status is named."""
        flt = ListQuery.model_validate(filters).dlq_filter()
        return service.readable_filter(flt, reader=not session.may_change)

    def preview(request: Request, session: Session, filters: dict[str, Any], **extra: Any) -> HTMLResponse:
        context: dict[str, Any] = {"query": urlencode(pairs(filters)), "given": filters, "max_rows": MAX_ROWS}
        context |= {"simulation": None, "simulate_problem": None, "confirm_problem": None} | extra
        try:
            plan = service.preview(selection(session, filters), limit=MAX_ROWS, rows=PREVIEW_ROWS)
        except (ValidationError, EventHandlerError) as exc:
            return page(request, "replay.html", 409, plan=None, problem=problem(exc), **context)
        return page(request, "replay.html", plan=plan, problem=None, **context)

    @router.get("/replay")
    def replay_preview(request: Request, session: Reader) -> HTMLResponse:
        return preview(request, session, given(request.query_params))

    @router.post("/replay/simulate")
    def replay_simulate(request: Request, session: Admin, query: Query = "") -> HTMLResponse:
        filters = given(QueryParams(query))
        try:
            simulation = service.simulate(selection(session, filters), actor=session.actor, limit=MAX_ROWS)
        except (ValidationError, EventHandlerError) as exc:
            return preview(request, session, filters, simulate_problem=problem(exc))
        return preview(request, session, filters, simulation=simulation)

    @router.post("/replay")
    def replay_start(
        request: Request,
        session: Admin,
        query: Query = "",
        confirm: Annotated[int, Form()] = -1,
        canary: Annotated[str, Form(max_length=4)] = "",
    ) -> Response:
        filters = given(QueryParams(query))
        try:
            flt = selection(session, filters)
            matched = service.preview(flt, limit=MAX_ROWS).matched
            checked = Canary(CanarySize.parse(canary)) if canary.strip() else None
        except (ValidationError, EventHandlerError) as exc:
            return preview(request, session, filters, confirm_problem=problem(exc))
        if confirm != matched:  # the rows changed since the operator read the count
            changed = f"{matched} rows match now, not the {confirm} confirmed: check, then confirm again"
            return preview(request, session, filters, confirm_problem=changed)

        def run(job: Job) -> ReplayReport:
            def published(count: int) -> None:
                job.published += count

            def watched(now: Outcomes) -> None:
                job.canary = now

            return service.replay(
                flt,
                actor=session.actor,
                limit=matched,  # never more than the operator confirmed
                progress=published,
                canary=checked,
                on_outcomes=watched,
            )

        job = board.start(session.actor, matched, run)
        return RedirectResponse(f"/ui/replay/jobs/{job.id}", status_code=303, headers=HEADERS)

    @router.get("/replay/jobs/{job_id}")
    def replay_job(request: Request, job_id: str, session: Reader, fragment: bool = False) -> HTMLResponse:
        job = board.get(job_id)
        if job is None:
            return page(
                request, "error.html", 404, message="No such replay here (it may run on another replica)."
            )
        now = outcomes(service.repository, job.published_ids, job.matched) if job.published_ids else None
        return page(request, "replay_progress.html" if fragment else "replay_job.html", job=job, outcomes=now)

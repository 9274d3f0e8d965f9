"""The admin API's endpoints: each parses its input (`api.models`), calls one `DLQService` operation
and shapes the answer; the rules are the service's. Plus the unauthenticated operations endpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eventhandler import repair
from eventhandler.api.auth import Admin, Reader
from eventhandler.api.models import (
    MAX_ID,
    CircuitCloseRequest,
    DLQPage,
    EditRequest,
    ErrorResponse,
    Health,
    ListQuery,
    ReplayResponse,
    ResolveRequest,
    ResolveResponse,
    RetryAllRequest,
    RetryRequest,
    SimulateRequest,
    SimulationResponse,
    StatsQuery,
    StatsResponse,
    Text,
    ValidationErrorResponse,
    encode_cursor,
)
from eventhandler.canary import Canary, CanarySize
from eventhandler.detail import row_detail
from eventhandler.errors import EventHandlerError
from eventhandler.logs import get_logger
from eventhandler.metrics import Metrics
from eventhandler.models import CircuitState, DLQDetail, DLQFilter
from eventhandler.service import DLQService

log = get_logger("eventhandler.api")

PREFIX = "/api/v1/events/dlq"


@dataclass
class ApiState:
    """What the routes find on the app."""

    service: DLQService
    metrics: Metrics
    probe_threads: anyio.CapacityLimiter | None = None  # made in the lifespan (it needs the event loop)


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.eventhandler
    return state


def _service(request: Request) -> DLQService:
    return _state(request).service


Service = Annotated[DLQService, Depends(_service)]
DlqIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="The DLQ row id.")]


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
    flt = service.readable_filter(request.dlq_filter(), reader=False)
    if request.dry_run:
        plan = service.preview(flt, limit=request.limit, to_topic=request.to_topic, force=request.force)
        return ReplayResponse.model_validate(plan.report().as_dict())
    canary = None
    if request.canary is not None:
        size = CanarySize.parse(request.canary)
        canary = Canary(size, request.canary_success, request.canary_timeout_seconds)
    report = service.replay(
        flt,
        actor=principal.actor,
        limit=request.limit,
        to_topic=request.to_topic,
        force=request.force,
        canary=canary,
    )
    return ReplayResponse.model_validate(report.as_dict())


@router.post(
    "/simulate",
    response_model=SimulationResponse,
    summary="Simulate a replay of every row matching the filters",
    responses=_errors(403, 404, 409),
)
def simulate(request: SimulateRequest, principal: Admin, service: Service) -> SimulationResponse:
    """Runs the current deserializer, handlers and projection writes on the matching rows in a
    PostgreSQL transaction that is rolled back, and says per row and per error group what a replay
    would do: apply, fail again (with the new error), or nothing (already applied). Nothing is
    published and nothing changes."""
    flt = service.readable_filter(request.dlq_filter(), reader=False)
    simulation = service.simulate(flt, actor=principal.actor, limit=request.limit, force=request.force)
    return SimulationResponse.model_validate(simulation.as_dict())


# Without these, `DELETE /stats` or `GET /retry-all` reach the `/{dlq_id}` routes and get a 422 for
# an id that is not a number; the right answer is 405 with the methods the path has.
@router.api_route("/stats", methods=["POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
def _stats_other_methods() -> Response:
    return _not_allowed("GET")


@router.api_route("/simulate", methods=["GET", "PUT", "DELETE", "PATCH"], include_in_schema=False)
def _simulate_other_methods() -> Response:
    return _not_allowed("POST")


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
    return service.detail(dlq_id, reader=not principal.may_change)


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
    a discarded row, or one a replay is publishing, cannot be resolved (409)."""
    changed = service.close_row(
        dlq_id, "resolved", actor=principal.actor, note=request.note if request else None
    )
    return ResolveResponse(dlq_id=dlq_id, status="resolved", changed=changed)


@router.put(
    "/{dlq_id}/payload",
    response_model=DLQDetail,
    summary="Repair one row's payload (kept beside the original)",
    operation_id="edit_row",
    responses=_errors(403, 404, 409),
)
def edit(dlq_id: DlqIdPath, request: EditRequest, principal: Admin, service: Service) -> DLQDetail:
    """Stores the repair beside the original bytes (never overwritten) once it reads with the current
    deserializer and keeps the event's id and source; a replay then publishes it with the original
    key and headers. Only a pending row can be repaired. Audited with the diff, as views show it."""
    view = service.edit(
        dlq_id,
        actor=principal.actor,
        payload=repair.encode(request.payload) if request.patch is None else None,
        patch=request.patch,
        note=request.note,
    )
    return row_detail(view)


circuits = APIRouter(
    prefix="/api/v1/events/circuits",
    tags=["circuits"],
    responses=router.responses,
)
FingerprintPath = Annotated[
    str, Path(pattern="^[0-9a-f]{16}$", description="The circuit's fingerprint, as listed.")
]


@circuits.get(
    "",
    response_model=list[CircuitState],
    summary="The flood guard's circuits",
    operation_id="list_circuits",
)
def list_circuits(
    principal: Reader,
    service: Service,
    consumer: Annotated[Text | None, Query(description="Consumer group.")] = None,
) -> list[CircuitState]:
    """Open circuits first (since when, what judged them), then the latest closed ones. While
    redacting, fingerprints are keyed and the error text is null."""
    return service.circuits(consumer)


@circuits.put(
    "/{fingerprint}/close",
    response_model=CircuitState,
    summary="Close a circuit: dead-letter its failure for a while",
    operation_id="close_circuit",
    responses=_errors(403)
    | {
        404: {"model": ErrorResponse, "description": "No circuit with it."},
        409: {
            "model": ErrorResponse,
            "description": "Circuits of several consumers have it: name the consumer.",
        },
    },
)
def close_circuit(
    fingerprint: FingerprintPath,
    principal: Admin,
    service: Service,
    request: Annotated[CircuitCloseRequest | None, Body()] = None,
) -> CircuitState:
    """The workers stop holding the line at their next trial and dead-letter the failure until
    `dead_letter_until`; then the guard judges it again. Audited."""
    options = request or CircuitCloseRequest()
    return service.close_circuit(
        fingerprint,
        consumer=options.consumer,
        seconds=options.for_seconds,
        actor=principal.actor,
        note=options.note,
    )


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
    try:  # on threads of its own, so that busy request threads cannot delay it
        await anyio.to_thread.run_sync(
            service.count, DLQFilter(ids=(0,)), limiter=_state(request).probe_threads
        )
    except EventHandlerError as exc:
        log.warning("api_not_ready", error_type=type(exc).__name__)
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ready"})


@operations.get("/metrics", include_in_schema=False)
def metrics_text(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""Property-based fuzzing of the admin API from its own OpenAPI document (schemathesis), with an admin
token, against a real PostgreSQL holding DLQ rows and a real broker: no input may produce a 5xx or a
response the document does not describe."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation, BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from eventhandler import canary
from eventhandler.api import create_app
from eventhandler.app import build_service
from eventhandler.config import Settings
from eventhandler.metrics import Metrics
from eventhandler.replay import Replayer
from tests.support import kafka as k
from tests.support.dlq import DLQ
from tests.support.factories import failed_message

ADMIN_TOKEN = "admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Target:
    schema: BaseSchema
    ids: list[int]
    reset: Callable[[], list[int]]  # the DLQ back to its seeded rows, with the same ids


@pytest.fixture
def target(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    # No worker runs here: a fuzzed canary would wait its whole timeout (up to 600 s) for outcomes.
    watch = canary.watch
    monkeypatch.setattr(canary, "watch", lambda *a, **kw: watch(*a, **kw | {"timeout": 0.1}))
    settings = make_settings(
        admin_token=ADMIN_TOKEN,
        admin_read_token="reader-token-0123456789abcdef",
        api_redact_fields=["data.password"],
    )
    metrics = Metrics()
    service, pool = build_service(settings, metrics=metrics)
    # A fuzzed `to_topic` may name a topic that does not exist: give up on it quickly.
    dlq = DLQ.on(pool)
    service.replayer = Replayer(dlq.replays, settings.producer_config(), delivery_timeout=2)
    group, topic = settings.consumer_group, settings.topics[0]
    rows: list[dict[str, Any]] = [
        {"value": k.structured(k.reading("fuzz-1")), "event_type": "device.reading"},
        {"value": b'{"data": {"password": "x", "list": [{"password": 1}]}}'},
        {"value": b"\xff\xfe not utf-8", "stage": "deserialize", "event_type": None, "event_id": None},
        {"value": None, "stage": "deserialize", "key": None, "headers": []},
        {"value": b'{"device_id": "d"}', "headers": [("ce_specversion", b"1.0"), ("bin", b"\x00\xff")]},
        {"stage": "projection", "event_type": "device.registered", "consumer": "another-group"},
        {"error_message": "device 'fuzz-2' is not registered", "topic": "some-other-topic"},
    ]

    def reset() -> list[int]:
        with pool.connection() as conn, conn.transaction():
            conn.execute("TRUNCATE dlq, dlq_audit RESTART IDENTITY")
            return dlq.writer.record_failures(
                conn, [failed_message(**({"consumer": group, "topic": topic} | row)) for row in rows]
            )

    app = create_app(service, settings, metrics)
    yield Target(schemathesis.openapi.from_asgi("/openapi.json", app), reset(), reset)
    pool.close()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def strategies(
    operation: APIOperation, mode: GenerationMode, ids: list[int]
) -> Iterator[SearchStrategy[Case]]:
    """The operation as the schema allows it, and (for /{dlq_id} paths) aimed at rows that exist."""
    yield operation.as_strategy(generation_mode=mode, headers=ADMIN)
    if mode is GenerationMode.POSITIVE and "dlq_id" in operation.path_parameters:
        yield st.sampled_from(ids).flatmap(
            lambda dlq_id: operation.as_strategy(
                generation_mode=mode, headers=ADMIN, path_parameters={"dlq_id": dlq_id}
            )
        )


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_breaks_the_api_or_its_schema(target: Target, mode: GenerationMode) -> None:
    # One Hypothesis run per operation, driven from here: schemathesis' lazy pytest loader
    # (`from_fixture`) does not work with pytest 9 yet, and the app needs this test's database.
    operations = [result.ok() for result in target.schema.get_all_operations()]
    assert len(operations) >= 9
    operations.sort(key=lambda operation: operation.method.upper() == "DELETE")  # rows stay for the rest
    for operation in operations:
        has_input = any(len(part) for part in (operation.path_parameters, operation.query, operation.body))
        if mode is GenerationMode.NEGATIVE and not has_input:
            continue  # /healthz, /readyz: nothing to get wrong
        for strategy in strategies(operation, mode, target.ids):

            @given(case=strategy)
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def exercise(case: Case) -> None:
                case.call_and_validate(headers=ADMIN, checks=CHECKS)

            try:
                exercise()
            except BaseException as exc:
                exc.add_note(f"operation: {operation.label} ({mode} data)")
                raise


def test_sequences_of_calls_that_follow_the_links_keep_the_api_and_its_schema_whole(target: Target) -> None:
    """Stateful: list → a row → retry / resolve / delete it → read it again, as the OpenAPI links say."""

    answered: set[tuple[str, int]] = set()

    class Workflow(target.schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            target.reset()  # each scenario starts from the same rows: Hypothesis replays scenarios

        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return {"headers": ADMIN}

        def validate_response(self, response: Any, case: Case, **kwargs: Any) -> None:
            answered.add((case.operation.label, response.status_code))
            case.validate_response(response, checks=CHECKS, headers=ADMIN)

    Workflow.run(
        settings=settings(
            # enough scenarios that some follow the links to rows that exist among the API's many
            # operations (40 of them missed every row once the API had simulate and payload edits)
            max_examples=120,
            stateful_step_count=6,
            derandomize=True,  # the same scenarios every run: the coverage assertion below cannot flake
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    # the links were followed to rows that exist, not only to 404s
    reached = {label for label, status in answered if status < 300}
    row_operations = {
        "GET /api/v1/events/dlq/{dlq_id}",
        "POST /api/v1/events/dlq/{dlq_id}/retry",
        "PUT /api/v1/events/dlq/{dlq_id}/resolve",
        "DELETE /api/v1/events/dlq/{dlq_id}",
    }
    assert reached & row_operations, answered

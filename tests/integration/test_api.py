"""The admin REST API against a real PostgreSQL and broker: every endpoint, the auth matrix, validation,
error bodies that leak nothing, the audit trail, and a retry the worker then resolves."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import psycopg_pool
import pytest
from fastapi import FastAPI

from eventhandler.api import create_app, serve
from eventhandler.api.models import encode_cursor
from eventhandler.app import build_service
from eventhandler.circuits import PostgresCircuitStore
from eventhandler.config import Settings
from eventhandler.errors import ConfigError, InvalidOperation
from eventhandler.flood import Circuit
from eventhandler.librdkafka import header_key
from eventhandler.logs import configure_logging
from eventhandler.metrics import Metrics
from eventhandler.models import DLQFilter, FailedMessage
from eventhandler.redaction import LISTED_SEARCH_BYTES
from eventhandler.service import DLQService
from tests.conftest import settings_env
from tests.support import kafka as k
from tests.support.dlq import DLQ as DLQStore
from tests.support.factories import failed_message
from tests.support.services import free_port
from tests.support.waiting import wait_for
from tests.support.worker import run_until_idle, scalar, threaded_worker

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its test client and warns on import when it finds only httpx.
    from starlette.exceptions import StarletteDeprecationWarning

    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

ADMIN_TOKEN = "admin-token-0123456789abcdef"
READ_TOKEN = "reader-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READER = {"Authorization": f"Bearer {READ_TOKEN}"}
DLQ = "/api/v1/events/dlq"
CIRCUITS = "/api/v1/events/circuits"


@dataclass
class Api:
    client: TestClient
    app: FastAPI
    service: DLQService
    pool: psycopg_pool.ConnectionPool
    settings: Settings
    metrics: Metrics

    def record(self, *failures: FailedMessage) -> list[int]:
        with self.pool.connection() as conn, conn.transaction():
            return DLQStore.on(self.pool).writer.record_failures(conn, list(failures))


@pytest.fixture
def make_api(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Api]]:
    """An app on its own service and pool, with the lifespan running; keyword arguments go to settings."""
    made: list[tuple[TestClient, psycopg_pool.ConnectionPool]] = []

    def make(redact_fields: tuple[str, ...] = ("data.password",), **overrides: Any) -> Api:
        values: dict[str, Any] = {
            "admin_token": ADMIN_TOKEN,
            "admin_read_token": READ_TOKEN,
            "api_redact_fields": list(redact_fields),
        }
        values.update(overrides)
        settings = make_settings(**values)
        metrics = Metrics()
        service, pool = build_service(settings, metrics=metrics)
        app = create_app(service, settings, metrics)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        made.append((client, pool))
        return Api(client, app, service, pool, settings, metrics)

    yield make
    for client, pool in made:
        client.__exit__(None, None, None)
        pool.close()


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()


def failure(api: Api, **overrides: Any) -> FailedMessage:
    values: dict[str, Any] = {"consumer": api.settings.consumer_group, "topic": api.settings.topics[0]}
    values.update(overrides)
    return failed_message(**values)


def open_circuit(api: Api, error: str = "device 'pump-7' is not registered") -> str:
    """A circuit as a worker opens it (the worker's own statement); returns the stored fingerprint."""
    sample = failure(api, stage="handler", error_type="HandlerFailure", error_message=error)
    circuit = Circuit(sample.fingerprint, sample, frozenset({"device.reading"}), 80, 100, 10)
    with api.pool.connection() as conn:
        assert PostgresCircuitStore().hold(conn, api.settings.consumer_group, circuit, "worker-1")
    return sample.fingerprint


def shown_fingerprint(api: Api, stored: str) -> str:
    return api.service.redactor.fingerprint(stored)


def status_of(db: psycopg.Connection[Any], dlq_id: int) -> str | None:
    return scalar(db, "SELECT status FROM dlq WHERE dlq_id = %s", dlq_id)  # type: ignore[no-any-return]


def audit(db: psycopg.Connection[Any]) -> list[tuple[str, str, list[int]]]:
    return db.execute("SELECT actor, action, dlq_ids FROM dlq_audit ORDER BY audit_id").fetchall()


# -- reading ---------------------------------------------------------------------------------------------


def test_list_pages_with_an_opaque_cursor_until_the_end(api: Api) -> None:
    ids = api.record(*(failure(api) for _ in range(7)))
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        response = api.client.get(DLQ, params=params, headers=READER)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total"] == 7
        seen += [item["dlq_id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert str(body["items"][-1]["dlq_id"]) not in cursor  # opaque, not the bare id
    assert seen == sorted(ids)
    assert pages == 3
    item = api.client.get(DLQ, params={"id": ids[0]}, headers=READER).json()["items"][0]
    assert item["status"] == "pending"
    assert item["stage"] == "handler"
    assert item["payload_size"] == len(b'{"specversion":"1.0"}')
    assert "event_payload" not in item


def test_a_full_page_at_the_end_has_no_next_cursor(api: Api) -> None:
    api.record(*(failure(api) for _ in range(4)))
    body = api.client.get(DLQ, params={"limit": 4}, headers=READER).json()
    assert len(body["items"]) == 4
    assert body["next_cursor"] is None


def test_list_filters_like_the_cli(api: Api, db: psycopg.Connection[Any]) -> None:
    reading, bad_json, projection, other_group, other_topic = api.record(
        failure(
            api,
            event_type="device.reading",
            error_message="device 'd1' is not registered",
            value=b'{"d": "pump-7"}',
        ),
        failure(api, stage="deserialize", event_type=None, error_message="message value is not valid JSON"),
        failure(api, stage="projection", event_type="device.registered", error_message="NUL in name"),
        failure(api, consumer="another-group"),
        failure(api, topic="other-topic"),
    )
    db.execute("UPDATE dlq SET status = 'discarded' WHERE dlq_id = %s", (projection,))
    db.execute("UPDATE dlq SET last_failed_at = now() - interval '3 days' WHERE dlq_id = %s", (bad_json,))

    def ids(token: dict[str, str] = READER, **params: Any) -> list[int]:
        response = api.client.get(DLQ, params=params, headers=token)
        assert response.status_code == 200, response.text
        return [item["dlq_id"] for item in response.json()["items"]]

    everything = [reading, bad_json, projection, other_group, other_topic]
    assert ids() == everything
    assert ids(consumer="another-group") == [other_group]
    assert ids(event_type="device.registered") == [projection]
    assert ids(stage="deserialize") == [bad_json]
    assert ids(status="discarded") == [projection]
    assert ids(status=["pending", "discarded"]) == everything
    assert ids(status="resolved") == []
    assert ids(ADMIN, error_contains="NOT VALID json") == [bad_json]
    assert ids(ADMIN, error_contains="100%") == []  # a LIKE wildcard is taken literally
    assert ids(ADMIN, payload_contains="pump-7") == [reading]
    refused = api.client.get(DLQ, params={"payload_contains": "device"}, headers=READER)
    assert refused.status_code == 403  # while redacting, a search would confirm masked values
    assert ids(topic="other-topic") == [other_topic]
    assert ids(id=[other_topic, reading]) == [reading, other_topic]
    assert ids(since="1d") == [reading, projection, other_group, other_topic]
    assert ids(until="2d") == [bad_json]
    assert ids(since="2000-01-01T00:00:00", until="2000-01-02T00:00:00Z") == []
    fingerprint = api.client.get(f"{DLQ}/{bad_json}", headers=READER).json()["fingerprint"]
    assert ids(fingerprint=fingerprint) == [bad_json]


def test_stats_by_consumer_stage_status(api: Api, db: psycopg.Connection[Any]) -> None:
    group = api.settings.consumer_group
    first, *_ = api.record(
        failure(api),
        failure(api),
        failure(api, stage="deserialize", event_type=None),
        failure(api, consumer="another-group"),
    )
    db.execute("UPDATE dlq SET status = 'resolved' WHERE dlq_id = %s", (first,))
    response = api.client.get(f"{DLQ}/stats", headers=READER)
    assert response.status_code == 200, response.text
    stats = response.json()
    assert stats["total"] == 4
    assert stats["by_status"] == {"pending": 3, "resolved": 1}
    assert {"consumer": group, "status": "pending", "count": 2} in stats["by_consumer"]
    assert {"consumer": "another-group", "status": "pending", "count": 1} in stats["by_consumer"]
    assert {"stage": "deserialize", "status": "pending", "count": 1} in stats["by_stage"]
    assert set(stats["oldest_pending_age_seconds"]) == {group, "another-group"}
    assert stats["top_groups"][0]["count"] == 3
    narrowed = api.client.get(f"{DLQ}/stats", params={"consumer": "another-group"}, headers=READER).json()
    assert narrowed["total"] == 1


def test_detail_shows_the_message_with_redacted_fields(api: Api) -> None:
    payload = k.structured(k.cloud_event("user.created", {"name": "ann", "password": "hunter2"}))
    (dlq_id,) = api.record(
        failure(
            api,
            value=payload,
            key=b"user-1",
            headers=[("trace", b"abc"), ("raw", b"\xff\x00"), ("empty", None), (header_key(b"\xfe!"), b"k")],
            traceback="Traceback: connecting to postgresql://app:pa55word@db/app failed",
        )
    )
    response = api.client.get(f"{DLQ}/{dlq_id}", headers=READER)
    assert response.status_code == 200, response.text
    row = response.json()
    assert row["payload_encoding"] == "json"
    assert row["payload_redacted"] is True
    assert row["payload"]["data"] == {"name": "ann", "password": "***"}
    assert "hunter2" not in response.text
    assert row["key"] == "user-1"
    assert row["key_encoding"] == "text"
    assert row["headers"] == [
        {"key": "trace", "key_encoding": "text", "value": "abc", "encoding": "text"},
        {
            "key": "raw",
            "key_encoding": "text",
            "value": base64.b64encode(b"\xff\x00").decode(),
            "encoding": "base64",
        },
        {"key": "empty", "key_encoding": "text", "value": None, "encoding": None},
        {
            "key": base64.b64encode(b"\xfe!").decode(),
            "key_encoding": "base64",
            "value": "k",
            "encoding": "text",
        },
    ]
    assert row["error_traceback"] is None  # source paths and line numbers are for the admin token
    assert row["worker_version"] == "test"
    shown_to_admin = api.client.get(f"{DLQ}/{dlq_id}", headers=ADMIN).json()["error_traceback"]
    assert shown_to_admin.startswith("Traceback: connecting to postgresql://app:")
    assert "pa55word" not in shown_to_admin


def test_a_hostile_megabyte_of_error_text_is_listed_and_shown_without_stalling(api: Api) -> None:
    """Text shaped to make a backtracking redaction regex rescan it from every position (it took
    minutes on a megabyte): the list and the detail view answer at once, with the secret masked."""
    hostile = "a" * 1_000_000 + "://x@ then postgresql://app:pa55word@db/app"
    (dlq_id,) = api.record(failure(api, error_message=hostile, traceback="b" * 1_000_000 + "://y@"))
    started = time.perf_counter()
    listed = api.client.get(DLQ, params={"limit": 10}, headers=READER)
    detail = api.client.get(f"{DLQ}/{dlq_id}", headers=READER)
    assert time.perf_counter() - started < 10  # the quadratic redaction needed minutes here
    assert listed.status_code == detail.status_code == 200
    assert "pa55word" not in listed.text
    assert "pa55word" not in detail.text
    assert detail.json()["error_message"].endswith("postgresql://app:**********@db/app")


def test_a_list_while_redacting_searches_no_large_payload(api: Api, db: psycopg.Connection[Any]) -> None:
    """A page of rows with megabyte payloads (or repairs) took minutes to search for the values they
    mask: a listed row whose payload or repair is over `LISTED_SEARCH_BYTES` shows no error text (its
    own page does)."""
    ids = [
        api.record(
            failure(
                api,
                value=k.structured(k.cloud_event("user.created", {"password": "hunter2", "pad": pad})),
                error_message="refused hunter2 for ann",
            )
        )[0]
        for pad in ("", "x" * LISTED_SEARCH_BYTES, "")
    ]
    repair = k.structured(
        k.cloud_event("user.created", {"password": "hunter2", "pad": "y" * LISTED_SEARCH_BYTES})
    )
    db.execute("UPDATE dlq SET edited_payload = %s WHERE dlq_id = %s", (repair, ids[2]))
    listed = api.client.get(DLQ, headers=READER).json()["items"]
    assert [row["error_message"] for row in listed] == ["refused *** for ann", "***", "***"]
    for dlq_id in ids[1:]:
        assert (
            api.client.get(f"{DLQ}/{dlq_id}", headers=READER).json()["error_message"] == "refused *** for ann"
        )


def test_redaction_applies_to_the_binary_binding_and_withholds_what_is_not_json(api: Api) -> None:
    binary, not_json, tombstone = api.record(
        failure(
            api,
            value=json.dumps({"device_id": "d", "password": "swordfish"}).encode(),
            headers=[("ce_specversion", b"1.0"), ("ce_type", b"user.created")],
        ),
        failure(api, value=b"\xff\xfe password=swordfish"),
        failure(api, value=None),
    )
    row = api.client.get(f"{DLQ}/{binary}", headers=READER).json()
    assert row["payload"] == {"device_id": "d", "password": "***"}
    row = api.client.get(f"{DLQ}/{not_json}", headers=READER).json()
    assert (row["payload"], row["payload_encoding"]) == (None, "withheld")
    row = api.client.get(f"{DLQ}/{tombstone}", headers=READER).json()
    assert (row["payload"], row["payload_encoding"]) == (None, None)


def test_without_redaction_bytes_that_are_not_json_come_back_as_base64(make_api: Callable[..., Api]) -> None:
    api = make_api(redact_fields=())
    raw = b"\xff\xfe\x00 not json"
    odd = [b'{"a": NaN}', b'{"a": 1e400}', b"[" * 100 + b"]" * 100, b'"\\ud800"']
    ids = api.record(failure(api, value=raw), *(failure(api, value=value) for value in odd))
    for dlq_id, value in zip(ids, [raw, *odd], strict=True):
        response = api.client.get(f"{DLQ}/{dlq_id}", headers=READER)
        assert response.status_code == 200, (value, response.text)
        row = response.json()
        assert row["payload_encoding"] == "base64", value
        assert base64.b64decode(row["payload"]) == value


def test_unknown_ids_are_404(api: Api) -> None:
    for method, path in [
        ("GET", f"{DLQ}/424242"),
        ("POST", f"{DLQ}/424242/retry"),
        ("DELETE", f"{DLQ}/424242"),
        ("PUT", f"{DLQ}/424242/resolve"),
    ]:
        response = api.client.request(method, path, headers=ADMIN)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json() == {"detail": "no DLQ row with id 424242"}
    response = api.client.post(f"{DLQ}/retry-all", json={"ids": [424242], "limit": 1}, headers=ADMIN)
    assert response.status_code == 404


# -- changing --------------------------------------------------------------------------------------------------


def test_retry_really_republishes_and_the_worker_then_resolves_the_row(
    make_api: Callable[..., Api], kafka_bootstrap: str, topic: str, db: psycopg.Connection[Any]
) -> None:
    api = make_api()
    producer = k.TestProducer(kafka_bootstrap)
    producer.send(topic, k.structured(k.reading("api-dev", value=7.0)), key="api-dev")
    producer.flush()
    run_until_idle(api.settings, idle=2)
    dlq_id = scalar(db, "SELECT dlq_id FROM dlq WHERE stage = 'handler'")
    assert dlq_id is not None
    assert status_of(db, dlq_id) == "pending"

    producer.send(topic, k.structured(k.registered("api-dev")), key="api-dev")
    producer.flush()
    run_until_idle(api.settings, idle=2)
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'api-dev'") == 0

    response = api.client.post(f"{DLQ}/{dlq_id}/retry", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() | {"failures": {}} == {
        "matched": 1,
        "published": 1,
        "failed": 0,
        "dry_run": False,
        "published_ids": [dlq_id],
        "failures": {},
        "canary": None,
        "stopped": False,
        "outcomes": None,
    }
    assert api.client.get(f"{DLQ}/{dlq_id}", headers=READER).json()["status"] == "replayed"

    run_until_idle(api.settings, idle=2)
    row = api.client.get(f"{DLQ}/{dlq_id}", headers=READER).json()
    assert row["status"] == "resolved"
    assert row["replay_count"] == 1
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'api-dev'") == 1
    assert ("api:admin", "replay", [dlq_id]) in audit(db)


def test_retry_all_with_a_canary_waits_for_the_workers_outcomes_and_stops_on_failure(
    api: Api, kafka_bootstrap: str, topic: str, db: psycopg.Connection[Any]
) -> None:
    producer = k.TestProducer(kafka_bootstrap)
    producer.send_events(topic, [k.reading("api-canary", value=i) for i in range(4)])
    producer.flush()
    run_until_idle(api.settings, idle=2)
    body = {"event_type": "device.reading", "limit": 100, "canary": "50%", "canary_timeout_seconds": 60}
    with threaded_worker(api.settings):
        stopped = api.client.post(f"{DLQ}/retry-all", json=body, headers=ADMIN)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["stopped"] is True
        assert stopped.json()["canary"]["outcomes"]["failed"] == 2
        assert stopped.json()["published"] == 2
        producer.send_events(topic, [k.registered("api-canary")])
        producer.flush()
        wait_for(lambda: scalar(db, "SELECT count(*) FROM devices WHERE device_id = 'api-canary'") == 1)
        passed = api.client.post(f"{DLQ}/retry-all", json=body, headers=ADMIN)
    assert passed.status_code == 200, passed.text
    assert passed.json()["canary"]["passed"] is True
    assert passed.json()["published"] == 4
    assert [a for _, a, _ in audit(db)].count("canary") == 2
    for wrong in (
        {"canary": "150%"},
        {"canary": 0},
        {"canary": "5.5%"},
        {"canary_success": "0.5"},
        {"canary_success": True},
        {"dry_run": True},
        {"to_topic": "elsewhere"},
    ):
        bad = api.client.post(f"{DLQ}/retry-all", json=body | wrong, headers=ADMIN)
        assert bad.status_code == 422, (wrong, bad.text)


def test_retry_of_a_resolved_or_discarded_row_needs_force(api: Api, db: psycopg.Connection[Any]) -> None:
    resolved, discarded, replayed = api.record(failure(api), failure(api), failure(api))
    db.execute("UPDATE dlq SET status = 'resolved' WHERE dlq_id = %s", (resolved,))
    db.execute("UPDATE dlq SET status = 'discarded' WHERE dlq_id = %s", (discarded,))
    db.execute("UPDATE dlq SET status = 'replayed' WHERE dlq_id = %s", (replayed,))
    for dlq_id, status in [(resolved, "resolved"), (discarded, "discarded")]:
        response = api.client.post(f"{DLQ}/{dlq_id}/retry", headers=ADMIN)
        assert response.status_code == 409
        assert status in response.json()["detail"]
        assert status_of(db, dlq_id) == status
    response = api.client.post(f"{DLQ}/{discarded}/retry", json={"force": True}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["published"] == 1
    assert status_of(db, discarded) == "replayed"
    # a row already replayed (outcome unknown) may be replayed again without force
    response = api.client.post(f"{DLQ}/{replayed}/retry", json={}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert scalar(db, "SELECT replay_count FROM dlq WHERE dlq_id = %s", replayed) == 1


def test_simulate_predicts_per_row_and_group_through_redaction_and_changes_nothing(
    api: Api, db: psycopg.Connection[Any]
) -> None:
    """The rows fail again (no device registered): the answer names the new error's group as views
    show it (keyed while redacting) with the masked value masked, and the row is as it was."""
    event = k.cloud_event(
        "device.reading", {"device_id": "pump-7", "metric": "t", "value": 1, "password": "hunter22"}
    )
    event["data"]["device_id"] = "hunter22"  # the error quotes it: masked there too
    (dlq_id,) = api.record(failure(api, value=k.structured(event), headers=[]))
    before = db.execute("SELECT dlq::text FROM dlq").fetchall()

    response = api.client.post(f"{DLQ}/simulate", json={"ids": [dlq_id], "limit": 10}, headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["outcomes"] == {"apply": 0, "fail": 1, "duplicate": 0, "skip": 0}
    (row,) = body["rows"]
    assert row["outcome"] == "fail"
    assert row["error_type"] == "HandlerFailure"
    assert "hunter22" not in response.text
    assert row["error_message"] == "device '***' is not registered"
    stored = failure(api, stage="handler", error_type="HandlerFailure", error_message=row["error_message"])
    assert row["new_fingerprint"] != stored.fingerprint  # keyed, not the stored hash of the text
    assert row["fingerprint"] == shown_fingerprint(api, scalar(db, "SELECT fingerprint FROM dlq"))
    assert body["groups"][0]["outcomes"]["fail"] == 1
    assert body["code"]["handlers"] == []
    assert db.execute("SELECT dlq::text FROM dlq").fetchall() == before
    assert audit(db) == []

    assert api.client.get(f"{DLQ}/simulate", headers=ADMIN).status_code == 405
    refused = api.client.post(f"{DLQ}/simulate", json={"limit": 10}, headers=ADMIN)
    assert refused.status_code == 422
    parked = api.client.post(
        f"{DLQ}/simulate", json={"all": True, "limit": 10, "statuses": ["parked"]}, headers=ADMIN
    )
    assert parked.status_code == 409, parked.text


def test_a_repair_is_admin_only_and_redacted_in_every_view_and_the_audit(
    api: Api, db: psycopg.Connection[Any]
) -> None:
    event = k.cloud_event(
        "device.reading",
        {"device_id": "d-1", "metric": "t", "value": 1, "password": "hunter22"},
        event_id="e-1",
    )
    (dlq_id,) = api.record(failure(api, value=k.structured(event), headers=[], event_id="e-1"))
    change = {"patch": [{"op": "replace", "path": "/data/password", "value": "s3cret99"}], "note": "rotated"}

    assert api.client.put(f"{DLQ}/{dlq_id}/payload", json=change, headers=READER).status_code == 403
    response = api.client.put(f"{DLQ}/{dlq_id}/payload", json=change, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["edit_diff"] == [{"op": "replace", "path": "/data/password", "value": "***"}]
    assert response.json()["edited_payload"]["data"]["password"] == "***"
    read = api.client.get(f"{DLQ}/{dlq_id}", headers=READER)
    assert read.json()["edit_diff"] == response.json()["edit_diff"]
    for text in (response.text, read.text, str(db.execute("SELECT detail::text FROM dlq_audit").fetchall())):
        assert "s3cret99" not in text
        assert "hunter22" not in text
    stored = scalar(db, "SELECT edited_payload FROM dlq WHERE dlq_id = %s", dlq_id)
    assert json.loads(bytes(stored))["data"]["password"] == "s3cret99"  # the repair itself is whole

    for bad in (
        {"payload": {"not": "an event"}},
        {"patch": [{"op": "replace", "path": "/nowhere/deep", "value": 1}]},
        {"patch": [{"op": "replace", "path": "/source", "value": "/elsewhere"}]},
        {"patch": [{"op": "add", "path": "/data/nope/deep", "value": 1}]},
        {"patch": [{"op": "test", "path": "/data/password", "value": "hunter22"}]},  # an oracle
        {"payload": event | {"note": "\ud800"}},
        {"patch": [{"op": "add", "path": "/data/x", "value": float("nan")}]},
    ):
        body = json.dumps(bad).encode()  # ASCII, with \ud800 and NaN as Python's JSON writes them
        headers = ADMIN | {"Content-Type": "application/json"}
        refused = api.client.put(f"{DLQ}/{dlq_id}/payload", content=body, headers=headers)
        assert refused.status_code == 409, (bad, refused.text)
        assert "hunter22" not in refused.text
    both = api.client.put(f"{DLQ}/{dlq_id}/payload", json={"payload": {}, "patch": []}, headers=ADMIN)
    assert both.status_code == 422
    assert [a for _, a, _ in audit(db)] == ["edit"]


def test_a_row_a_replay_has_taken_is_not_repaired_until_the_replay_lets_go(
    api: Api, db: psycopg.Connection[Any]
) -> None:
    """Else the replay would publish the bytes it read before the repair, and the repair never."""
    event = k.cloud_event("device.reading", READING, event_id="e-2")
    (dlq_id,) = api.record(failure(api, value=k.structured(event), headers=[], event_id="e-2"))
    change = {"patch": [{"op": "replace", "path": "/data/value", "value": 2}]}
    replays = DLQStore.on(api.pool).replays
    with replays.lease() as lease:
        taken, claim = replays.take(DLQFilter(ids=(dlq_id,)), limit=1, lease=lease, lease_seconds=60)
        assert [row.dlq_id for row in taken] == [dlq_id]
        assert claim is not None
        refused = api.client.put(f"{DLQ}/{dlq_id}/payload", json=change, headers=ADMIN)
        assert refused.status_code == 409, refused.text
        assert "being replayed" in refused.json()["detail"]
        replays.finish(lease=lease, claim=claim, published={}, actor="t", detail={})
    assert scalar(db, "SELECT edited_payload FROM dlq") is None
    assert api.client.put(f"{DLQ}/{dlq_id}/payload", json=change, headers=ADMIN).status_code == 200


def test_a_row_a_replay_has_taken_is_not_resolved_or_discarded_until_the_replay_marks_it(
    api: Api, db: psycopg.Connection[Any]
) -> None:
    """The replay's mark keeps a status given meanwhile: a row discarded while its copy was on the way
    said discarded for good while the worker applied the copy."""
    ids = api.record(failure(api), failure(api))
    replays = DLQStore.on(api.pool).replays
    with replays.lease() as lease:
        taken, claim = replays.take(DLQFilter(ids=tuple(ids)), limit=2, lease=lease, lease_seconds=60)
        assert claim is not None
        assert [row.dlq_id for row in taken] == ids
        refused = api.client.put(f"{DLQ}/{ids[0]}/resolve", json={"note": "fixed"}, headers=ADMIN)
        assert refused.status_code == 409, refused.text
        assert "being replayed" in refused.json()["detail"]
        with pytest.raises(InvalidOperation, match="being replayed"):
            api.service.close_row(ids[1], "discarded", actor="ops", note="bogus")
        assert api.service.discard(ids, actor="ops") == []
        replays.finish(
            lease=lease, claim=claim, published={api.settings.topics[0]: ids}, actor="t", detail={}
        )
    assert [status_of(db, i) for i in ids] == ["replayed", "replayed"]
    assert [a for _, a, _ in audit(db)] == ["replay"]
    assert api.client.put(f"{DLQ}/{ids[0]}/resolve", headers=ADMIN).json()["changed"] is True
    assert api.service.close_row(ids[1], "discarded", actor="ops") is True
    assert [status_of(db, i) for i in ids] == ["resolved", "discarded"]
    assert api.service.discard(ids, actor="ops") == []


def test_retry_to_another_topic(api: Api, kafka_bootstrap: str, db: psycopg.Connection[Any]) -> None:
    other = f"{api.settings.topics[0]}-retry"
    k.create_topic(kafka_bootstrap, other, partitions=1)
    (dlq_id,) = api.record(failure(api))
    response = api.client.post(f"{DLQ}/{dlq_id}/retry", json={"to_topic": other}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert scalar(db, "SELECT replayed_to_topic FROM dlq WHERE dlq_id = %s", dlq_id) == other


def test_retry_all_needs_a_filter_or_all_and_a_limit(api: Api, db: psycopg.Connection[Any]) -> None:
    readings = api.record(*(failure(api, event_type="device.reading") for _ in range(3)))
    (other,) = api.record(failure(api, event_type="device.registered"))

    refused = api.client.post(f"{DLQ}/retry-all", json={"limit": 100}, headers=ADMIN)
    assert refused.status_code == 422
    assert "all" in refused.json()["message"]
    only_status = api.client.post(
        f"{DLQ}/retry-all", json={"limit": 100, "statuses": ["pending"]}, headers=ADMIN
    )
    assert only_status.status_code == 422
    no_limit = api.client.post(f"{DLQ}/retry-all", json={"all": True}, headers=ADMIN)
    assert no_limit.status_code == 422
    assert "limit" in no_limit.json()["message"]
    assert all(status_of(db, i) == "pending" for i in [*readings, other])

    dry = api.client.post(
        f"{DLQ}/retry-all",
        json={"event_type": "device.reading", "limit": 100, "dry_run": True},
        headers=ADMIN,
    )
    assert dry.status_code == 200, dry.text
    assert dry.json() | {"published_ids": []} == {
        "matched": 3,
        "published": 0,
        "failed": 0,
        "dry_run": True,
        "published_ids": [],
        "failures": {},
        "canary": None,
        "stopped": False,
        "outcomes": None,
    }
    assert all(status_of(db, i) == "pending" for i in readings)

    limited = api.client.post(
        f"{DLQ}/retry-all", json={"event_type": "device.reading", "limit": 2}, headers=ADMIN
    )
    assert limited.status_code == 200, limited.text
    assert limited.json()["matched"] == 2
    assert limited.json()["published_ids"] == readings[:2]
    assert [status_of(db, i) for i in readings] == ["replayed", "replayed", "pending"]

    everything = api.client.post(f"{DLQ}/retry-all", json={"all": True, "limit": 100}, headers=ADMIN)
    assert everything.status_code == 200, everything.text
    assert everything.json()["published_ids"] == [readings[2], other]  # only pending rows by default
    again = api.client.post(
        f"{DLQ}/retry-all", json={"all": True, "limit": 100, "statuses": ["replayed"]}, headers=ADMIN
    )
    assert again.json()["published"] == 4
    assert {(actor, action) for actor, action, _ in audit(db)} == {("api:admin", "replay")}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("retry-all", {"event_type": "device.reading", "limit": 10, "dry_run": "false"}),
        ("retry-all", {"event_type": "device.reading", "limit": 10, "dry_run": 0}),
        ("retry-all", {"all": "yes", "limit": 10}),
        ("retry-all", {"all": 1, "limit": 10}),
        ("retry-all", {"event_type": "device.reading", "limit": True}),
        ("retry-all", {"event_type": "device.reading", "limit": "10"}),
        ("retry-all", {"ids": ["{id}"], "limit": 10}),  # the id as a string
        ("retry-all", {"ids": [True], "limit": 10}),
        ("retry-all", {"event_type": "device.reading", "limit": 10, "force": "true"}),
        ("{id}/retry", {"force": 1}),
        ("{id}/retry", {"force": "true"}),
    ],
)
def test_safety_flags_are_booleans_and_counts_are_numbers(
    api: Api, db: psycopg.Connection[Any], path: str, body: dict[str, Any]
) -> None:
    """`"dry_run": "false"` started a real replay."""
    (dlq_id,) = api.record(failure(api, event_type="device.reading"))
    filled = json.loads(json.dumps(body).replace("{id}", str(dlq_id)))  # a string id stays a string
    response = api.client.post(f"{DLQ}/{path.replace('{id}', str(dlq_id))}", json=filled, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert scalar(db, "SELECT replay_count FROM dlq WHERE dlq_id = %s", dlq_id) == 0
    assert audit(db) == []


def test_one_replay_rule_on_every_route(api: Api, db: psycopg.Connection[Any]) -> None:
    """retry-all replayed a resolved row without force, which the single retry refused; both accepted
    Kafka's internal topics as a target."""
    resolved, discarded = api.record(failure(api), failure(api))
    db.execute("UPDATE dlq SET status = 'resolved' WHERE dlq_id = %s", (resolved,))
    db.execute("UPDATE dlq SET status = 'discarded' WHERE dlq_id = %s", (discarded,))
    for status, dlq_id in (("resolved", resolved), ("discarded", discarded)):
        body = {"ids": [dlq_id], "statuses": [status], "limit": 1}
        refused = api.client.post(f"{DLQ}/retry-all", json=body, headers=ADMIN)
        assert refused.status_code == 409, refused.text
        assert "needs force" in refused.json()["detail"]
        assert (
            api.client.post(f"{DLQ}/retry-all", json=body | {"dry_run": True}, headers=ADMIN).status_code
            == 409
        )
        assert status_of(db, dlq_id) == status
    forced = api.client.post(
        f"{DLQ}/retry-all",
        json={"ids": [resolved], "statuses": ["resolved"], "limit": 1, "force": True},
        headers=ADMIN,
    )
    assert forced.status_code == 200, forced.text
    assert forced.json()["published_ids"] == [resolved]

    for internal in ("__consumer_offsets", "__transaction_state", "__anything"):
        for path, body in (
            (f"{DLQ}/{discarded}/retry", {"force": True, "to_topic": internal}),
            (f"{DLQ}/retry-all", {"all": True, "limit": 1, "to_topic": internal}),
        ):
            response = api.client.post(path, json=body, headers=ADMIN)
            assert response.status_code == 422, response.text
            assert "internal topics" in response.json()["message"]
    assert status_of(db, discarded) == "discarded"


def test_resolve_with_a_note_is_idempotent_and_refuses_discarded_rows(
    api: Api, db: psycopg.Connection[Any]
) -> None:
    row, discarded = api.record(failure(api), failure(api))
    db.execute("UPDATE dlq SET status = 'discarded' WHERE dlq_id = %s", (discarded,))
    response = api.client.put(f"{DLQ}/{row}/resolve", json={"note": "fixed upstream"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {"dlq_id": row, "status": "resolved", "changed": True}
    detail = api.client.get(f"{DLQ}/{row}", headers=READER).json()
    assert (detail["resolved_by"], detail["resolution_note"]) == ("api:admin", "fixed upstream")
    again = api.client.put(f"{DLQ}/{row}/resolve", headers=ADMIN)
    assert again.json() == {"dlq_id": row, "status": "resolved", "changed": False}
    refused = api.client.put(f"{DLQ}/{discarded}/resolve", headers=ADMIN)
    assert refused.status_code == 409
    assert "discarded" in refused.json()["detail"]
    assert ("api:admin", "resolve", [row]) in audit(db)


def test_delete_removes_the_row_and_is_audited(api: Api, db: psycopg.Connection[Any]) -> None:
    keep, gone = api.record(failure(api), failure(api))
    response = api.client.delete(f"{DLQ}/{gone}", headers=ADMIN)
    assert response.status_code == 204
    assert response.content == b""
    assert api.client.get(f"{DLQ}/{gone}", headers=READER).status_code == 404
    assert status_of(db, keep) == "pending"
    assert audit(db) == [("api:admin", "delete", [gone])]


def test_the_audit_alone_says_who_did_what_to_which_rows_when_and_from_where(
    api: Api, db: psycopg.Connection[Any]
) -> None:
    """A delete was audited with detail {}, rows carried the role only, a resolve that changed nothing
    wrote a row with no ids, and a replayed resolved row kept `resolved_by`."""
    doomed, resolved = api.record(failure(api, value=b"the doomed bytes", key=b"k-1"), failure(api))
    request = {"X-Request-ID": "ticket-4711"}
    assert api.client.delete(f"{DLQ}/{doomed}", headers=ADMIN | request).status_code == 204
    (actor, action, ids, detail, request_id, client) = db.execute(
        "SELECT actor, action, dlq_ids, detail, request_id, client FROM dlq_audit"
    ).fetchone()
    assert (actor, action, ids, request_id, client) == (
        "api:admin",
        "delete",
        [doomed],
        "ticket-4711",
        "testclient",
    )
    (row,) = detail["rows"]
    assert detail["count"] == 1
    assert row["dlq_id"] == doomed
    assert (row["consumer"], row["topic"], row["status"]) == (
        api.settings.consumer_group,
        api.settings.topics[0],
        "pending",
    )
    assert isinstance(row["partition"], int)
    assert isinstance(row["offset"], int)
    assert row["payload_sha256"] == hashlib.sha256(b"the doomed bytes").hexdigest()
    assert row["key_sha256"] == hashlib.sha256(b"k-1").hexdigest()

    assert (
        api.client.put(f"{DLQ}/{resolved}/resolve", json={"note": "fixed"}, headers=ADMIN).status_code == 200
    )
    again = api.client.put(f"{DLQ}/{resolved}/resolve", json={"note": "again"}, headers=ADMIN)
    assert again.json()["changed"] is False
    assert [a for _, a, _ in audit(db)] == ["delete", "resolve"]  # the no-op wrote nothing

    forced = api.client.post(f"{DLQ}/{resolved}/retry", json={"force": True}, headers=ADMIN)
    assert forced.status_code == 200, forced.text
    assert db.execute(
        "SELECT status, resolved_by, resolved_at, resolution_note FROM dlq WHERE dlq_id = %s", (resolved,)
    ).fetchone() == ("replayed", None, None, None)
    assert [a for _, a, _ in audit(db)] == ["delete", "resolve", "replay"]


# -- authorization ------------------------------------------------------------------------------------------

READING = {"device_id": "d-1", "metric": "t", "value": 1}
# (name, method, path, JSON body, admin only); every admin route but simulate changes something
ROUTES: list[tuple[str, str, str, dict[str, Any] | None, bool]] = [
    ("list", "GET", DLQ, None, False),
    ("stats", "GET", f"{DLQ}/stats", None, False),
    ("get", "GET", f"{DLQ}/{{id}}", None, False),
    ("retry", "POST", f"{DLQ}/{{id}}/retry", None, True),
    ("retry_all", "POST", f"{DLQ}/retry-all", {"all": True, "limit": 10}, True),
    ("simulate", "POST", f"{DLQ}/simulate", {"all": True, "limit": 10}, True),
    ("delete", "DELETE", f"{DLQ}/{{id}}", None, True),
    (
        "edit",
        "PUT",
        f"{DLQ}/{{id}}/payload",
        {"payload": k.cloud_event("device.reading", READING, event_id="evt-1")},
        True,
    ),
    ("resolve", "PUT", f"{DLQ}/{{id}}/resolve", {"note": "done"}, True),
    ("circuits", "GET", CIRCUITS, None, False),
    ("close_circuit", "PUT", f"{CIRCUITS}/{{fingerprint}}/close", {"for_seconds": 600}, True),
]
ROUTE_IDS = [route[0] for route in ROUTES]
BAD_CREDENTIALS: dict[str, dict[str, str | bytes]] = {
    "no header": {},
    "wrong token": {"Authorization": "Bearer " + "x" * len(ADMIN_TOKEN)},
    "token prefix": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
    "token and more": {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    "empty bearer": {"Authorization": "Bearer "},
    "basic scheme": {"Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_TOKEN}".encode()).decode()},
    "bare token": {"Authorization": ADMIN_TOKEN},
    "non-ascii": {"Authorization": "Bearer tökén-0123456789abcdef".encode()},
}


def test_the_matrix_covers_every_api_route(api: Api) -> None:
    served = {
        (method.upper(), path)
        for path, operations in api.app.openapi()["paths"].items()
        if path.startswith("/api/")
        for method in operations
    }
    listed = {(method, path.replace("{id}", "{dlq_id}")) for _, method, path, _, _ in ROUTES}
    assert served == listed


@pytest.mark.parametrize(("name", "method", "path", "body", "change"), ROUTES, ids=ROUTE_IDS)
def test_auth_matrix(
    api: Api, db: psycopg.Connection[Any], name: str, method: str, path: str, body: Any, change: bool
) -> None:
    (dlq_id,) = api.record(failure(api))
    url = path.format(id=dlq_id, fingerprint=shown_fingerprint(api, open_circuit(api)))
    for label, headers in BAD_CREDENTIALS.items():
        response = api.client.request(method, url, json=body, headers=headers)
        assert response.status_code == 401, (label, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json() == {"detail": "a valid bearer token is required"}

    response = api.client.request(method, url, json=body, headers=READER)
    if change:
        assert response.status_code == 403, response.text
        assert "read" in response.json()["detail"]
    else:
        assert response.status_code == 200, response.text
    assert status_of(db, dlq_id) == "pending"
    assert audit(db) == []

    response = api.client.request(method, url, json=body, headers=ADMIN)
    assert response.status_code == (204 if name == "delete" else 200), response.text
    if change and name != "simulate":
        assert audit(db)[0][0] == "api:admin"


def test_unauthenticated_requests_are_refused_before_their_input_is_read(api: Api) -> None:
    for method, path, content in [
        ("POST", f"{DLQ}/retry-all", b"{not json"),
        ("GET", f"{DLQ}/not-an-id", None),
        ("GET", "/api/v1/unknown", None),
    ]:
        response = api.client.request(
            method, path, content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 401, (path, response.text)
    response = api.client.post(f"{DLQ}/retry-all", content=b"{not json", headers=READER)
    assert response.status_code == 403


@pytest.mark.parametrize(("name", "method", "path", "body", "change"), ROUTES, ids=ROUTE_IDS)
def test_without_configured_tokens_nothing_is_reachable(
    make_api: Callable[..., Api], name: str, method: str, path: str, body: Any, change: bool
) -> None:
    api = make_api(admin_token=None, admin_read_token=None)
    for headers in [{}, ADMIN, READER, {"Authorization": "Bearer "}]:
        response = api.client.request(
            method, path.format(id=1, fingerprint="0123456789abcdef"), json=body, headers=headers
        )
        assert response.status_code == 401, response.text


def test_a_read_only_deployment_can_read_but_never_change(make_api: Callable[..., Api]) -> None:
    api = make_api(admin_token=None)
    (dlq_id,) = api.record(failure(api))
    assert api.client.get(f"{DLQ}/{dlq_id}", headers=READER).status_code == 200
    assert api.client.put(f"{DLQ}/{dlq_id}/resolve", headers=READER).status_code == 403
    assert api.client.put(f"{DLQ}/{dlq_id}/resolve", headers=ADMIN).status_code == 401


# -- validation ----------------------------------------------------------------------------------------------

# (method, path, query, JSON body, a word the message must contain)
INVALID: list[tuple[str, str, dict[str, Any] | None, Any, str]] = [
    ("GET", f"{DLQ}/0", None, None, "dlq_id"),
    ("GET", f"{DLQ}/-3", None, None, "dlq_id"),
    ("GET", f"{DLQ}/abc", None, None, "dlq_id"),
    ("GET", f"{DLQ}/99999999999999999999", None, None, "dlq_id"),
    ("DELETE", f"{DLQ}/1.5", None, None, "dlq_id"),
    ("GET", DLQ, {"limit": 0}, None, "limit"),
    ("GET", DLQ, {"limit": 501}, None, "limit"),
    ("GET", DLQ, {"limit": "many"}, None, "limit"),
    ("GET", DLQ, {"status": "lost"}, None, "status"),
    ("GET", DLQ, {"status": ["pending", "lost"]}, None, "status"),
    ("GET", DLQ, {"stage": "parse"}, None, "stage"),
    ("GET", DLQ, {"since": "yesterday"}, None, "since"),
    ("GET", DLQ, {"until": "2026-13-45"}, None, "until"),
    ("GET", DLQ, {"since": "99999999w"}, None, "since"),
    ("GET", DLQ, {"since": "1h", "until": "2h"}, None, "since must be earlier than until"),
    ("GET", DLQ, {"cursor": "not-a-cursor"}, None, "cursor"),
    ("GET", DLQ, {"cursor": encode_cursor(1)[:-2]}, None, "cursor"),
    ("GET", DLQ, {"fingerprint": "xyz"}, None, "fingerprint"),
    ("GET", DLQ, {"topic": "bad/topic"}, None, "topic"),
    ("GET", DLQ, {"consumer": "nul\x00byte"}, None, "consumer"),
    ("GET", CIRCUITS, {"consumer": "nul\x00byte"}, None, "consumer"),
    ("GET", DLQ, {"consumer": ""}, None, "consumer"),
    ("GET", DLQ, {"error_contains": "x" * 300}, None, "error_contains"),
    ("GET", DLQ, {"id": "0"}, None, "id"),
    ("GET", DLQ, {"stauts": "pending"}, None, "stauts"),
    ("GET", f"{DLQ}/stats", {"status": "lost"}, None, "status"),
    ("POST", f"{DLQ}/retry-all", None, {}, "limit"),
    ("POST", f"{DLQ}/retry-all", None, {"all": True, "limit": 10_001}, "limit"),
    ("POST", f"{DLQ}/retry-all", None, {"all": True, "limit": 0}, "limit"),
    ("POST", f"{DLQ}/retry-all", None, {"all": True, "limit": 5, "statuses": ["lost"]}, "statuses"),
    ("POST", f"{DLQ}/retry-all", None, {"all": True, "limit": 5, "to_topic": ".."}, "to_topic"),
    ("POST", f"{DLQ}/retry-all", None, {"all": True, "limit": 5, "ids": [0]}, "ids"),
    ("POST", f"{DLQ}/retry-all", None, {"consumer": "g", "limit": 5, "surprise": 1}, "surprise"),
    ("POST", f"{DLQ}/retry-all", None, {"consumer": "g", "limit": 5, "since": "soon"}, "since"),
    ("POST", f"{DLQ}/retry-all", None, [1, 2], "body"),
    ("POST", f"{DLQ}/1/retry", None, {"force": "maybe"}, "force"),
    ("POST", f"{DLQ}/1/retry", None, {"to_topic": "a" * 250}, "to_topic"),
    ("PUT", f"{DLQ}/1/resolve", None, {"note": 5}, "note"),
    ("PUT", f"{DLQ}/1/resolve", None, {"note": "x" * 2001}, "note"),
    ("PUT", f"{DLQ}/1/resolve", None, {"note": "\ud800"}, "note"),
]


@pytest.fixture
def dsn_parts(api: Api) -> list[str]:
    parts = urlsplit(api.settings.dsn)
    return [api.settings.dsn, parts.path.strip("/"), f"{parts.hostname}:{parts.port}", "postgresql://"]


@pytest.mark.parametrize(("method", "path", "query", "body", "word"), INVALID)
def test_invalid_input_is_422_with_a_clear_message(
    api: Api, dsn_parts: list[str], method: str, path: str, query: Any, body: Any, word: str
) -> None:
    content = None if body is None else json.dumps(body).encode()
    response = api.client.request(
        method, path, params=query, content=content, headers=ADMIN | {"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    error = response.json()
    assert word in error["message"], error
    assert error["detail"]
    assert all(set(issue) == {"loc", "msg", "type"} for issue in error["detail"])
    assert "Traceback" not in response.text
    assert not any(part in response.text for part in dsn_parts)


def test_a_body_that_is_not_json_is_422(api: Api) -> None:
    response = api.client.post(
        f"{DLQ}/retry-all", content=b"{not json", headers=ADMIN | {"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["message"]


# -- failures leak nothing --------------------------------------------------------------------------------------


def test_database_down_is_503_without_details(make_settings: Callable[..., Settings]) -> None:
    dead = f"postgresql://operator:s3cr3t-pw@127.0.0.1:{free_port()}/secret_db_name"
    settings = make_settings(
        database_url=dead, admin_token=ADMIN_TOKEN, db_connect_timeout_seconds=1, dlq_refresh_seconds=60
    )
    metrics = Metrics()
    service, pool = build_service(settings, metrics=metrics)
    try:
        with TestClient(create_app(service, settings, metrics), raise_server_exceptions=False) as client:
            for method, path in [("GET", DLQ), ("GET", f"{DLQ}/1"), ("PUT", f"{DLQ}/1/resolve")]:
                response = client.request(method, path, headers=ADMIN)
                assert response.status_code == 503, response.text
                assert response.json() == {"detail": "the database is unavailable; try again later"}
                assert response.headers["Retry-After"] == "5"
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json() == {"status": "unavailable"}
            assert client.get("/healthz").json() == {"status": "ok"}
    finally:
        pool.close()


def test_broker_down_is_503_without_details(
    make_api: Callable[..., Api], db: psycopg.Connection[Any]
) -> None:
    port = free_port()
    api = make_api(kafka_bootstrap_servers=f"127.0.0.1:{port}")
    (dlq_id,) = api.record(failure(api))
    response = api.client.post(f"{DLQ}/{dlq_id}/retry", headers=ADMIN)
    assert response.status_code == 503, response.text
    assert response.json() == {"detail": "the Kafka broker is unavailable; try again later"}
    assert str(port) not in response.text
    assert status_of(db, dlq_id) == "pending"


def test_a_burst_of_retries_while_the_broker_is_down_gets_fast_503s_and_health_stays_instant(
    make_api: Callable[..., Api], db: psycopg.Connection[Any], capfd: pytest.CaptureFixture[str]
) -> None:
    """Each retry held a request thread for 10 s; 42 at once made /healthz take 8.5 s (a liveness probe
    would have killed the pod), and librdkafka wrote raw lines to stderr that broke the JSON logs."""
    api = make_api(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    ids = api.record(*(failure(api) for _ in range(40)))
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=40) as pool:
        answers = [pool.submit(api.client.post, f"{DLQ}/{dlq_id}/retry", headers=ADMIN) for dlq_id in ids]
        time.sleep(0.5)
        probe = time.perf_counter()
        health = api.client.get("/healthz")
        health_seconds = time.perf_counter() - probe
        responses = [answer.result() for answer in answers]
    burst_seconds = time.perf_counter() - started

    assert health.status_code == 200
    assert health_seconds < 1.0
    assert {response.status_code for response in responses} == {503}
    assert burst_seconds < 8  # a few wait for the broker once (5 s); the rest are refused at once
    assert scalar(db, "SELECT count(*) FROM dlq WHERE status = 'pending'") == 40
    err = capfd.readouterr().err
    assert not [line for line in err.splitlines() if line.startswith("%")], err[:2000]


def test_an_unexpected_error_is_a_bare_500_and_a_log_line(
    api: Api, dsn_parts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)

    def explode(*_: Any, **__: Any) -> Any:
        raise RuntimeError(f"cannot use {api.settings.dsn}")

    monkeypatch.setattr(api.service, "stats", explode)
    response = api.client.get(f"{DLQ}/stats", headers=ADMIN | {"X-Request-ID": "req-42"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error"}
    assert response.headers["X-Request-ID"] == "req-42"
    assert not any(part in response.text for part in dsn_parts)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = next(line for line in lines if line["event"] == "api_unhandled_error")
    assert failed["request_id"] == "req-42"
    assert "RuntimeError" in failed["exception"]


def test_requests_are_logged_without_tokens(api: Api) -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    (dlq_id,) = api.record(failure(api))
    api.client.get(DLQ, headers=READER)
    api.client.put(f"{DLQ}/{dlq_id}/resolve", json={"note": "n"}, headers=ADMIN)
    api.client.get(DLQ, headers={"Authorization": "Bearer wrong-token-1234567890"})
    output = stream.getvalue()
    assert ADMIN_TOKEN not in output
    assert READ_TOKEN not in output
    assert "wrong-token-1234567890" not in output
    lines = [json.loads(line) for line in output.splitlines()]
    requests = [line for line in lines if line["event"] == "api_request"]
    assert [(r["method"], r["status"], r["role"]) for r in requests] == [
        ("GET", 200, "reader"),
        ("PUT", 200, "admin"),
        ("GET", 401, None),
    ]
    resolved = next(line for line in lines if line["event"] == "dlq_resolved")
    assert resolved["actor"] == "api:admin"
    assert resolved["request_id"] == requests[1]["request_id"]


# -- operations ------------------------------------------------------------------------------------------------


def test_http_hygiene(api: Api) -> None:
    """What a probe found: a redirect built from the Host header, cacheable and sniffable payload
    responses, a 422 that echoed 40 kB of parameter names as 672 kB, 422 where 405 is right, and HEAD
    and OPTIONS treated as reads."""
    (dlq_id,) = api.record(failure(api))
    redirected = api.client.get("/healthz/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert redirected.status_code == 404
    assert "evil.example" not in redirected.headers.get("location", "")

    for response in (api.client.get(f"{DLQ}/{dlq_id}", headers=READER), api.client.get(DLQ, headers=READER)):
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"

    unknown = {f"p{i}-" + "x" * 300: "1" for i in range(100)}  # 30 kB of unknown parameter names
    echoed = api.client.get(DLQ, params=unknown | {"since": "y" * 20_000}, headers=READER)
    assert echoed.status_code == 422
    assert len(echoed.content) < 25_000  # it was 16 times the request
    assert "more" in echoed.json()["message"]

    for method, path, allow in (("DELETE", f"{DLQ}/stats", "GET"), ("GET", f"{DLQ}/retry-all", "POST")):
        wrong = api.client.request(method, path, headers=ADMIN)
        assert wrong.status_code == 405, wrong.text
        assert wrong.headers["allow"] == allow
    for method in ("HEAD", "OPTIONS", "PATCH"):
        assert api.client.request(method, DLQ, headers=ADMIN).status_code == 405
        assert api.client.request(method, DLQ, headers=READER).status_code == 405
        assert api.client.request(method, DLQ).status_code == 401


def test_forwarded_for_is_believed_only_from_configured_proxies(
    make_settings: Callable[..., Settings],
) -> None:
    """uvicorn believed X-Forwarded-For from loopback, so any local caller could spoof its logged client."""
    default = make_settings()
    assert default.api_trusted_proxies == []
    configured = make_settings(api_trusted_proxies="10.0.0.0/8, 192.168.1.7")
    assert configured.api_trusted_proxies == ["10.0.0.0/8", "192.168.1.7"]
    with pytest.raises(ValueError, match="not an IP address"):
        make_settings(api_trusted_proxies="*")


def test_health_readiness_and_metrics_need_no_token(api: Api) -> None:
    api.record(failure(api), failure(api))
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {"status": "ready"}
    group = api.settings.consumer_group
    sample = f'eventhandler_dlq_depth{{consumer="{group}",status="pending"}} 2.0'
    wait_for(lambda: sample in api.client.get("/metrics").text, timeout=10, message="the depth gauge")
    metrics = api.client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")


def _patterns(schema: Any) -> list[dict[str, Any]]:
    """The parts of a JSON schema that have a pattern."""
    if isinstance(schema, dict):
        own = [schema] if "pattern" in schema else []
        return own + [p for value in schema.values() for p in _patterns(value)]
    if isinstance(schema, list):
        return [p for item in schema for p in _patterns(item)]
    return []


def test_the_openapi_document_names_the_endpoints_and_the_bearer_scheme(api: Api) -> None:
    document = api.client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["BearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["BearerToken"]["description"],
    }
    paths = document["paths"]
    assert set(paths[DLQ]) == {"get"}
    assert set(paths[f"{DLQ}/{{dlq_id}}"]) == {"get", "delete"}
    assert set(paths[f"{DLQ}/{{dlq_id}}/retry"]) == {"post"}
    assert set(paths[f"{DLQ}/retry-all"]) == {"post"}
    assert set(paths[f"{DLQ}/{{dlq_id}}/resolve"]) == {"put"}
    # an age as `parse_duration` takes it, decimals and spaces too
    (since,) = [p for p in paths[DLQ]["get"]["parameters"] if p["name"] == "since"]
    ages = [a["pattern"] for a in _patterns(since["schema"])]
    assert ages
    assert all(re.fullmatch(age, "1.5 h") and not re.fullmatch(age, "1.5 hours") for age in ages)
    # a fingerprint several consumers' circuits share is a 409 (`DLQService.close_circuit`)
    assert "409" in paths[f"{CIRCUITS}/{{fingerprint}}/close"]["put"]["responses"]
    for path, operations in paths.items():
        if path.startswith("/api/"):
            for operation in operations.values():
                assert operation["security"] == [{"BearerToken": []}]
                assert "401" in operation["responses"]


# -- the real server --------------------------------------------------------------------------------------------


def test_serve_runs_uvicorn_with_json_logs_and_stops_gracefully_on_sigterm(
    make_settings: Callable[..., Settings], db_url: str, tmp_path: Any
) -> None:
    settings = make_settings(admin_token=ADMIN_TOKEN, admin_read_token=READ_TOKEN)
    metrics = Metrics()
    _service, pool = build_service(settings, metrics=metrics)
    try:
        with pool.connection() as conn, conn.transaction():
            payload = k.structured(k.cloud_event("user.created", {"password": "hunter2"}))
            (dlq_id,) = DLQStore.on(pool).writer.record_failures(
                conn, [failed_message(consumer=settings.consumer_group, value=payload)]
            )
    finally:
        pool.close()
    port = free_port()
    env = settings_env(settings) | {
        "EVENTHANDLER_ADMIN_TOKEN": ADMIN_TOKEN,
        "EVENTHANDLER_ADMIN_READ_TOKEN": READ_TOKEN,
        "EVENTHANDLER_API_REDACT_FIELDS": "data.password, data.secret",
    }
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "eventhandler", "api", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5) as client:

            def healthy() -> bool:
                assert process.poll() is None, log_path.read_text()
                try:
                    return client.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(healthy, timeout=30, message="the API to listen")
            assert client.get(DLQ).status_code == 401
            row = client.get(f"{DLQ}/{dlq_id}", headers=READER | {"X-Forwarded-For": "6.6.6.6"})
            assert row.status_code == 200, row.text
            assert row.json()["payload"]["data"] == {"password": "***"}
            assert "server" not in row.headers
            assert client.get("/readyz").json() == {"status": "ready"}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log_path.read_text()
    assert ADMIN_TOKEN not in output
    assert READ_TOKEN not in output
    events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
    assert "api_starting" in events
    assert "api_request" in events
    assert events.index("api_started") < events.index("api_stopped")
    clients = {json.loads(line).get("client") for line in output.splitlines() if '"api_request"' in line}
    assert clients == {"127.0.0.1"}  # a forged X-Forwarded-For is not believed from an untrusted peer


def test_serve_refuses_to_start_without_a_token(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match="EVENTHANDLER_ADMIN_TOKEN"):
        serve(make_settings(), "127.0.0.1", free_port())


# -- the flood guard's circuits ------------------------------------------------------------------------------


def test_circuits_are_listed_and_an_admin_closes_one_audited(api: Api, db: psycopg.Connection[Any]) -> None:
    stored = open_circuit(api, error="device 'secret-pump' is not registered")
    shown = shown_fingerprint(api, stored)
    assert shown != stored  # redacting: the fingerprint is keyed, as every view shows it

    (listed,) = api.client.get(CIRCUITS, headers=READER).json()
    assert listed["fingerprint"] == shown
    assert listed["state"] == "open"
    assert listed["error_message"] is None  # it may quote a masked value
    assert (listed["failures"], listed["messages"], listed["distinct_keys"]) == (80, 100, 10)
    assert listed["event_types"] == ["device.reading"]
    assert listed["opened_by"] == "worker-1"
    stats = api.client.get(f"{DLQ}/stats", headers=READER).json()
    assert [c["fingerprint"] for c in stats["circuits"]] == [shown]

    assert api.client.put(f"{CIRCUITS}/{shown}/close", headers=READER).status_code == 403
    assert api.client.put(f"{CIRCUITS}/{stored}/close", headers=ADMIN).status_code == 404  # not as shown
    for body in ({"for_seconds": 0}, {"for_seconds": 31 * 86400}, {"for_seconds": "1h"}, {"force": True}):
        assert api.client.put(f"{CIRCUITS}/{shown}/close", json=body, headers=ADMIN).status_code == 422
    assert api.client.put(f"{CIRCUITS}/NOT-HEX/close", headers=ADMIN).status_code == 422
    assert audit(db) == []

    closed = api.client.put(
        f"{CIRCUITS}/{shown}/close", json={"for_seconds": 7200, "note": "bad batch upstream"}, headers=ADMIN
    )
    assert closed.status_code == 200, closed.text
    body = closed.json()
    assert body["state"] == "closed"
    assert body["closed_by"] == "api:admin"
    assert body["close_note"] == "bad batch upstream"
    left = scalar(db, "SELECT extract(epoch FROM dead_letter_until - now()) FROM flood_circuit")
    assert 7100 < left <= 7200
    ((actor, action, ids),) = audit(db)
    assert (actor, action, ids) == ("api:admin", "close_circuit", [])
    detail = scalar(db, "SELECT detail FROM dlq_audit")
    assert detail["fingerprint"] == stored
    assert detail["dead_letter_seconds"] == 7200
    assert "secret-pump" not in closed.text

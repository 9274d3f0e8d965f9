"""The console's server side in-process (FastAPI's test client) against a real PostgreSQL: sessions
and their roles, the cookie, sign-in from another site, and what a read-only session is shown. The
browser-level journeys are in tests/browser."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest

from eventhandler.api import create_app
from eventhandler.app import build_service
from eventhandler.config import Settings
from eventhandler.console.sessions import SessionStore
from eventhandler.metrics import Metrics
from tests.support.dlq import DLQ as DLQStore
from tests.support.factories import failed_message

with warnings.catch_warnings():
    from starlette.exceptions import StarletteDeprecationWarning

    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"


@pytest.fixture
def make_console(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., tuple[TestClient, Any]]]:
    made: list[tuple[TestClient, psycopg_pool.ConnectionPool]] = []

    def make(**overrides: Any) -> tuple[TestClient, Any]:
        settings = make_settings(**({"admin_token": ADMIN, "admin_read_token": READER} | overrides))
        metrics = Metrics()
        service, pool = build_service(settings, metrics=metrics)
        client = TestClient(
            create_app(service, settings, metrics, SessionStore(pool)), follow_redirects=False
        )
        client.__enter__()
        made.append((client, pool))
        return client, pool

    yield make
    for client, pool in made:
        client.__exit__(None, None, None)
        pool.close()


def sign_in(client: TestClient, token: str) -> str:
    response = client.post("/ui/signin", data={"token": token, "next": "/ui"})
    assert response.status_code == 303, response.text
    return response.cookies["eventhandler_console"]


def csrf_of(client: TestClient, path: str) -> str:
    page = client.get(path).text
    return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def a_row(pool: Any, settings_group: str = "group") -> int:
    with pool.connection() as conn, conn.transaction():
        (dlq_id,) = DLQStore.on(pool).writer.record_failures(conn, [failed_message()])
    return dlq_id


def test_a_session_has_the_role_its_token_has_now(
    make_console: Callable[..., tuple[TestClient, Any]],
) -> None:
    """Tokens rotated so that the old admin token is now the read-only one: its browser is read-only."""
    first, pool = make_console()
    dlq_id = a_row(pool)
    cookie = sign_in(first, ADMIN)
    assert "Replay this row" in first.get(f"/ui/rows/{dlq_id}").text
    rotated, _ = make_console(admin_token=OTHER, admin_read_token=ADMIN)
    rotated.cookies.set("eventhandler_console", cookie, path="/ui")
    page = rotated.get(f"/ui/rows/{dlq_id}")
    assert page.status_code == 200
    assert "read-only" in page.text
    assert "Replay this row" not in page.text
    forged = rotated.post(f"/ui/rows/{dlq_id}/resolve", data={"csrf": csrf_of(rotated, f"/ui/rows/{dlq_id}")})
    assert forged.status_code == 403
    gone, _ = make_console(admin_token=OTHER, admin_read_token=READER)  # the token is no longer configured
    gone.cookies.set("eventhandler_console", cookie, path="/ui")
    assert gone.get("/ui").headers["location"].startswith("/ui/signin")


def test_the_cookie_is_secure_when_the_setting_says_so_and_never_holds_the_token(
    make_console: Callable[..., tuple[TestClient, Any]],
) -> None:
    plain, _ = make_console()
    header = plain.post("/ui/signin", data={"token": ADMIN}).headers["set-cookie"]
    assert "HttpOnly" in header
    assert "SameSite=strict" in header
    assert "Secure" not in header
    assert ADMIN not in header
    behind_tls, _ = make_console(console_secure_cookie=True)
    assert "Secure" in behind_tls.post("/ui/signin", data={"token": ADMIN}).headers["set-cookie"]


def test_sign_in_from_another_site_is_refused_and_signing_in_again_ends_the_old_session(
    make_console: Callable[..., tuple[TestClient, Any]], db: psycopg.Connection[Any]
) -> None:
    client, _ = make_console()
    forged = client.post("/ui/signin", data={"token": READER}, headers={"Sec-Fetch-Site": "cross-site"})
    assert forged.status_code == 403
    assert "set-cookie" not in forged.headers
    first = sign_in(client, ADMIN)
    second = sign_in(client, ADMIN)
    assert first != second
    assert db.execute("SELECT count(*) FROM console_session").fetchone() == (1,)


def test_odd_input_is_a_clear_answer_not_a_500(make_console: Callable[..., tuple[TestClient, Any]]) -> None:
    client, pool = make_console()
    dlq_id = a_row(pool)
    sign_in(client, ADMIN)
    assert client.get("/ui/rows", params={"after": "²"}).status_code == 200
    assert client.get("/ui/rows", params={"since": "last tuesday"}).status_code == 400
    refused = client.post(f"/ui/rows/{dlq_id}/resolve", data={"csrf": "tökén"})
    assert refused.status_code == 403
    for target in ("//evil.example/", "/ui\\evil", "/ui\u2215evil", "/ui\tx", "https://evil.example/ui"):
        response = client.post("/ui/signin", data={"token": ADMIN, "next": target})
        assert response.status_code == 303
        assert response.headers["location"] == "/ui", target


def test_a_read_only_session_sees_the_history_without_the_clients(
    make_console: Callable[..., tuple[TestClient, Any]],
) -> None:
    client, pool = make_console()
    dlq_id = a_row(pool)
    sign_in(client, ADMIN)
    csrf = csrf_of(client, f"/ui/rows/{dlq_id}")
    assert (
        client.post(f"/ui/rows/{dlq_id}/resolve", data={"csrf": csrf, "note": "fixed by hand"}).status_code
        == 303
    )
    admin_view = client.get(f"/ui/rows/{dlq_id}").text
    assert "resolve by console:admin (testclient)" in admin_view
    reader, _ = make_console()
    sign_in(reader, READER)
    reader_view = reader.get(f"/ui/rows/{dlq_id}").text
    assert "resolve by console:admin" in reader_view
    assert "testclient" not in reader_view
    assert "fixed by hand" in reader_view

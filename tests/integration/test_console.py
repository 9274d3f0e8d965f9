"""The console's server side in-process (FastAPI's test client) against a real PostgreSQL: sessions
and their roles, the cookie, the sign-in form and sign-in from another site, what a read-only session
is shown, and a replay held to the count the operator confirmed. The browser-level journeys are in
tests/browser."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from typing import Any

import psycopg
import psycopg_pool
import pytest

from eventhandler.api import create_app
from eventhandler.app import build_service
from eventhandler.config import Settings
from eventhandler.console.common import MAX_FORM_BYTES
from eventhandler.console.sessions import SessionStore
from eventhandler.dlq import ReplayRows
from eventhandler.dlq.replays import PostgresReplayRows
from eventhandler.metrics import Metrics
from eventhandler.models import DLQFilter
from eventhandler.replay import Replayer
from tests.support.dlq import DLQ as DLQStore
from tests.support.factories import failed_message
from tests.support.waiting import wait_for

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

    def make(
        *, replay_rows: Callable[[psycopg_pool.ConnectionPool], ReplayRows] | None = None, **overrides: Any
    ) -> tuple[TestClient, Any]:
        """`replay_rows`: the rows replays take, on the console's pool (the real ones by default)."""
        settings = make_settings(**({"admin_token": ADMIN, "admin_read_token": READER} | overrides))
        metrics = Metrics()
        service, pool = build_service(settings, metrics=metrics)
        if replay_rows is not None:
            service.replayer = Replayer(replay_rows(pool), settings.producer_config(), metrics=metrics)
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


def a_row(pool: Any, **fields: Any) -> int:
    with pool.connection() as conn, conn.transaction():
        (dlq_id,) = DLQStore.on(pool).writer.record_failures(conn, [failed_message(**fields)])
    return dlq_id


def admin_on_a_row(make_console: Callable[..., tuple[TestClient, Any]]) -> tuple[TestClient, Any, int, str]:
    """A console with one row and an admin session: the client, its pool, the row's id and the CSRF token."""
    client, pool = make_console()
    dlq_id = a_row(pool)
    sign_in(client, ADMIN)
    return client, pool, dlq_id, csrf_of(client, f"/ui/rows/{dlq_id}")


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


def test_a_body_larger_than_any_form_is_refused_before_it_is_read(
    make_console: Callable[..., tuple[TestClient, Any]],
) -> None:
    """A form is parsed before the session is looked at: without a limit, anyone could make the server
    hold a body of any size (Starlette's own limits allow about a gigabyte)."""
    client, pool = make_console()
    dlq_id = a_row(pool)
    big = {"token": "x" * (MAX_FORM_BYTES + 1)}
    assert client.post("/ui/signin", data=big).status_code == 413
    assert client.post(f"/ui/rows/{dlq_id}/resolve", data={"note": "x" * 2_000_000}).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is counted as it comes
        for _ in range(100):
            yield b"note=" + b"x" * 65_536

    streamed = client.post(
        f"/ui/rows/{dlq_id}/resolve",
        content=chunks(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert streamed.status_code == 413
    sign_in(client, ADMIN)
    csrf = csrf_of(client, f"/ui/rows/{dlq_id}")
    note = "ünïcödé " * 250  # 2,000 characters, URL-encoded far larger than their count
    assert client.post(f"/ui/rows/{dlq_id}/resolve", data={"csrf": csrf, "note": note}).status_code == 303


def test_a_note_the_service_cannot_take_is_said_on_the_rows_page(
    make_console: Callable[..., tuple[TestClient, Any]], db: psycopg.Connection[Any]
) -> None:
    client, _, dlq_id, csrf = admin_on_a_row(make_console)
    for note, problem in (("fixed\x00", "NUL"), ("x" * 2001, "at most 2,000 characters")):
        for action in ("resolve", "discard"):
            refused = client.post(f"/ui/rows/{dlq_id}/{action}", data={"csrf": csrf, "note": note})
            assert refused.status_code == 409, refused.text
            assert refused.headers["content-type"].startswith("text/html")
            assert problem in refused.text
    assert db.execute("SELECT status FROM dlq").fetchone() == ("pending",)


def test_a_discard_is_refused_while_a_replay_has_the_row_and_when_it_is_closed(
    make_console: Callable[..., tuple[TestClient, Any]],
) -> None:
    """It was answered `Discarded.` either way, and the replay's mark then kept the discard."""
    client, pool, dlq_id, csrf = admin_on_a_row(make_console)
    replays = DLQStore.on(pool).replays
    with replays.lease() as lease:
        _, claim = replays.take(DLQFilter(ids=(dlq_id,)), limit=1, lease=lease, lease_seconds=60)
        assert claim is not None
        refused = client.post(f"/ui/rows/{dlq_id}/discard", data={"csrf": csrf, "note": "bogus"})
        assert refused.status_code == 409
        assert "being replayed" in refused.text
        replays.finish(lease=lease, claim=claim, published={}, actor="t", detail={})
    assert client.post(f"/ui/rows/{dlq_id}/resolve", data={"csrf": csrf}).status_code == 303
    closed = client.post(f"/ui/rows/{dlq_id}/discard", data={"csrf": csrf})
    assert closed.status_code == 409
    assert "is resolved; only pending or replayed rows can be discarded" in closed.text


def test_a_read_only_session_sees_the_history_without_the_clients(
    make_console: Callable[..., tuple[TestClient, Any]],
) -> None:
    client, _, dlq_id, csrf = admin_on_a_row(make_console)
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


class _Inputs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.by_name: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "input":
            fields = dict(attrs)
            self.by_name[fields.get("name") or ""] = fields


def inputs(page: str) -> dict[str, dict[str, str | None]]:
    """A page's input elements by name, each as its attributes."""
    parser = _Inputs()
    parser.feed(page)
    return parser.by_name


def test_the_sign_in_form_asks_browsers_not_to_keep_the_token(
    make_console: Callable[..., tuple[TestClient, Any]],
) -> None:
    client, _ = make_console()
    page = client.get("/ui/signin")
    assert page.status_code == 200
    token = inputs(page.text)["token"]
    assert token.get("type") == "password"
    assert token.get("autocomplete") == "off"


def matched_of(page: str) -> int:
    """The count a replay's preview asks the operator to confirm."""
    found = re.search(r'<strong id="matched">(\d+)</strong>', page)
    assert found is not None, page
    return int(found[1])


class ARowFailsMeanwhile(PostgresReplayRows):
    """The replay's rows, read just after one more row failed: between the count the console checked
    against the operator's confirmation and the replay taking its rows."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, topic: str) -> None:
        super().__init__(pool)
        self.failing: Callable[[], int] | None = lambda: a_row(pool, topic=topic)

    def matching_ids(self, flt: DLQFilter, *, limit: int | None = None) -> list[int]:
        if self.failing is not None:
            self.failing()
            self.failing = None
        return super().matching_ids(flt, limit=limit)


def ended(client: TestClient, job: str) -> str:
    """The progress of a console replay once it ended, or "" while it runs."""
    progress = client.get(job, params={"fragment": "true"}).text
    return "" if "replaying…" in progress else progress


def test_a_console_replay_takes_no_more_rows_than_the_operator_confirmed(
    make_console: Callable[..., tuple[TestClient, Any]], topic: str, db: psycopg.Connection[Any]
) -> None:
    client, pool = make_console(replay_rows=lambda pool: ARowFailsMeanwhile(pool, topic))
    confirmed = [a_row(pool, topic=topic) for _ in range(2)]
    sign_in(client, ADMIN)
    assert matched_of(client.get("/ui/replay").text) == 2
    started = client.post("/ui/replay", data={"csrf": csrf_of(client, "/ui/replay"), "confirm": "2"})
    assert started.status_code == 303, started.text
    progress = wait_for(lambda: ended(client, started.headers["location"]), message="the replay to end")
    assert 'Published <strong id="published">2</strong> of 2' in progress
    statuses = dict(db.execute("SELECT dlq_id, status FROM dlq").fetchall())
    (late,) = set(statuses) - set(confirmed)
    assert statuses == {confirmed[0]: "replayed", confirmed[1]: "replayed", late: "pending"}


def test_a_console_replay_is_refused_when_more_rows_match_than_were_confirmed(
    make_console: Callable[..., tuple[TestClient, Any]], topic: str, db: psycopg.Connection[Any]
) -> None:
    client, pool = make_console()
    for _ in range(2):
        a_row(pool, topic=topic)
    sign_in(client, ADMIN)
    assert matched_of(client.get("/ui/replay").text) == 2
    csrf = csrf_of(client, "/ui/replay")
    a_row(pool, topic=topic)  # a row failed after the operator read the count
    refused = client.post("/ui/replay", data={"csrf": csrf, "confirm": "2"})
    assert refused.status_code == 200
    assert "3 rows match now, not the 2 confirmed" in refused.text
    assert matched_of(refused.text) == 3  # the preview again, to confirm the new count
    assert db.execute("SELECT status, count(*) FROM dlq GROUP BY status").fetchall() == [("pending", 3)]

"""The operator's console in a real browser: Playwright driving Debian's Chromium against `eventhandler
api` as a user runs it, a real PostgreSQL, a real broker and a running worker. Each page's screenshot is
saved under `EVENTHANDLER_SCREENSHOTS` (default `build/screenshots`) for a person to look at."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from eventhandler.config import Settings
from tests.conftest import settings_env
from tests.support import kafka as k
from tests.support.services import free_port
from tests.support.waiting import wait_for
from tests.support.worker import run_until_idle, threaded_worker

ADMIN_TOKEN = "admin-token-0123456789abcdef"
READ_TOKEN = "reader-token-0123456789abcdef"
CHROMIUM = os.environ.get("EVENTHANDLER_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("EVENTHANDLER_SCREENSHOTS", "build/screenshots"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: apt-get install chromium (or set EVENTHANDLER_TEST_CHROMIUM)"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def console(
    make_settings: Callable[..., Settings],
    spawned: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
    tmp_path: Path,
) -> Iterator[tuple[str, Settings]]:
    """`eventhandler api` serving the console, as a separate process."""
    settings = make_settings(admin_token=ADMIN_TOKEN, admin_read_token=READ_TOKEN)
    port = free_port()
    env = settings_env(settings) | {
        "EVENTHANDLER_ADMIN_TOKEN": ADMIN_TOKEN,
        "EVENTHANDLER_ADMIN_READ_TOKEN": READ_TOKEN,
    }
    log_path = tmp_path / "api.log"
    command = [sys.executable, "-m", "eventhandler", "api", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = spawned(subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(base) or process.poll() is not None, timeout=60, message="the console")
        assert process.poll() is None, log_path.read_text()
        yield base, settings
    finally:
        print(log_path.read_text()[-5000:])  # the server's log, shown when the test fails


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, base: str, token: str) -> None:
    page.goto(f"{base}/ui")
    expect(page).to_have_url(f"{base}/ui/signin?next=%2Fui")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()


def seed(settings: Settings, bootstrap: str, topic: str) -> None:
    """Readings of a heat pump nobody registered, and one message that is not JSON."""
    producer = k.TestProducer(bootstrap)
    producer.send_events(topic, [k.registered("sensor-1"), k.reading("sensor-1")])
    producer.send_events(topic, [k.reading("heat-pump", value=i) for i in range(3)])
    producer.send(topic, b"\xfe not json")
    producer.flush()
    run_until_idle(settings, idle=2)


def test_an_admin_signs_in_filters_opens_a_row_replays_it_and_signs_out(
    browser: Browser,
    console: tuple[str, Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
) -> None:
    base, settings = console
    seed(settings, kafka_bootstrap, topic)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, base, ADMIN_TOKEN)
    expect(page.locator(".summary").first).to_contain_text("4 pending")
    expect(
        page.get_by_role("link", name="HandlerFailure: device 'heat-pump' is not registered")
    ).to_be_visible()
    shot(page, "overview")

    # The cookie holds a session, never the token; the browser's scripts cannot read it.
    (cookie,) = context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/ui")
    assert ADMIN_TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == ""

    # Filter: the filter lives in the URL, so the link can be shared.
    page.get_by_role("link", name="Rows", exact=True).click()
    page.get_by_label("Event type").fill("device.reading")
    page.get_by_role("checkbox", name="pending").check()
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#total")).to_have_text("3 matching rows")
    assert "event_type=device.reading" in page.url
    with_bad_time = browser.new_page()  # a refused filter is shown, with JavaScript on as without
    with_bad_time.context.add_cookies(context.cookies())
    with_bad_time.goto(f"{base}/ui/rows")
    with_bad_time.get_by_label("Since").fill("last tuesday")
    with_bad_time.get_by_role("button", name="Filter").click()
    expect(with_bad_time.get_by_role("alert")).to_contain_text("since")
    with_bad_time.close()
    assert "status=pending" in page.url
    shot(page, "rows")
    shared = browser.new_context()
    other = shared.new_page()
    sign_in(other, base, READ_TOKEN)
    other.goto(page.url)
    expect(other.locator("#total")).to_have_text("3 matching rows")
    shared.close()

    # Open a row: its error, its payload, no history yet.
    page.locator("table.rows tbody tr").first.get_by_role("link").click()
    expect(page.get_by_role("heading", name="What failed")).to_be_visible()
    expect(page.locator(".error-text")).to_contain_text("device 'heat-pump' is not registered")
    expect(page.locator("pre.payload")).to_contain_text('"device_id": "heat-pump"')
    shot(page, "row")
    dlq_id = int(page.url.rsplit("/", 1)[1])

    # The cause is fixed, the row replayed from its page, and a running worker resolves it.
    producer = k.TestProducer(kafka_bootstrap)
    producer.send_events(topic, [k.registered("heat-pump")])
    producer.flush()
    with threaded_worker(settings):
        page.get_by_role("button", name="Replay this row").click()
        expect(page.get_by_role("status")).to_contain_text("Replayed")
        wait_for(
            lambda: (
                db.execute("SELECT status FROM dlq WHERE dlq_id = %s", [dlq_id]).fetchone() == ("resolved",)
            ),
            message="the worker to resolve the replayed row",
        )
    page.reload()
    expect(page.locator("h1 .status-resolved")).to_have_text("resolved")
    expect(page.locator("ol.history")).to_contain_text("replay by console:admin")
    shot(page, "row-resolved")

    # Sign out: the session is gone, on this browser and for any copy of its cookie.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    # … and no copy of an admin page stays in the browser's storage for the next person at it
    assert page.evaluate("sessionStorage.getItem('htmx-history-cache')") in (None, "[]")
    page.go_back()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    copied = httpx.get(f"{base}/ui", cookies={cookie["name"]: cookie["value"]}, follow_redirects=False)
    assert copied.status_code == 303
    assert copied.headers["location"].startswith("/ui/signin")
    context.close()


def test_a_read_only_session_sees_no_change_and_a_forged_change_is_refused(
    browser: Browser,
    console: tuple[str, Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
) -> None:
    base, settings = console
    seed(settings, kafka_bootstrap, topic)
    (dlq_id,) = db.execute("SELECT min(dlq_id) FROM dlq").fetchone() or ()
    context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone's width
    page = context.new_page()
    sign_in(page, base, READ_TOKEN)
    shot(page, "overview-phone")
    page.goto(f"{base}/ui/rows/{dlq_id}")
    expect(page.get_by_role("heading", name="What failed")).to_be_visible()
    expect(page.get_by_role("button", name="Replay this row")).to_have_count(0)
    expect(page.get_by_role("heading", name="Traceback")).to_have_count(0)  # tracebacks are admin only
    shot(page, "row-read-only")

    # A change forged from the read-only session (with its own CSRF token, even) is refused.
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    for path in ("replay", "resolve", "discard"):
        forged = page.request.post(f"{base}/ui/rows/{dlq_id}/{path}", form={"csrf": csrf or ""})
        assert forged.status == 403, path
    assert db.execute("SELECT status FROM dlq WHERE dlq_id = %s", [dlq_id]).fetchone() == ("pending",)
    context.close()

    # An admin session without the CSRF token, or from another site, is refused as well.
    admin = browser.new_context()
    page = admin.new_page()
    sign_in(page, base, ADMIN_TOKEN)
    assert page.request.post(f"{base}/ui/rows/{dlq_id}/resolve", form={"note": "x"}).status == 403
    page.goto(f"{base}/ui/rows/{dlq_id}")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    cross = page.request.post(
        f"{base}/ui/rows/{dlq_id}/resolve",
        form={"csrf": csrf or ""},
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert cross.status == 403
    assert db.execute("SELECT status FROM dlq WHERE dlq_id = %s", [dlq_id]).fetchone() == ("pending",)
    assert db.execute("SELECT count(*) FROM dlq_audit").fetchone() == (0,)
    admin.close()


def test_a_wrong_token_does_not_sign_in_and_next_never_leaves_the_console(
    browser: Browser, console: tuple[str, Settings]
) -> None:
    base, _ = console
    page = browser.new_page()
    page.goto(f"{base}/ui/signin?next=//evil.example/")
    page.get_by_label("Token").fill("not-a-token-at-all-0000")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
    shot(page, "signin")
    page.get_by_label("Token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{base}/ui")
    page.close()


def test_an_admin_replays_an_error_group_after_its_preview_and_simulation_and_sees_it_resolved(
    browser: Browser,
    console: tuple[str, Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
) -> None:
    base, settings = console
    seed(settings, kafka_bootstrap, topic)
    producer = k.TestProducer(kafka_bootstrap)
    producer.send_events(topic, [k.registered("heat-pump")])  # the cause, fixed
    producer.flush()
    run_until_idle(settings, idle=2)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    sign_in(page, base, ADMIN_TOKEN)
    page.get_by_role("row", name="heat-pump").get_by_role("link", name="replay…").click()
    expect(page.locator("#matched")).to_have_text("3")
    page.get_by_role("button", name="Simulate").click()
    expect(page.locator("#simulation")).to_contain_text("3 would apply, 0 would fail again")
    shot(page, "replay-preview")
    assert db.execute("SELECT count(*) FROM dlq WHERE status = 'pending'").fetchone() == (
        4,
    )  # nothing changed

    with threaded_worker(settings):
        page.get_by_role("button", name="Replay 3 rows").click()
        expect(page.get_by_role("heading", name="Replay of 3 rows")).to_be_visible()
        expect(page.locator("#published")).to_have_text("3", timeout=30_000)
        expect(page.locator("#resolved")).to_have_text("3", timeout=30_000)  # followed live (htmx)
        shot(page, "replay-progress")
    rows = db.execute("SELECT status, count(*) FROM dlq GROUP BY status ORDER BY status").fetchall()
    assert rows == [("pending", 1), ("resolved", 3)]
    actors = db.execute(
        "SELECT DISTINCT actor, action, request_id IS NOT NULL, client FROM dlq_audit"
    ).fetchall()
    assert actors == [("console:admin", "replay", True, "127.0.0.1")]  # the request that started it
    page.close()

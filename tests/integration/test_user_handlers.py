"""User projections loaded from a module path (`EVENTHANDLER_HANDLERS`), run by the real worker against
the real broker and PostgreSQL: their events are applied, their rejections and failed writes land in
the DLQ with the right stage, and a bad module path stops the worker at start with a clear error."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from eventhandler.app import build_worker
from eventhandler.config import Settings, load_settings
from eventhandler.errors import ConfigError
from eventhandler.handlers import SimpleProjection
from eventhandler.handlers.loading import load_registry
from eventhandler.logs import configure_logging
from tests.conftest import settings_env
from tests.example_handlers import orders as example
from tests.support import kafka as k
from tests.support.worker import run_until_idle, scalar

HANDLERS = ["tests.example_handlers.orders"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def orders_db(db: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """This test's database with the example's own tables, as its deployment would create them."""
    db.execute(example.SCHEMA)
    return db


@pytest.fixture
def producer(kafka_bootstrap: str) -> k.TestProducer:
    return k.TestProducer(kafka_bootstrap)


def placed(order_id: str, *lines: tuple[str, int], customer: str = "ada") -> dict[str, Any]:
    data = {
        "order_id": order_id,
        "customer": customer,
        "lines": [{"sku": s, "quantity": q} for s, q in lines],
    }
    return k.cloud_event("order.placed", data)


def cancelled(order_id: str) -> dict[str, Any]:
    return k.cloud_event("order.cancelled", {"order_id": order_id, "reason": "changed mind"})


def send(producer: k.TestProducer, topic: str, events: list[dict[str, Any]]) -> None:
    for event in events:
        producer.send(topic, k.structured(event), key=b"orders", partition=0)  # one partition: in order
    producer.flush()


def test_a_user_projection_loaded_by_module_path_applies_its_events(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    orders_db: psycopg.Connection[Any],
) -> None:
    first = placed("o-1", ("apple", 2), ("pear", 1))
    send(
        producer,
        topic,
        [first, placed("o-2", ("plum", 5)), cancelled("o-2"), k.registered("dev-1"), k.reading("dev-1")],
    )

    stats = run_until_idle(make_settings(handlers=HANDLERS), idle=2)

    assert stats.failed == 0, orders_db.execute("SELECT error_message FROM dlq").fetchall()
    assert stats.applied == 5
    rows = orders_db.execute(
        "SELECT order_id, customer, status, line_count, placed_at::text FROM example_orders ORDER BY 1"
    ).fetchall()
    assert [r[:4] for r in rows] == [("o-1", "ada", "placed", 2), ("o-2", "ada", "cancelled", 1)]
    assert rows[0][4] is not None
    lines = orders_db.execute(
        "SELECT order_id, sku, quantity FROM example_order_lines ORDER BY 1, 2"
    ).fetchall()
    assert lines == [("o-1", "apple", 2), ("o-1", "pear", 1), ("o-2", "plum", 5)]
    # the built-in projection keeps working beside the user's
    assert scalar(orders_db, "SELECT reading_count FROM devices WHERE device_id = 'dev-1'") == 1


def test_user_events_are_applied_once_when_delivered_twice(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    orders_db: psycopg.Connection[Any],
) -> None:
    order = placed("o-dup", ("apple", 1))
    send(producer, topic, [order, cancelled("o-dup"), order])

    stats = run_until_idle(make_settings(handlers=HANDLERS), idle=2)

    assert stats.duplicates == 1
    assert orders_db.execute("SELECT status FROM example_orders").fetchall() == [("cancelled",)]


def test_a_handler_that_raises_for_a_bad_order_dead_letters_it_with_stage_handler(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    orders_db: psycopg.Connection[Any],
) -> None:
    bad = placed("o-empty")  # no lines: the handler refuses it
    send(producer, topic, [placed("o-1", ("apple", 1)), bad, placed("o-2", ("pear", 2))])

    stats = run_until_idle(make_settings(handlers=HANDLERS), idle=2)

    assert stats.failed == 1
    row = orders_db.execute(
        "SELECT stage, error_type, error_message, event_id, event_type, status, event_payload, "
        "error_traceback FROM dlq"
    ).fetchone()
    assert row is not None
    assert row[:6] == (
        "handler",
        "HandlerFailure",
        "order 'o-empty' has no lines",
        bad["id"],
        "order.placed",
        "pending",
    )
    assert bytes(row[6]) == k.structured(bad)
    assert "tests/example_handlers/orders.py" in row[7]
    assert [r[0] for r in orders_db.execute("SELECT order_id FROM example_orders ORDER BY 1")] == [
        "o-1",
        "o-2",
    ]


def test_an_order_rejected_half_way_through_its_writes_leaves_nothing_behind(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    orders_db: psycopg.Connection[Any],
) -> None:
    """The handler yields the order row and its first line, then raises at the bad second line.
    A rejected event must have no effect: its DLQ row is the whole story."""
    bad = placed("o-bad", ("apple", 1), ("pear", 0))
    send(producer, topic, [bad, placed("o-good", ("plum", 3))])

    stats = run_until_idle(make_settings(handlers=HANDLERS), idle=2)

    assert stats.failed == 1
    assert orders_db.execute("SELECT stage, event_id, error_message FROM dlq").fetchall() == [
        ("handler", bad["id"], "order 'o-bad': line 'pear' has quantity 0")
    ]
    assert orders_db.execute("SELECT order_id FROM example_orders").fetchall() == [("o-good",)]
    assert scalar(orders_db, "SELECT count(*) FROM example_order_lines WHERE order_id = 'o-bad'") == 0


def test_a_user_write_rejected_by_postgres_is_a_projection_failure_of_that_event_only(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    orders_db: psycopg.Connection[Any],
) -> None:
    bad = placed("o-nul", ("apple", 1), customer="nul \u0000 in name")
    send(producer, topic, [placed("o-1", ("apple", 1)), bad, placed("o-2", ("pear", 1))])

    stats = run_until_idle(make_settings(handlers=HANDLERS), idle=2)

    assert stats.failed == 1
    assert orders_db.execute("SELECT stage, event_id, event_type FROM dlq").fetchall() == [
        ("projection", bad["id"], "order.placed")
    ]
    assert [r[0] for r in orders_db.execute("SELECT order_id FROM example_orders ORDER BY 1")] == [
        "o-1",
        "o-2",
    ]
    assert scalar(orders_db, "SELECT count(*) FROM example_order_lines") == 2


def test_user_event_types_are_unknown_without_the_module(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    orders_db: psycopg.Connection[Any],
) -> None:
    send(producer, topic, [placed("o-1", ("apple", 1))])

    run_until_idle(make_settings(), idle=2)

    assert orders_db.execute("SELECT stage, error_type FROM dlq").fetchall() == [
        ("handler", "UnknownEventType")
    ]
    assert scalar(orders_db, "SELECT count(*) FROM example_orders") == 0


# -- loading ------------------------------------------------------------------------------------------------


def test_the_module_path_comes_from_eventhandler_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTHANDLER_HANDLERS", "tests.example_handlers.orders, other.module:thing")
    assert load_settings().handlers == ["tests.example_handlers.orders", "other.module:thing"]


@pytest.mark.parametrize("path", ["tests.example_handlers.orders", "tests.example_handlers.orders:orders"])
def test_a_module_or_a_module_attribute_adds_its_projection_beside_the_built_in_one(path: str) -> None:
    registry = load_registry([path])
    assert registry.projection_for("order.placed") is example.orders
    assert registry.projection_for("order.cancelled") is example.orders
    assert registry.payload_models["order.placed"] is example.OrderPlaced
    assert registry.projection_for("device.reading").name == "devices"


@pytest.mark.parametrize(
    ("paths", "reason"),
    [
        pytest.param(["tests.example_handlers.missing"], "No module named", id="no-module"),
        pytest.param(["no_such_package.orders"], "No module named", id="no-package"),
        pytest.param(["tests.example_handlers"], "projections", id="no-projections-attribute"),
        pytest.param(["tests.example_handlers.orders:nothing"], "nothing", id="no-such-attribute"),
        pytest.param(["tests.example_handlers.orders:SCHEMA"], "", id="not-a-projection"),
        pytest.param(
            ["tests.example_handlers.orders", "tests.example_handlers.orders:orders"],
            "'order.placed' is handled by both",
            id="type-claimed-twice",
        ),
    ],
)
def test_a_bad_module_path_is_a_config_error_naming_the_setting(paths: list[str], reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_registry(paths)
    assert info.value.setting == "EVENTHANDLER_HANDLERS"
    message = str(info.value)
    assert message.startswith("invalid setting EVENTHANDLER_HANDLERS: cannot load ")
    assert repr(paths[-1]) in message
    assert reason in message


def test_a_projection_claiming_a_built_in_type_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from pydantic import BaseModel

    rogue = SimpleProjection("rogue")
    rogue.on("device.reading", BaseModel)(lambda event: [])
    module = types.ModuleType("rogue_handlers")
    module.projections = rogue  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rogue_handlers", module)

    with pytest.raises(ConfigError, match=r"'device\.reading' is handled by both devices and rogue"):
        load_registry(["rogue_handlers"])


def test_the_worker_does_not_start_with_a_bad_module_path(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match="EVENTHANDLER_HANDLERS"):
        build_worker(make_settings(handlers=["tests.example_handlers.missing"]), serve_http=False)


def test_eventhandler_run_with_a_bad_module_path_fails_with_one_line_naming_the_setting(
    make_settings: Callable[..., Settings],
) -> None:
    env = settings_env(make_settings()) | {"EVENTHANDLER_HANDLERS": "tests.example_handlers.missing"}
    result = subprocess.run(
        [sys.executable, "-m", "eventhandler", "run", "--stop-when-idle", "1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "EVENTHANDLER_HANDLERS" in lines[0]
    assert "tests.example_handlers.missing" in lines[0]


def test_one_event_that_always_hits_the_statement_timeout_is_isolated_not_retried_forever(
    make_settings: Callable[..., Settings], producer: k.TestProducer, topic: str, db: psycopg.Connection[Any]
) -> None:
    """A statement timeout is the situation's or one event's: retried first, then, while PostgreSQL
    answers, the batch is bisected and the event that still times out is dead-lettered."""
    events = [k.registered(f"quick-{n}") for n in range(4)]
    slow = k.cloud_event("example.slow", {"seconds": 3})
    events.insert(2, slow)
    events += [k.cloud_event("example.slow", {"seconds": 0}), k.reading("quick-0")]
    send(producer, topic, events)
    settings = make_settings(handlers=["tests.example_handlers.slow"], db_statement_timeout_seconds=1.0)

    stats = run_until_idle(settings, idle=2)

    assert stats.retries >= 3  # retried as a transient failure first
    rows = db.execute("SELECT stage, event_id, error_type, error_message FROM dlq").fetchall()
    assert [(stage, event_id, error_type) for stage, event_id, error_type, _ in rows] == [
        ("projection", slow["id"], "ProjectionFailure")
    ]
    assert "statement timeout" in rows[0][3]
    assert scalar(db, "SELECT count(*) FROM devices") == 4
    assert scalar(db, "SELECT reading_count FROM devices WHERE device_id = 'quick-0'") == 1


def test_a_rejected_row_s_values_stay_out_of_the_error_the_traceback_and_the_log(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    orders_db: psycopg.Connection[Any],
) -> None:
    """PostgreSQL's DETAIL ("Failing row contains (…)") holds every value of the row: the DLQ row's
    error and traceback, which every reader of the API sees, and the log keep the message without it."""
    orders_db.execute(
        "ALTER TABLE example_orders ADD CONSTRAINT short_customer CHECK (length(customer) < 20)"
    )
    secret = "card-4111111111111111"
    send(producer, topic, [placed("o-leak", ("apple", 1), customer=secret)])
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)

    stats = run_until_idle(make_settings(handlers=HANDLERS), idle=2)

    assert stats.failed == 1
    error, traceback = orders_db.execute("SELECT error_message, error_traceback FROM dlq").fetchone()
    assert (
        error
        == 'new row for relation "example_orders" violates check constraint "short_customer" (SQLSTATE 23514)'
    )
    assert "short_customer" in traceback
    assert secret not in traceback
    assert "events_dead_lettered" in stream.getvalue()
    assert secret not in stream.getvalue()

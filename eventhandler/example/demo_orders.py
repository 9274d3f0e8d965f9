"""The demo's second story: failures that keep order (per-key parking), on the order lifecycle example.

Three orders go to a parking topic, keyed by order id. One is in a currency the shop does not accept
yet: its placement fails, and its payment and shipment are parked behind it instead of failing out of
order. The fix (accept the currency) and a replay of the one failed placement release them in order.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import psycopg
from confluent_kafka import Producer
from rich.table import Table

from eventhandler.models import DLQFilter
from eventhandler.service import DLQService

HANDLERS = "eventhandler.example.orders"
CURRENCIES = ("EUR", "EUR", "CHF")  # of the three orders; CHF is not accepted yet
LIFE = ("order.placed", "order.paid", "order.shipped")
FIX = "INSERT INTO order_currencies (code) VALUES ('CHF') ON CONFLICT DO NOTHING"


def orders(run_id: str) -> dict[str, str]:
    """This run's orders (a demo database given by the user keeps earlier runs' orders)."""
    return {f"order-{run_id}-{n}": currency for n, currency in enumerate(CURRENCIES, 1)}


def produce(bootstrap: str, topic: str, run_id: str) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    sent = 0
    for order_id, currency in orders(run_id).items():
        data = {
            "order.placed": {"order_id": order_id, "total": 49.9, "currency": currency},
            "order.paid": {"order_id": order_id, "amount": 49.9, "currency": currency},
            "order.shipped": {"order_id": order_id},
        }
        for event_type in LIFE:
            event = {
                "specversion": "1.0",
                "id": str(uuid.uuid4()),
                "source": "/demo/shop",
                "type": event_type,
                "time": datetime.now(UTC).isoformat(),
                "data": data[event_type],
            }
            producer.produce(topic, key=order_id, value=json.dumps(event).encode())
            sent += 1
    producer.flush(30)
    return sent


def parked_line(service: DLQService, consumer: str) -> str:
    """What an operator sees: the failed placement, and what waits behind it."""
    (blocker,) = service.list_rows(DLQFilter(consumer=consumer, event_type="order.placed"), limit=1)
    parked = service.count(DLQFilter(consumer=consumer, statuses=("parked",)))
    return (
        f"order.placed #{blocker.dlq_id} failed ({blocker.error_message}); {parked} later events of its "
        "order are parked behind it, not applied out of order"
    )


def replay_blocker(service: DLQService, consumer: str) -> int:
    flt = DLQFilter(consumer=consumer, event_type="order.placed", statuses=("pending",))
    return service.replay(flt, actor="demo").published


def in_order(url: str, run_id: str) -> bool:
    """Every order of the run ended with its whole life, in order, each event once."""
    mine = orders(run_id)
    with psycopg.connect(url) as conn:
        histories: dict[str, list[str]] = dict(
            conn.execute(
                "SELECT order_id, history FROM order_lifecycle WHERE order_id = ANY(%s)", (list(mine),)
            ).fetchall()
        )
    return histories == {order_id: list(LIFE) for order_id in mine}


def table(url: str, run_id: str) -> Table:
    shown = Table(title="order_lifecycle (projection)", title_justify="left", header_style="bold")
    for column in ("order", "status", "events applied, in order"):
        shown.add_column(column)
    with psycopg.connect(url) as conn:
        for order_id, status, history in conn.execute(
            "SELECT order_id, status, history FROM order_lifecycle WHERE order_id = ANY(%s) ORDER BY 1",
            (list(orders(run_id)),),
        ):
            shown.add_row(order_id, status, " → ".join(history))
    return shown

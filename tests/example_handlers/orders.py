"""A user projection of orders, loaded by module path (`EVENTHANDLER_HANDLERS=tests.example_handlers.orders`).

It owns its tables (`SCHEMA`, applied by whoever deploys it) and writes them with `SimpleProjection`
handler functions that return `Write`s. A handler raises `HandlerFailure` for an order it must reject;
the worker then dead-letters that event with stage `handler`.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field

from eventhandler.errors import HandlerFailure
from eventhandler.events import Event
from eventhandler.handlers import SimpleProjection, Write

SCHEMA = """
CREATE TABLE IF NOT EXISTS example_orders (
    order_id    text    PRIMARY KEY,
    customer    text    NOT NULL,
    status      text    NOT NULL DEFAULT 'placed',
    line_count  integer NOT NULL,
    placed_at   timestamptz
);
CREATE TABLE IF NOT EXISTS example_order_lines (
    order_id  text    NOT NULL REFERENCES example_orders (order_id),
    sku       text    NOT NULL,
    quantity  integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, sku)
);
"""

INSERT_ORDER = """
INSERT INTO example_orders (order_id, customer, line_count, placed_at) VALUES (%s, %s, %s, %s)
ON CONFLICT (order_id) DO NOTHING
"""
INSERT_LINE = """
INSERT INTO example_order_lines (order_id, sku, quantity) VALUES (%s, %s, %s)
ON CONFLICT (order_id, sku) DO NOTHING
"""
CANCEL_ORDER = "UPDATE example_orders SET status = 'cancelled' WHERE order_id = %s"


class OrderLine(BaseModel):
    model_config = ConfigDict(frozen=True)
    sku: str = Field(min_length=1)
    quantity: int


class OrderPlaced(BaseModel):
    model_config = ConfigDict(frozen=True)
    order_id: str = Field(min_length=1)
    customer: str
    lines: list[OrderLine]


class OrderCancelled(BaseModel):
    model_config = ConfigDict(frozen=True)
    order_id: str = Field(min_length=1)
    reason: str | None = None


orders = SimpleProjection("example-orders")


@orders.on("order.placed", OrderPlaced)
def placed(event: Event) -> Iterator[Write]:
    order: OrderPlaced = event.data  # type: ignore[assignment]
    if not order.lines:
        raise HandlerFailure(f"order {order.order_id!r} has no lines")
    yield Write(INSERT_ORDER, (order.order_id, order.customer, len(order.lines), event.time))
    for line in order.lines:
        if line.quantity <= 0:
            raise HandlerFailure(f"order {order.order_id!r}: line {line.sku!r} has quantity {line.quantity}")
        yield Write(INSERT_LINE, (order.order_id, line.sku, line.quantity))


@orders.on("order.cancelled", OrderCancelled)
def cancelled(event: Event) -> list[Write]:
    order: OrderCancelled = event.data  # type: ignore[assignment]
    return [Write(CANCEL_ORDER, (order.order_id,))]


projections = [orders]

"""An example projection where order matters: an order's lifecycle as a state machine.

    order.placed → order.paid → order.shipped        (order.cancelled from placed or paid)

An event that does not fit its order's state is a handler failure: `order.paid` for an order not
placed, `order.shipped` for one not paid, a payment in a currency the shop does not accept (the
`order_currencies` table) or of the wrong amount. So when one event of an order fails and the later ones
are applied anyway, the read model ends wrong — the failed payment replayed after the shipment is
refused, or the shipment is refused because the payment failed. Per-key parking keeps them in order: run
it with its topic in `EVENTHANDLER_PARKING`, keyed by order id, and the later events of an order wait
behind its failure and are released in order once it is fixed.

Load it with `EVENTHANDLER_HANDLERS=eventhandler.example.orders`; its tables come with the example's
migrations. `history` keeps the types of the events applied to an order, in the order they took effect,
and `event_ids` their ids: the tests compare them with each order's events in partition order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from eventhandler.errors import HandlerFailure
from eventhandler.events import Event
from eventhandler.handlers import Conn

ORDER_PLACED = "order.placed"
ORDER_PAID = "order.paid"
ORDER_SHIPPED = "order.shipped"
ORDER_CANCELLED = "order.cancelled"

OrderId = Field(min_length=1, max_length=64)
Currency = Field(pattern="^[A-Z]{3}$")


class OrderPlaced(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)
    order_id: str = OrderId
    total: float = Field(ge=0, le=1e12)
    currency: str = Currency


class OrderPaid(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)
    order_id: str = OrderId
    amount: float = Field(ge=0, le=1e12)
    currency: str = Currency


class OrderShipped(BaseModel):
    model_config = ConfigDict(frozen=True)
    order_id: str = OrderId


class OrderCancelled(BaseModel):
    model_config = ConfigDict(frozen=True)
    order_id: str = OrderId
    reason: str | None = Field(default=None, max_length=500)


LOAD_ORDERS = "SELECT order_id, status, total, currency FROM order_lifecycle WHERE order_id = ANY(%s)"
LOAD_CURRENCIES = "SELECT code FROM order_currencies"
UPSERT_ORDER = """
INSERT INTO order_lifecycle AS o (order_id, status, total, currency, paid, history, event_ids, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, now())
ON CONFLICT (order_id) DO UPDATE SET
    status = EXCLUDED.status, paid = coalesce(EXCLUDED.paid, o.paid),
    history = o.history || EXCLUDED.history, event_ids = o.event_ids || EXCLUDED.event_ids,
    updated_at = now()
"""

# what each event needs of its order's status, and the status it leaves
_TRANSITIONS = {
    ORDER_PAID: ({"placed"}, "paid"),
    ORDER_SHIPPED: ({"paid"}, "shipped"),
    ORDER_CANCELLED: ({"placed", "paid"}, "cancelled"),
}


@dataclass(slots=True)
class _Order:
    status: str
    total: float
    currency: str
    paid: float | None = None
    history: list[str] = field(default_factory=list)  # applied in this batch
    event_ids: list[str] = field(default_factory=list)


class OrderLifecycleProjection:
    name = "order-lifecycle"
    payload_models: dict[str, type[BaseModel]] = {  # noqa: RUF012 - read-only class data
        ORDER_PLACED: OrderPlaced,
        ORDER_PAID: OrderPaid,
        ORDER_SHIPPED: OrderShipped,
        ORDER_CANCELLED: OrderCancelled,
    }

    def begin(self, conn: Conn, events: Sequence[Event]) -> _OrderBatch:
        order_ids = list({e.data.order_id for e in events})  # type: ignore[attr-defined]
        rows = conn.execute(LOAD_ORDERS, (order_ids,)).fetchall() if order_ids else []
        currencies = {code for (code,) in conn.execute(LOAD_CURRENCIES).fetchall()}
        return _OrderBatch(
            {oid: _Order(status, total, currency) for oid, status, total, currency in rows}, currencies
        )


class _OrderBatch:
    def __init__(self, orders: dict[str, _Order], currencies: set[str]) -> None:
        self._orders = orders  # the state as of the event being handled
        self._currencies = currencies
        self._touched: set[str] = set()

    def handle(self, event: Event) -> None:
        data: Any = event.data
        order = self._orders.get(data.order_id)
        if event.type == ORDER_PLACED:
            if order is not None:
                raise HandlerFailure(f"order {data.order_id!r} was placed already")
            if data.currency not in self._currencies:
                raise HandlerFailure(f"currency {data.currency!r} is not accepted")
            order = self._orders[data.order_id] = _Order("placed", data.total, data.currency)
        else:
            if order is None:
                raise HandlerFailure(f"order {data.order_id!r} was not placed")
            needs, becomes = _TRANSITIONS[event.type]
            if order.status not in needs:
                raise HandlerFailure(
                    f"order {data.order_id!r} is {order.status}: it cannot take {event.type}"
                )
            if event.type == ORDER_PAID:
                if data.currency not in self._currencies:
                    raise HandlerFailure(f"currency {data.currency!r} is not accepted")
                if data.currency != order.currency or data.amount != order.total:
                    raise HandlerFailure(
                        f"order {data.order_id!r} is {order.total} {order.currency}: a payment of "
                        f"{data.amount} {data.currency} does not settle it"
                    )
                order.paid = data.amount
            order.status = becomes
        order.history.append(event.type)
        order.event_ids.append(event.id)
        self._touched.add(data.order_id)

    def flush(self, conn: Conn) -> None:
        if not self._touched:
            return
        rows = [
            (oid, o.status, o.total, o.currency, o.paid, o.history, o.event_ids)
            for oid, o in (
                (oid, self._orders[oid]) for oid in sorted(self._touched)
            )  # key order: no deadlocks
        ]
        with conn.cursor() as cur:
            cur.executemany(UPSERT_ORDER, rows)  # pipelined: one round trip for the batch


projections = [OrderLifecycleProjection()]

"""Handlers: how events become projection writes, and the registry that routes them by type.

A `Projection` owns some event types. For each batch the worker calls `begin()` once (one query to
load whatever state the batch needs), `handle()` for every event in order (raise to reject one event:
a handler failure), then `flush()` to write the result inside the batch's transaction. This keeps the
hot path at a few statements per batch instead of one per event.

For handlers where one statement per event is fine, `SimpleProjection` takes plain functions that
return `Write`s; they are sent pipelined, so a batch still costs one round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import sql
from pydantic import BaseModel

from eventhandler.events import Event

Conn = psycopg.Connection[Any]


class BatchHandler(Protocol):
    def handle(self, event: Event) -> None:
        """Take one event into the batch, or raise to reject it (it goes to the DLQ)."""
        ...

    def flush(self, conn: Conn) -> None:
        """Write what the accepted events changed, inside the caller's transaction."""
        ...


class Projection(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def payload_models(self) -> Mapping[str, type[BaseModel]]:
        """The event types this projection handles, each with the model its `data` must fit."""
        ...

    def begin(self, conn: Conn, events: Sequence[Event]) -> BatchHandler: ...


@dataclass(frozen=True, slots=True)
class Write:
    """One parameterised statement. `query` is a constant or a `psycopg.sql` composition."""

    query: str | sql.Composable
    params: Sequence[Any] | Mapping[str, Any] = ()


P = TypeVar("P", bound=BaseModel)
WriteFn = Callable[[Event], Iterable[Write]]


class SimpleProjection:
    """Per-event handler functions, registered with a decorator:

    orders = SimpleProjection("orders")

    @orders.on("order.created", OrderCreated)
    def created(event: Event) -> list[Write]:
        return [Write("INSERT INTO orders (id, total) VALUES (%s, %s)", (event.data.id, event.data.total))]
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.payload_models: dict[str, type[BaseModel]] = {}
        self._functions: dict[str, WriteFn] = {}

    def on(self, event_type: str, model: type[BaseModel]) -> Callable[[WriteFn], WriteFn]:
        def register(fn: WriteFn) -> WriteFn:
            self.payload_models[event_type] = model
            self._functions[event_type] = fn
            return fn

        return register

    def begin(self, conn: Conn, events: Sequence[Event]) -> BatchHandler:
        return _SimpleBatch(self._functions)


class _SimpleBatch:
    def __init__(self, functions: Mapping[str, WriteFn]) -> None:
        self._functions = functions
        self._writes: list[Write] = []

    def handle(self, event: Event) -> None:
        writes = list(self._functions[event.type](event))  # all of an event's writes, or none of them
        self._writes.extend(writes)

    def flush(self, conn: Conn) -> None:
        if not self._writes:
            return
        with conn.pipeline(), conn.cursor() as cur:
            for write in self._writes:
                cur.execute(write.query, write.params)  # type: ignore[arg-type]


class Registry:
    """Event type → the projection that handles it. Two projections may not claim one type."""

    def __init__(self, projections: Iterable[Projection] = ()) -> None:
        self._by_type: dict[str, Projection] = {}
        self.projections: list[Projection] = []
        for projection in projections:
            self.add(projection)

    def add(self, projection: Projection) -> None:
        for event_type in projection.payload_models:
            owner = self._by_type.get(event_type)
            if owner is not None:
                raise ValueError(
                    f"event type {event_type!r} is handled by both {owner.name} and {projection.name}"
                )
        for event_type in projection.payload_models:
            self._by_type[event_type] = projection
        self.projections.append(projection)

    def projection_for(self, event_type: str) -> Projection:
        return self._by_type[event_type]

    @property
    def payload_models(self) -> dict[str, type[BaseModel]]:
        return {t: p.payload_models[t] for t, p in self._by_type.items()}

"""The built-in projection of the example domain: devices that register, report and retire.

State the batch needs (which devices exist and whether they are active) is loaded with one query;
events are then applied in order in memory, and `flush` writes the net result with four set-based
statements, whatever the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from eventhandler.errors import HandlerFailure
from eventhandler.events import Event
from eventhandler.handlers import Conn

DEVICE_REGISTERED = "device.registered"
DEVICE_READING = "device.reading"
DEVICE_DECOMMISSIONED = "device.decommissioned"


class DeviceRegistered(BaseModel):
    model_config = ConfigDict(frozen=True)
    device_id: str = Field(min_length=1, max_length=64)
    name: str
    site: str | None = None


class DeviceReading(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)
    device_id: str = Field(min_length=1, max_length=64)
    metric: str = Field(min_length=1)
    value: float
    unit: str | None = None


class DeviceDecommissioned(BaseModel):
    model_config = ConfigDict(frozen=True)
    device_id: str = Field(min_length=1, max_length=64)


LOAD_STATUS = "SELECT device_id, status FROM devices WHERE device_id = ANY(%b)"
UPSERT_DEVICES = """
INSERT INTO devices (device_id, name, site, status, registered_at)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[])
ON CONFLICT (device_id) DO UPDATE SET
    name = EXCLUDED.name, site = EXCLUDED.site, status = EXCLUDED.status,
    registered_at = coalesce(devices.registered_at, EXCLUDED.registered_at), updated_at = now()
"""
DECOMMISSION = """
UPDATE devices SET status = 'decommissioned', updated_at = now() WHERE device_id = ANY(%b)
"""
ADD_READINGS = """
UPDATE devices SET reading_count = devices.reading_count + d.n, updated_at = now()
FROM unnest(%b::text[], %b::bigint[]) AS d(device_id, n)
WHERE devices.device_id = d.device_id
"""
UPSERT_LATEST = """
INSERT INTO device_latest_readings (device_id, metric, value, unit, observed_at, event_id)
SELECT * FROM unnest(%b::text[], %b::text[], %b::float8[], %b::text[], %b::timestamptz[], %b::text[])
ON CONFLICT (device_id, metric) DO UPDATE SET
    value = EXCLUDED.value, unit = EXCLUDED.unit, observed_at = EXCLUDED.observed_at,
    event_id = EXCLUDED.event_id
WHERE EXCLUDED.observed_at >= device_latest_readings.observed_at
"""


@dataclass(slots=True)
class _Registration:
    name: str
    site: str | None
    status: str
    at: datetime


@dataclass(slots=True)
class _Latest:
    value: float
    unit: str | None
    at: datetime
    event_id: str


class DeviceProjection:
    name = "devices"
    payload_models: dict[str, type[BaseModel]] = {  # noqa: RUF012 - read-only class data
        DEVICE_REGISTERED: DeviceRegistered,
        DEVICE_READING: DeviceReading,
        DEVICE_DECOMMISSIONED: DeviceDecommissioned,
    }

    def begin(self, conn: Conn, events: Sequence[Event]) -> _DeviceBatch:
        device_ids = list({e.data.device_id for e in events})  # type: ignore[attr-defined]
        rows = conn.execute(LOAD_STATUS, (device_ids,)).fetchall() if device_ids else []
        return _DeviceBatch({device_id: status for device_id, status in rows})


class _DeviceBatch:
    def __init__(self, status: dict[str, str]) -> None:
        self._status = status  # the state as of the event being handled
        self._registrations: dict[str, _Registration] = {}
        self._decommissioned: set[str] = set()
        self._reading_counts: dict[str, int] = {}
        self._latest: dict[tuple[str, str], _Latest] = {}
        self._now = datetime.now(UTC)

    def handle(self, event: Event) -> None:
        data: Any = event.data
        at = event.time or self._now
        if event.type == DEVICE_READING:
            status = self._status.get(data.device_id)
            if status is None:
                raise HandlerFailure(f"device {data.device_id!r} is not registered")
            if status != "active":
                raise HandlerFailure(f"device {data.device_id!r} is {status}")
            self._reading_counts[data.device_id] = self._reading_counts.get(data.device_id, 0) + 1
            key = (data.device_id, data.metric)
            current = self._latest.get(key)
            if current is None or at >= current.at:
                self._latest[key] = _Latest(data.value, data.unit, at, event.id)
        elif event.type == DEVICE_REGISTERED:
            self._status[data.device_id] = "active"
            self._registrations[data.device_id] = _Registration(data.name, data.site, "active", at)
            self._decommissioned.discard(data.device_id)
        elif event.type == DEVICE_DECOMMISSIONED:
            if data.device_id not in self._status:
                raise HandlerFailure(f"device {data.device_id!r} is not registered")
            self._status[data.device_id] = "decommissioned"
            registration = self._registrations.get(data.device_id)
            if registration is not None:
                registration.status = "decommissioned"
            else:
                self._decommissioned.add(data.device_id)

    def flush(self, conn: Conn) -> None:
        # Rows are written in key order: two workers writing the same devices (around a rebalance)
        # then take their row locks in the same order, and cannot deadlock.
        if self._registrations:
            regs = dict(sorted(self._registrations.items()))
            conn.execute(
                UPSERT_DEVICES,
                (
                    list(regs),
                    [r.name for r in regs.values()],
                    [r.site for r in regs.values()],
                    [r.status for r in regs.values()],
                    [r.at for r in regs.values()],
                ),
            )
        if self._decommissioned:
            conn.execute(DECOMMISSION, (sorted(self._decommissioned),))
        if self._reading_counts:
            counts = dict(sorted(self._reading_counts.items()))
            conn.execute(ADD_READINGS, (list(counts), list(counts.values())))
        if self._latest:
            latest = dict(sorted(self._latest.items()))
            conn.execute(
                UPSERT_LATEST,
                (
                    [k[0] for k in latest],
                    [k[1] for k in latest],
                    [v.value if math.isfinite(v.value) else None for v in latest.values()],
                    [v.unit for v in latest.values()],
                    [v.at for v in latest.values()],
                    [v.event_id for v in latest.values()],
                ),
            )

"""The messages the scenarios consume, and the producers that put them on the broker.

Events are structured-mode CloudEvents of about 200 bytes, keyed by device so that a device's
registration and its readings share a partition (the worker keeps per-partition order). Poison is
the same mix the fault tests use: half not JSON, half readings for devices never registered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Producer

METRICS = ("temperature", "humidity", "pressure", "co2")
_UNITS = {"temperature": "C", "humidity": "%", "pressure": "hPa", "co2": "ppm"}

Message = tuple[bytes, bytes]  # (key, value)


def device_name(n: int) -> str:
    return f"dev-{n:05d}"


def _event(event_type: str, event_id: str, at: str, data: dict[str, Any]) -> bytes:
    envelope = {
        "specversion": "1.0",
        "id": event_id,
        "source": "/bench",
        "type": event_type,
        "time": at,
        "data": data,
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def registration(device: str, at: str) -> bytes:
    return _event("device.registered", f"reg-{device}", at, {"device_id": device, "name": device.upper()})


def reading(n: int, device: str, at: str, tag: str) -> bytes:
    metric = METRICS[n % len(METRICS)]
    data = {"device_id": device, "metric": metric, "value": round(n * 0.01, 2), "unit": _UNITS[metric]}
    return _event("device.reading", f"{tag}-{n}", at, data)


def poison(n: int, at: str, tag: str) -> Message:
    if n % 2:
        return b"poison", b"{not json " + str(n).encode()
    return b"poison", reading(n, f"ghost-{n}", at, tag)


@dataclass(frozen=True)
class Workload:
    """`events` messages after the registrations; every `poison_every`-th one is poison (1 = all)."""

    devices: int
    events: int
    poison_every: int = 0
    tag: str = "ev"

    @property
    def poison(self) -> int:
        return self.events // self.poison_every if self.poison_every else 0

    @property
    def readings(self) -> int:
        return self.events - self.poison

    @property
    def registrations(self) -> int:
        return self.devices if self.readings else 0

    @property
    def messages(self) -> int:
        return self.registrations + self.events

    def __iter__(self) -> Iterator[Message]:
        at = datetime.now(UTC).isoformat()
        devices = [device_name(i) for i in range(self.devices)]
        if self.readings:
            for device in devices:
                yield device.encode(), registration(device, at)
        for n in range(1, self.events + 1):
            if self.poison_every and n % self.poison_every == 0:
                yield poison(n, at, self.tag)
            else:
                device = devices[n % len(devices)]
                yield device.encode(), reading(n, device, at, self.tag)


@dataclass(frozen=True)
class Produced:
    messages: int
    bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


class BulkProducer:
    """Produces as fast as the broker takes it and fails loudly if any delivery failed."""

    def __init__(self, bootstrap: str, **config: Any) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 20,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 200_000,
            }
            | config
        )
        self._errors: list[str] = []

    def send(self, topic: str, key: bytes | None, value: bytes | None, **kwargs: Any) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=self._delivered, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.05)

    def poll(self) -> None:
        """Serve delivery reports without waiting."""
        self._producer.poll(0)

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def flush(self, timeout: float = 120) -> None:
        remaining = self._producer.flush(timeout)
        if remaining or self._errors:
            raise RuntimeError(f"produce failed: {remaining} undelivered, errors: {self._errors[:3]}")


def produce(bootstrap: str, topic: str, messages: Iterator[Message] | Workload) -> Produced:
    producer = BulkProducer(bootstrap)
    count = size = 0
    started = time.perf_counter()
    for key, value in messages:
        producer.send(topic, key, value)
        count += 1
        size += len(value)
    producer.flush()
    return Produced(count, size, time.perf_counter() - started)


def produce_steadily(bootstrap: str, topic: str, devices: int, rate: float, seconds: float) -> float:
    """Readings at a steady `rate`, paced every 5 ms (run in a child process so that the producer
    does not compete with the worker for the GIL). Returns the rate achieved."""
    producer = BulkProducer(bootstrap, **{"linger.ms": 5})
    names = [device_name(i) for i in range(devices)]
    total = int(rate * seconds)
    started = time.monotonic()
    for n in range(1, total + 1):
        device = names[n % len(names)]
        producer.send(topic, device.encode(), reading(n, device, datetime.now(UTC).isoformat(), "lat"))
        if n % 10 == 0:
            producer.poll()
            ahead = n / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)  # pacing the stream, not waiting for a condition
    elapsed = time.monotonic() - started
    producer.flush()
    return total / elapsed

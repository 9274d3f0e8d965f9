"""Kafka helpers for tests: topics, producing CloudEvents (both bindings) and raw bytes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

# Classic group protocol: Tansu makes a new group's first join wait about half the session timeout, and
# a killed member holds its partitions for a session timeout: keep it short so tests don't wait.
TEST_CONSUMER_OPTIONS: dict[str, Any] = {
    "session.timeout.ms": 3000,
    "heartbeat.interval.ms": 300,
    "topic.metadata.refresh.interval.ms": 2000,
}

# Under the KIP-848 protocol the broker owns the session timeout and the heartbeat (the test broker
# sets 3 s and 300 ms, see tests/support/apache_kafka.py); the client may not set them.
KIP848_CONSUMER_OPTIONS: dict[str, Any] = {
    "group.protocol": "consumer",
    "topic.metadata.refresh.interval.ms": 2000,
}

# For tests that run under both group protocols; KIP-848 needs Apache Kafka >= 4.0 (not Tansu).
GROUP_PROTOCOLS = ["classic", pytest.param("consumer", marks=pytest.mark.apache_kafka)]


def consumer_options(group_protocol: str) -> dict[str, Any]:
    return KIP848_CONSUMER_OPTIONS if group_protocol == "consumer" else TEST_CONSUMER_OPTIONS


Headers = list[tuple[str, bytes | None]]


def create_topic(
    bootstrap: str, name: str, partitions: int = 4, config: dict[str, str] | None = None
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
    futures = admin.create_topics([topic])
    for future in futures.values():
        future.result(timeout=30)


def cloud_event(
    event_type: str,
    data: Any,
    *,
    event_id: str | None = None,
    source: str = "/tests",
    time: datetime | None = None,
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": event_type,
        "time": (time or datetime.now(UTC)).isoformat(),
        "datacontenttype": "application/json",
        "data": data,
    }


def structured(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def registered(
    device_id: str, name: str | None = None, site: str | None = "lab", **kw: Any
) -> dict[str, Any]:
    return cloud_event(
        "device.registered", {"device_id": device_id, "name": name or device_id.upper(), "site": site}, **kw
    )


def reading(device_id: str, value: float = 21.5, metric: str = "temperature", **kw: Any) -> dict[str, Any]:
    return cloud_event(
        "device.reading", {"device_id": device_id, "metric": metric, "value": value, "unit": "C"}, **kw
    )


def decommissioned(device_id: str, **kw: Any) -> dict[str, Any]:
    return cloud_event("device.decommissioned", {"device_id": device_id}, **kw)


class TestProducer:
    """Produces and waits for every delivery report; raises if any failed."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, bootstrap: str, **config: Any) -> None:
        # librdkafka's own stderr log only for critical errors: delivery failures are raised by flush().
        base = {"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True, "log_level": 2}
        self._producer = Producer(base | config)
        self._errors: list[str] = []

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = None,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"value": value, "key": key, "on_delivery": self._delivered}
        if headers:
            kwargs["headers"] = list(headers)
        if partition is not None:
            kwargs["partition"] = partition
        if timestamp_ms is not None:
            kwargs["timestamp"] = timestamp_ms
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                self._producer.poll(0.1)
        self._producer.poll(0)

    def send_events(self, topic: str, events: Iterable[dict[str, Any]]) -> int:
        count = 0
        for event in events:
            key = event["data"].get("device_id") if isinstance(event.get("data"), dict) else None
            self.send(topic, structured(event), key=key)
            count += 1
        return count

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def flush(self, timeout: float = 60) -> None:
        remaining = self._producer.flush(timeout)
        if remaining or self._errors:
            raise AssertionError(f"produce failed: {remaining} undelivered, errors: {self._errors[:5]}")


class Stream:
    """A steady stream of readings for registered devices, with a poison message every `poison_every`.

    Runs in a thread; `expected_readings` and `expected_poison` say what the projections and the DLQ
    must show once everything is processed.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        devices: int = 20,
        total: int = 20_000,
        rate: float = 2_000,
        poison_every: int = 500,
    ) -> None:
        import threading

        self.topic = topic
        self.devices = [f"stream-{i}" for i in range(devices)]
        self.total = total
        self.rate = rate
        self.poison_every = poison_every
        self.expected_readings = 0
        self.expected_poison = 0
        self.sent = 0
        self._producer = TestProducer(bootstrap)
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)
        self.error: BaseException | None = None

    def register_devices(self) -> None:
        self._producer.send_events(self.topic, [registered(d) for d in self.devices])
        self._producer.flush()

    def start(self) -> Stream:
        self._thread.start()
        return self

    def _run(self) -> None:
        import time

        try:
            started = time.monotonic()
            for n in range(1, self.total + 1):
                if n % self.poison_every == 0:
                    if (n // self.poison_every) % 2:
                        self._producer.send(self.topic, b"{not json " + str(n).encode(), key=b"poison")
                    else:
                        self._producer.send(self.topic, structured(reading(f"ghost-{n}")), key=b"poison")
                    self.expected_poison += 1
                else:
                    device = self.devices[n % len(self.devices)]
                    self._producer.send(self.topic, structured(reading(device, value=n)), key=device)
                    self.expected_readings += 1
                self.sent = n
                ahead = n / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)  # pacing the stream, not waiting for a condition
            self._producer.flush()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stream did not finish"
        if self.error:
            raise self.error

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

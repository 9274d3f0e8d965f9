"""Produce a message whose header keys are any bytes: the Python client turns a header key into `str`
(a `bytes` key becomes its repr), so it cannot write a key that is not UTF-8, while librdkafka, the
Java and the Go clients can. This goes through the product's own `RawProducer` (librdkafka's C API)."""

from __future__ import annotations

from collections.abc import Sequence

from eventhandler.librdkafka import RawProducer


def produce_raw(
    bootstrap: str,
    topic: str,
    partition: int,
    value: bytes | None,
    key: bytes | None,
    headers: Sequence[tuple[bytes, bytes | None]],
) -> None:
    """Produce one message and wait until the broker confirmed it."""
    producer = RawProducer({"bootstrap.servers": bootstrap, "acks": "all"})
    try:
        refused = producer.produce(1, topic, value, key, list(headers), partition=partition)
        assert refused is None, refused
        assert producer.flush(30) == 0, "the raw message was not delivered within 30 s"
        assert producer.outcomes == {1: None}, producer.outcomes
    finally:
        producer.close()

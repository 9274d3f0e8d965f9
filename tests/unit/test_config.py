from __future__ import annotations

import re
import subprocess
import sys

import pytest

from eventhandler.config import load_settings
from eventhandler.errors import ConfigError


def test_defaults_work_on_a_developer_machine() -> None:
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.dsn.startswith("postgresql://")
    assert settings.topics == ["device-events"]
    assert settings.consumer_group == "eventhandler"


def test_settings_come_from_the_fixed_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTHANDLER_KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("EVENTHANDLER_DATABASE_URL", "postgresql://app:pw@db:5432/app")
    monkeypatch.setenv("EVENTHANDLER_TOPICS", "a, b ,c")
    monkeypatch.setenv("EVENTHANDLER_CONSUMER_GROUP", "projections")
    monkeypatch.setenv("EVENTHANDLER_METRICS_PORT", "9999")
    monkeypatch.setenv("EVENTHANDLER_ADMIN_TOKEN", "s3cret-token-0123456789")
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.topics == ["a", "b", "c"]
    assert settings.consumer_group == "projections"
    assert settings.metrics_port == 9999
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "s3cret-token-0123456789"
    assert "pw" not in repr(settings)


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(Exception, match="frozen"):
        settings.consumer_group = "other"  # type: ignore[misc]


def test_librdkafka_options_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "EVENTHANDLER_KAFKA_OPTIONS", '{"security.protocol": "SASL_SSL", "socket.timeout.ms": 1000}'
    )
    monkeypatch.setenv("EVENTHANDLER_KAFKA_CONSUMER_OPTIONS", '{"fetch.max.bytes": 1048576}')
    config = load_settings().consumer_config()
    assert config["security.protocol"] == "SASL_SSL"
    assert config["socket.timeout.ms"] == 1000
    assert config["fetch.max.bytes"] == 1048576
    assert config["enable.auto.commit"] is False


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("EVENTHANDLER_DATABASE_URL", "not a url", "must be a postgresql:// URL"),
        ("EVENTHANDLER_DATABASE_URL", "postgresql://h:99999/db", "invalid port"),
        ("EVENTHANDLER_TOPICS", " , ", "at least one topic"),
        ("EVENTHANDLER_TOPICS", "ok,bad topic", "not a valid Kafka topic name"),
        ("EVENTHANDLER_METRICS_PORT", "70000", "less than or equal to 65535"),
        ("EVENTHANDLER_METRICS_PORT", "abc", "valid integer"),
        ("EVENTHANDLER_CONSUMER_GROUP", "  ", "must not be empty"),
        ("EVENTHANDLER_ADMIN_TOKEN", "short", "at least 16 characters"),
        ("EVENTHANDLER_ADMIN_TOKEN", " " * 20, "without spaces"),
        ("EVENTHANDLER_ADMIN_READ_TOKEN", "token with spaces inside", "without spaces"),
        ("EVENTHANDLER_KAFKA_OPTIONS", "[1, 2]", "JSON object"),
        ("EVENTHANDLER_UNKNOWN_EVENT_POLICY", "explode", "dead-letter"),
        ("EVENTHANDLER_API_REDACT_FIELDS", "data..password", "empty segment"),
        ("EVENTHANDLER_FLOOD_GUARD", "maybe", "valid boolean"),
        ("EVENTHANDLER_FLOOD_RATIO", "1.5", "less than or equal to 1"),
        ("EVENTHANDLER_FLOOD_RATIO", "0", "greater than 0"),
        ("EVENTHANDLER_FLOOD_MIN_FAILURES", "0", "greater than or equal to 1"),
        ("EVENTHANDLER_FLOOD_MIN_KEYS", "many", "valid integer"),
        ("EVENTHANDLER_FLOOD_WINDOW_SECONDS", "-1", "greater than 0"),
        ("EVENTHANDLER_FLOOD_PROBE_SECONDS", "nan", "less than or equal to 3600"),
        ("EVENTHANDLER_PROCESSES", "0", "between 1 and 256, or auto"),
        ("EVENTHANDLER_PROCESSES", "257", "between 1 and 256, or auto"),
        ("EVENTHANDLER_PROCESSES", "2.5", "whole number of processes or auto"),
        ("EVENTHANDLER_PROCESSES", "\u00b2", "whole number of processes or auto"),
        ("EVENTHANDLER_PROCESSES", "all", "whole number of processes or auto"),
    ],
)
def test_a_bad_value_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, reason: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"invalid setting {variable}: ")
    assert reason in str(caught.value)


def test_the_command_stops_at_start_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "EVENTHANDLER_METRICS_PORT": "-1",
        "EVENTHANDLER_DATABASE_URL": "postgresql://u:hunter2@nowhere/db",
    }
    result = subprocess.run(
        [sys.executable, "-m", "eventhandler", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: invalid setting EVENTHANDLER_METRICS_PORT: Input should be greater than or equal to 0"
    ]
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("variable", "options", "named"),
    [
        (
            "EVENTHANDLER_KAFKA_CONSUMER_OPTIONS",
            '{"group.protocol": "consumer", "session.timeout.ms": 3000}',
            "session.timeout.ms",
        ),
        (
            "EVENTHANDLER_KAFKA_CONSUMER_OPTIONS",
            '{"group.protocol": "consumer", "heartbeat.interval.ms": 300}',
            "heartbeat.interval.ms",
        ),
        (
            "EVENTHANDLER_KAFKA_CONSUMER_OPTIONS",
            '{"group.protocol": "consumer", "partition.assignment.strategy": "range"}',
            "partition.assignment.strategy",
        ),
        ("EVENTHANDLER_KAFKA_CONSUMER_OPTIONS", '{"group.protocol": "eager"}', "group.protocol"),
    ],
)
def test_kip848_refuses_the_client_options_the_broker_owns(
    monkeypatch: pytest.MonkeyPatch, variable: str, options: str, named: str
) -> None:
    monkeypatch.setenv(variable, options)
    with pytest.raises(ConfigError, match=re.escape(named)) as caught:
        load_settings()
    assert caught.value.setting == "EVENTHANDLER_KAFKA_CONSUMER_OPTIONS"


def test_kip848_protocol_set_for_every_client_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTHANDLER_KAFKA_OPTIONS", '{"group.protocol": "consumer"}')
    monkeypatch.setenv("EVENTHANDLER_KAFKA_CONSUMER_OPTIONS", '{"session.timeout.ms": 3000}')
    with pytest.raises(ConfigError, match=r"session\.timeout\.ms"):
        load_settings()
    monkeypatch.setenv("EVENTHANDLER_KAFKA_CONSUMER_OPTIONS", '{"max.poll.interval.ms": 600000}')
    config = load_settings().consumer_config()
    assert config["group.protocol"] == "consumer"


def test_the_consumer_protocol_rebalances_incrementally() -> None:
    from eventhandler.source import is_incremental

    assert not is_incremental({})
    assert not is_incremental({"group.protocol": "classic", "partition.assignment.strategy": "range"})
    assert is_incremental({"partition.assignment.strategy": "cooperative-sticky"})
    assert is_incremental({"group.protocol": "consumer"})


def test_the_read_only_token_must_differ_from_the_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same value would make every "reader" an admin (the first configured role wins)."""
    monkeypatch.setenv("EVENTHANDLER_ADMIN_TOKEN", "the-same-token-0123456789")
    monkeypatch.setenv("EVENTHANDLER_ADMIN_READ_TOKEN", "the-same-token-0123456789")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("invalid setting EVENTHANDLER_ADMIN_READ_TOKEN: must differ")
    assert "the-same-token" not in str(caught.value)

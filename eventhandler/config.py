"""Settings: one frozen tree read from `EVENTHANDLER_*` environment variables.

Nothing here runs at import time; `load_settings()` is called by the command line entry point.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Annotated, Any, Literal

from psycopg.conninfo import conninfo_to_dict
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from eventhandler.errors import ConfigError

ENV_PREFIX = "EVENTHANDLER_"

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
PARKING_KEYS = ("", "subject", "partitionkey")  # "": the Kafka message key
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # RFC 6750 allows fewer; this refuses whitespace and control bytes

GROUP_PROTOCOLS = ("classic", "consumer")
# Client options of the classic group protocol that the KIP-848 protocol moves to the broker.
BROKER_SIDE_UNDER_KIP848 = frozenset(
    {"session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy", "group.protocol.type"}
)

KafkaOptions = Annotated[dict[str, str | int | float | bool], NoDecode]


def _decode_options(value: Any) -> Any:
    """librdkafka options arrive as a JSON object, e.g. '{"security.protocol": "SASL_SSL"}'."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object: {exc.msg}") from exc
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object of librdkafka options")
    return value


class Settings(BaseSettings):
    """Every knob of the worker, the replayer and the admin API."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        case_sensitive=False,
    )

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/eventhandler")
    topics: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["device-events"])
    consumer_group: str = "eventhandler"
    metrics_port: int = Field(default=9180, ge=0, le=65535)
    admin_token: SecretStr | None = None
    admin_read_token: SecretStr | None = None

    # librdkafka pass-through: applied to every client, then the client-specific dict on top.
    kafka_options: KafkaOptions = Field(default_factory=dict)
    kafka_consumer_options: KafkaOptions = Field(default_factory=dict)
    kafka_producer_options: KafkaOptions = Field(default_factory=dict)

    batch_max_messages: int = Field(default=5000, ge=1, le=100_000)
    batch_max_wait_seconds: float = Field(default=0.2, gt=0, le=60)
    unknown_event_policy: Literal["dead-letter", "skip"] = "dead-letter"
    handlers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Topics whose events keep their order around a failure: `topic` (keyed by the Kafka message key)
    # or `topic:subject` / `topic:partitionkey` (keyed by that CloudEvents attribute).
    parking: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # The flood guard (`eventhandler.flood`): a failure is systemic, and holds the line instead of
    # dead-lettering the stream, when over the last `flood_window_seconds` one fingerprint failed at
    # least `flood_min_failures` messages of at least `flood_min_keys` distinct keys, and at least
    # `flood_ratio` of the messages read. While open, the held batch is tried again every
    # `flood_probe_seconds`.
    flood_guard: bool = True
    flood_window_seconds: float = Field(default=60.0, gt=0, le=86_400)
    flood_min_failures: int = Field(default=50, ge=1, le=1_000_000)
    flood_min_keys: int = Field(default=10, ge=1, le=10_000)
    flood_ratio: float = Field(default=0.5, gt=0, le=1)
    flood_probe_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Payload fields the admin API masks in responses, as dotted paths (e.g. data.password, data.*.secret).
    api_redact_fields: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Addresses (or networks) of reverse proxies whose X-Forwarded-For the admin API believes.
    api_trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    console_secure_cookie: bool = False  # the console's cookie is Secure even over plain HTTP (a TLS proxy)

    retry_initial_seconds: float = Field(default=0.2, gt=0, le=60)
    retry_max_seconds: float = Field(default=15.0, gt=0, le=600)
    db_pool_size: int = Field(default=4, ge=1, le=100)
    db_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    db_statement_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    dlq_refresh_seconds: float = Field(default=15.0, gt=0, le=3600)
    ledger_retention_hours: float = Field(default=168.0, gt=0)

    # Worker processes of `eventhandler run` (`eventhandler.processes`): a number, or `auto` for the
    # cores this container may use. Kept as given; `processes.count` resolves `auto`.
    processes: Annotated[int | Literal["auto"], NoDecode] = 1

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    worker_id: str | None = None

    @field_validator(
        "topics", "handlers", "api_redact_fields", "api_trusted_proxies", "parking", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_trusted_proxies")
    @classmethod
    def _valid_proxies(cls, value: list[str]) -> list[str]:
        for proxy in value:
            try:
                ipaddress.ip_network(proxy)  # strict: 10.0.0.1/24 (host bits set) is a typo, not a network
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address or network") from None
        return value

    @field_validator("api_redact_fields")
    @classmethod
    def _valid_redact_fields(cls, value: list[str]) -> list[str]:
        for path in value:
            if not all(segment.strip() for segment in path.split(".")):
                raise ValueError(f"redaction field {path!r} has an empty segment")
        return value

    @field_validator("topics")
    @classmethod
    def _valid_topics(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one topic is required")
        for topic in value:
            if not _TOPIC_NAME.match(topic):
                raise ValueError(f"{topic!r} is not a valid Kafka topic name")
        return value

    @field_validator("parking")
    @classmethod
    def _valid_parking(cls, value: list[str]) -> list[str]:
        for entry in value:
            topic, _, attribute = entry.partition(":")
            if not _TOPIC_NAME.match(topic):
                raise ValueError(f"{topic!r} is not a valid Kafka topic name")
            if attribute not in PARKING_KEYS:
                raise ValueError(
                    f"{entry!r}: park by the message key (`{topic}`) or by "
                    + " or ".join(f"`{topic}:{name}`" for name in PARKING_KEYS if name)
                )
        return value

    def parking_keys(self) -> dict[str, str]:
        """Topic → what keys its parking: "" (the Kafka message key) or a CloudEvents attribute."""
        keys = {}
        for entry in self.parking:
            topic, _, attribute = entry.partition(":")
            keys[topic] = attribute
        return keys

    @field_validator("processes", mode="before")
    @classmethod
    def _valid_processes(cls, value: Any) -> Any:
        return parse_processes(value)

    @field_validator("kafka_bootstrap_servers", "consumer_group")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("database_url")
    @classmethod
    def _valid_database_url(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if not raw.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        try:
            params = conninfo_to_dict(raw)
        except Exception as exc:
            raise ValueError("cannot be parsed as a PostgreSQL connection URL") from exc
        port = params.get("port")
        if port is not None and not (str(port).isdigit() and 0 < int(port) < 65536):
            raise ValueError("has an invalid port")
        return value

    @field_validator("admin_token", "admin_read_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return value
        token = value.get_secret_value()
        if len(token) < 16:
            raise ValueError("must be at least 16 characters")
        if not _TOKEN.match(token):
            raise ValueError("must be printable ASCII without spaces (a bearer token)")
        admin = info.data.get("admin_token")
        if info.field_name == "admin_read_token" and admin is not None and admin.get_secret_value() == token:
            raise ValueError(
                "must differ from EVENTHANDLER_ADMIN_TOKEN (the same value gives readers admin rights)"
            )
        return value

    @field_validator("kafka_options", "kafka_consumer_options", "kafka_producer_options", mode="before")
    @classmethod
    def _options(cls, value: Any) -> Any:
        return _decode_options(value)

    @field_validator("kafka_consumer_options")
    @classmethod
    def _group_protocol(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Under KIP-848 (`group.protocol=consumer`) the broker owns the session and the assignor: the
        client options librdkafka refuses then are refused here, at start, with the setting's name."""
        effective = {**info.data.get("kafka_options", {}), **value}
        protocol = str(effective.get("group.protocol", "classic")).lower()
        if protocol not in GROUP_PROTOCOLS:
            raise ValueError(f"group.protocol must be one of {', '.join(GROUP_PROTOCOLS)}, not {protocol!r}")
        if protocol == "consumer":
            refused = sorted(set(effective) & BROKER_SIDE_UNDER_KIP848)
            if refused:
                raise ValueError(
                    f"{', '.join(refused)} cannot be set with group.protocol=consumer: the broker sets it "
                    "(group.consumer.* broker settings; the assignor with group.remote.assignor)"
                )
        return value

    @property
    def dsn(self) -> str:
        return self.database_url.get_secret_value()

    def consumer_config(self) -> dict[str, Any]:
        """The librdkafka consumer configuration: our defaults, then the operator's options."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "group.id": self.consumer_group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
        config.update(self.kafka_options)
        config.update(self.kafka_consumer_options)
        return config

    def producer_config(self) -> dict[str, Any]:
        """The librdkafka producer configuration for replays: idempotent, acks=all."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
        config.update(self.kafka_options)
        config.update(self.kafka_producer_options)
        return config


MAX_PROCESSES = 256


def parse_processes(value: Any) -> int | Literal["auto"]:
    """`auto` or a whole number of worker processes, 1 to `MAX_PROCESSES`."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if not (text.isascii() and text.isdigit()):  # isdigit alone takes "²"
            raise ValueError("must be a whole number of processes or auto")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number of processes or auto")
    if not 1 <= value <= MAX_PROCESSES:
        raise ValueError(f"must be between 1 and {MAX_PROCESSES}, or auto")
    return value


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; a bad value raises `ConfigError` naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{ENV_PREFIX}{field.upper()}", message) from None

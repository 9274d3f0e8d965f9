"""The deployment files as an operator receives them: compose.yaml, the Dockerfile, .dockerignore, the
Prometheus rules and config, and the Grafana dashboard. No services needed; `.ci/deploy-checks` runs
the real tools (promtool, hadolint, docker-compose) on the same files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from eventhandler.metrics import Metrics, SupervisorMetrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"

# The fixed metric names (DESIGN.md and the metrics module), as Prometheus exposes them.
COUNTERS = {
    "eventhandler_messages_consumed_total",
    "eventhandler_events_processed_total",
    "eventhandler_events_failed_total",
    "eventhandler_events_duplicate_total",
    "eventhandler_events_skipped_total",
    "eventhandler_events_parked_total",
    "eventhandler_events_released_total",
    "eventhandler_dlq_write_errors_total",
    "eventhandler_dlq_resolved_by_replay_total",
    "eventhandler_replay_published_total",
    "eventhandler_replay_failed_total",
    "eventhandler_transient_retries_total",
    "eventhandler_rebalances_total",
    "eventhandler_worker_process_restarts_total",  # the supervisor's (`--processes N`)
}
GAUGES = {
    "eventhandler_dlq_depth",
    "eventhandler_dlq_oldest_pending_age_seconds",
    "eventhandler_paused_partitions",
    "eventhandler_assigned_partitions",
    "eventhandler_consumer_lag_messages",
    "eventhandler_dlq_oldest_replayed_age_seconds",
    "eventhandler_dlq_oldest_parked_age_seconds",
    "eventhandler_circuit_open",
    "eventhandler_ready",
    "eventhandler_build_info",
    "eventhandler_worker_processes",  # the supervisor's (`--processes N`)
}
HISTOGRAMS = {
    "eventhandler_batch_size_messages",
    "eventhandler_batch_duration_seconds",
    "eventhandler_projection_write_duration_seconds",
}
KNOWN_METRICS = (
    COUNTERS | GAUGES | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}
)
METRIC_NAME = re.compile(r"\beventhandler_[a-z_]+\b")
SUMMED_DLQ_GAUGE = re.compile(
    r"\bsum\s*(?:(?:by|without)\s*\([^()]*\)\s*)?\(\s*eventhandler_dlq_(?:depth|oldest_pending_age_seconds)\b"
)

OFFICIAL_IMAGES = {"apache/kafka", "postgres", "prom/prometheus"}


# -- helpers ----------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "compose.yaml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((ROOT / "deploy" / "grafana" / "eventhandler-dashboard.json").read_text("utf-8"))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions() if kw == keyword]


def built_from_dockerfile(service: dict[str, Any]) -> bool:
    return "build" in service


def has_healthcheck(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck")
    if check is not None:
        return not check.get("disable", False) and bool(check.get("test"))
    return built_from_dockerfile(service) and bool(args_of("HEALTHCHECK"))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return exprs


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]

    def to_regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = to_regex(raw.removeprefix("!").strip("/"))
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


# -- compose.yaml -----------------------------------------------------------------------------------


def test_compose_images_are_official_and_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if built_from_dockerfile(service):
            assert service["build"]["context"] == ".", name
            continue
        repository, _, tag = service["image"].partition(":")
        assert repository in OFFICIAL_IMAGES, f"{name}: {service['image']} is not an official image"
        assert tag != "latest", f"{name}: {service['image']} is not pinned"
        assert re.search(r"\d+\.\d+", tag), f"{name}: {service['image']} is not pinned to a release"


def test_compose_has_no_version_key_and_uses_one_shared_block(compose: dict[str, Any]) -> None:
    assert "version" not in compose  # the Compose Specification; both docker-compose 1.29 and v2 read it
    services = compose["services"]
    built = {name for name, service in services.items() if built_from_dockerfile(service)}
    assert built == {"migrate", "worker", "api"}
    assert {services[name]["image"] for name in built} == {"eventhandler:local"}
    shared = compose["x-eventhandler-env"]
    assert services["migrate"]["environment"] == services["worker"]["environment"] == shared
    assert services["api"]["environment"].items() >= shared.items()


def test_worker_scales_and_exposes_metrics(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker  # a fixed host port would stop `--scale worker=3`
    assert worker["command"] == ["run"]
    assert [str(port) for port in worker["expose"]] == [worker["environment"]["EVENTHANDLER_METRICS_PORT"]]


def test_dependencies_wait_for_health_or_completion(services: dict[str, Any]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions, not a list"
        for target, spec in depends_on.items():
            condition = spec["condition"]
            if condition == "service_healthy":
                assert has_healthcheck(services[target]), (
                    f"{name} waits for {target}, which has no healthcheck"
                )
            else:
                assert condition == "service_completed_successfully", f"{name} → {target}: {condition}"
                assert services[target].get("restart") == "no", f"one-shot {target} must not restart"
    for name in ("kafka", "postgres"):
        assert has_healthcheck(services[name]), name


def test_worker_starts_after_migrations_topic_and_broker(services: dict[str, Any]) -> None:
    assert services["worker"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "kafka-init": {"condition": "service_completed_successfully"},
        "kafka": {"condition": "service_healthy"},
    }
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["healthcheck"] == {"disable": True}


def test_kafka_is_a_single_kraft_node_and_the_topic_has_six_partitions(services: dict[str, Any]) -> None:
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    init = services["kafka-init"]["command"]
    assert init[0].endswith("kafka-topics.sh")
    assert {"--create", "--if-not-exists"} <= set(init)
    assert init[init.index("--topic") + 1] == services["worker"]["environment"]["EVENTHANDLER_TOPICS"]
    assert init[init.index("--partitions") + 1] == "6"


def test_services_use_the_fixed_setting_names(compose: dict[str, Any], services: dict[str, Any]) -> None:
    env = compose["x-eventhandler-env"]
    assert env["EVENTHANDLER_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert re.fullmatch(
        r"postgresql://eventhandler:\$\{POSTGRES_PASSWORD:-[^}]+\}@postgres:5432/eventhandler",
        env["EVENTHANDLER_DATABASE_URL"],
    )
    assert env["EVENTHANDLER_LOG_FORMAT"] == "json"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:-")


def test_api_listens_on_all_interfaces_and_requires_a_token(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["command"] == ["api", "--host", "0.0.0.0", "--port", "8080"]
    assert api["ports"] == ["127.0.0.1:8080:8080"]
    assert api["environment"]["EVENTHANDLER_ADMIN_TOKEN"].startswith("${EVENTHANDLER_ADMIN_TOKEN:?")
    assert "8080/healthz" in " ".join(api["healthcheck"]["test"])


def test_prometheus_mounts_the_shipped_rules(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


# -- deploy/prometheus/prometheus.yml ---------------------------------------------------------------


def test_prometheus_config_discovers_every_worker_replica(services: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker_sd = jobs["eventhandler-worker"]["dns_sd_configs"]
    assert worker_sd == [{"names": ["worker"], "type": "A", "port": 9180, "refresh_interval": "15s"}]
    assert str(worker_sd[0]["port"]) == services["worker"]["environment"]["EVENTHANDLER_METRICS_PORT"]
    assert jobs["eventhandler-api"]["static_configs"] == [{"targets": ["api:8080"]}]


# -- deploy/prometheus/alerts.yml -------------------------------------------------------------------


def test_alerts_use_only_exposed_metric_names(alert_rules: list[dict[str, Any]]) -> None:
    for rule in alert_rules:
        unknown = set(METRIC_NAME.findall(rule["expr"])) - KNOWN_METRICS
        assert not unknown, f"{rule['alert']} uses unknown metrics {unknown}"


def test_every_alert_has_severity_summary_description_and_runbook(alert_rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names))
    for rule in alert_rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description", "runbook"}, rule["alert"]
        assert all(annotations[key].strip() for key in ("summary", "description", "runbook"))
        assert re.search(r"`[^`]+`", annotations["runbook"]), f"{rule['alert']}: runbook names no command"


def test_alerts_cover_the_failure_modes(alert_rules: list[dict[str, Any]]) -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules}
    joined = "\n".join(exprs.values())
    assert re.search(r'eventhandler_dlq_depth\{status="pending"\}\) > 100\b', joined)
    assert re.search(r'eventhandler_dlq_depth\{status="pending"\}\) > 1000\b', joined)
    assert re.search(r'delta\(eventhandler_dlq_depth\{status="pending"\}\[30m\]\)', joined)
    assert "rate(eventhandler_events_failed_total" in joined
    assert re.search(r"eventhandler_dlq_oldest_pending_age_seconds\) > 86400\b", joined)
    assert "increase(eventhandler_dlq_write_errors_total" in joined
    assert 'up{job="eventhandler-worker"} == 0' in joined
    assert 'absent(up{job="eventhandler-worker"}' in joined
    assert "eventhandler_ready == 0" in joined
    assert re.search(
        r"max by \(job, topic, partition\) \(eventhandler_consumer_lag_messages\)\)\s+> 10000", joined
    )


def test_dlq_gauges_are_not_summed_across_replicas(alert_rules: list[dict[str, Any]]) -> None:
    # Every replica reports the whole table; summing would multiply the depth by the replica count.
    for rule in alert_rules:
        assert not SUMMED_DLQ_GAUGE.search(rule["expr"]), rule["alert"]


def test_every_alert_has_firing_and_quiet_unit_tests(alert_rules: list[dict[str, Any]]) -> None:
    tests = load_yaml(PROMETHEUS / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules}
    assert names - fired == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"


# -- Dockerfile and .dockerignore -------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python() -> None:
    froms = args_of("FROM")
    assert len(froms) >= 2
    for line in froms:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm AS \w+", line), line
    assert any(line.endswith("AS builder") for line in froms)
    runtime_start = [kw for kw, _ in dockerfile_instructions()].index("FROM", 1)
    runtime_runs = [args for kw, args in dockerfile_instructions()[runtime_start:] if kw == "RUN"]
    assert any("pip install" in run and "--no-index" in run and ".whl" in run for run in runtime_runs)
    assert any("pip wheel" in run for run in args_of("RUN"))


def test_dockerfile_runs_eventhandler_as_a_non_root_user() -> None:
    users = args_of("USER")
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert args_of("ENTRYPOINT") == ['["eventhandler"]']
    assert args_of("CMD") == ['["run"]']
    exposed = " ".join(args_of("EXPOSE")).split()
    assert {"9180", "8080"} <= set(exposed)
    env = " ".join(args_of("ENV"))
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "EVENTHANDLER_LOG_FORMAT=json"):
        assert setting in env


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture(params=[200, 503], ids=["healthy", "unhealthy"])
def health_server(request: pytest.FixtureRequest) -> Iterator[tuple[int, int]]:
    handler = type("Handler", (_Health,), {"status": request.param})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), request.param
    finally:
        server.shutdown()
        server.server_close()


def test_dockerfile_healthcheck_probes_healthz(health_server: tuple[int, int]) -> None:
    port, status = health_server
    (healthcheck,) = args_of("HEALTHCHECK")
    # The slim image has neither curl nor wget: the probe is the standard library's urllib.
    assert "curl" not in healthcheck
    assert "wget" not in healthcheck
    command = json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])
    assert command[0] == "python"
    result = subprocess.run(
        [sys.executable, *command[1:]],
        env={"EVENTHANDLER_METRICS_PORT": str(port)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode == 0) == (status == 200), result.stderr.decode()


def test_dockerignore_sends_only_the_package_sources() -> None:
    for path in ("pyproject.toml", "README.md", "eventhandler/cli.py", "migrations/0001_dlq.sql"):
        assert not dockerignore_excludes(path), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        "tests/conftest.py",
        "benchmarks/run.py",
        ".pytest_cache/README.md",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/content",
        "eventhandler/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignore_excludes(path), path
    # Everything the builder stage copies is in the context.
    for copy in args_of("COPY"):
        if "--from=" in copy:
            continue
        for source in copy.split()[:-1]:
            assert not dockerignore_excludes(source.rstrip("/")), source
            assert (ROOT / source).exists(), source


# -- Grafana dashboard ------------------------------------------------------------------------------


def test_dashboard_queries_the_fixed_metric_names(dashboard: dict[str, Any]) -> None:
    exprs = dashboard_exprs(dashboard)
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used <= KNOWN_METRICS, used - KNOWN_METRICS
    assert {
        "eventhandler_messages_consumed_total",
        "eventhandler_events_processed_total",
        "eventhandler_events_failed_total",
        "eventhandler_dlq_depth",
        "eventhandler_dlq_oldest_pending_age_seconds",
        "eventhandler_batch_duration_seconds_bucket",
        "eventhandler_transient_retries_total",
        "eventhandler_paused_partitions",
        "eventhandler_assigned_partitions",
        "eventhandler_ready",
    } <= used
    assert any("histogram_quantile(0.99" in expr for expr in exprs)
    assert any("histogram_quantile(0.5" in expr for expr in exprs)


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"]
    assert dashboard["id"] is None
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])


# -- the metrics module agrees with the deploy files ------------------------------------------------


def test_every_name_used_by_the_deploy_files_is_registered(
    alert_rules: list[dict[str, Any]], dashboard: dict[str, Any], tmp_path: Path
) -> None:
    """The worker's metrics, and the supervisor's own under `--processes N`."""
    exposed: set[str] = set()
    supervisor = SupervisorMetrics(tmp_path, lambda: (True, {}), lambda: 1)
    families = [*Metrics().registry.collect(), *supervisor.registry.collect()]
    for family in families:
        if family.type == "counter":
            exposed.add(f"{family.name}_total")
        elif family.type == "histogram":
            exposed.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        elif family.type == "info":
            exposed.add(f"{family.name}_info")
        else:
            exposed.add(family.name)
    used = {name for rule in alert_rules for name in METRIC_NAME.findall(rule["expr"])}
    used |= {name for expr in dashboard_exprs(dashboard) for name in METRIC_NAME.findall(expr)}
    assert used <= exposed, used - exposed
    assert exposed >= KNOWN_METRICS, KNOWN_METRICS - exposed

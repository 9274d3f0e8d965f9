"""A real single-node Apache Kafka (KRaft, no ZooKeeper) started from its own jars on Maven Central.

Maven resolves `org.apache.kafka:kafka_2.13` and its dependencies once into its local repository
(`pom.xml` beside this file names the version); the classpath it writes is cached, so later starts need
no network. The broker runs with the machine's Java: `kafka.tools.StorageTool format`, then `kafka.Kafka`.

Only settings that make tests fast differ from a production broker, and none weakens what the tests
check: replication factors of 1 (one node), no initial rebalance delay, and group session and heartbeat
floors low enough for the tests' short session timeouts (classic and KIP-848 groups alike).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).with_name("apache-kafka")
POM = HERE / "pom.xml"
KAFKA_VERSION = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text()).group(1)  # type: ignore[union-attr]

# Broker settings for tests: the speed-ups named in the module docstring, nothing else.
TEST_BROKER_SETTINGS = {
    "num.partitions": "1",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "10",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    # classic protocol: the tests' members use session.timeout.ms=3000 (the default floor is 6000)
    "group.min.session.timeout.ms": "1000",
    # KIP-848 protocol: the session and heartbeat are the broker's; 45 s / 5 s by default
    "group.consumer.min.session.timeout.ms": "1000",
    "group.consumer.session.timeout.ms": "3000",
    "group.consumer.min.heartbeat.interval.ms": "100",
    "group.consumer.heartbeat.interval.ms": "300",
}


class KafkaUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "eventhandler"


def tools_available() -> bool:
    return bool(shutil.which("java") and shutil.which("mvn"))


def classpath() -> str:
    """The broker's classpath, resolved by Maven the first time and cached per Kafka version."""
    cached = cache_dir() / f"apache-kafka-{KAFKA_VERSION}.classpath"
    if cached.exists():
        jars = cached.read_text().strip()
        if jars and all(Path(jar).exists() for jar in jars.split(os.pathsep)):
            return jars
    if not tools_available():
        raise KafkaUnavailable("Apache Kafka for the tests needs `java` (17 or later) and `mvn` on PATH")
    cached.parent.mkdir(parents=True, exist_ok=True)
    output = cached.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(POM), "dependency:build-classpath", f"-Dmdep.outputFile={output}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0 or not output.exists():
        tail = (result.stdout + result.stderr).strip()[-2000:]
        raise KafkaUnavailable(f"Maven could not resolve Apache Kafka {KAFKA_VERSION}: {tail}")
    output.replace(cached)  # atomic: two test runs resolving at once both end with a whole file
    return cached.read_text().strip()


def _cluster_id() -> str:
    """A random cluster id; like Kafka's own `Uuid.randomUuid`, never one that starts with "-", which
    the storage tool's argument parser would read as an option."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@contextmanager
def apache_kafka(port: int, controller_port: int) -> Iterator[str]:
    """A fresh broker+controller on 127.0.0.1:`port`, its data in a temporary directory removed after."""
    from eventhandler.local.broker import stop_process
    from tests.support.services import kafka_answers

    jars = classpath()
    java = shutil.which("java") or "java"
    work = Path(tempfile.mkdtemp(prefix="eh-kafka-"))
    properties = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(work / "data"),
        **TEST_BROKER_SETTINGS,
    }
    config = work / "server.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    log_path = work / "broker.log"
    jvm = [java, "-Xms256m", "-Xmx1g", f"-Dlog4j2.configurationFile={HERE / 'log4j2.properties'}"]
    jvm += ["-Djava.awt.headless=true", "-cp", jars]
    formatted = subprocess.run(
        [*jvm, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if formatted.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise KafkaUnavailable(
            f"kafka-storage format failed: {formatted.stdout[-1000:]}{formatted.stderr[-1000:]}"
        )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*jvm, "kafka.Kafka", str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    bootstrap = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not kafka_answers(bootstrap, timeout=1):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise KafkaUnavailable(f"Apache Kafka {KAFKA_VERSION} did not start on {bootstrap}:\n{tail}")
            time.sleep(0.2)
        yield bootstrap
    finally:
        stop_process(process, timeout=20)
        shutil.rmtree(work, ignore_errors=True)

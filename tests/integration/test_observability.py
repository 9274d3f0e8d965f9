"""What an operator sees of a real running worker (real broker, real PostgreSQL): `/metrics` counters
that move as events succeed and fail, DLQ depth and age that follow inserts, replays and resolutions,
`/healthz`, and `/readyz` flipping while PostgreSQL is cut and back."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eventhandler import __version__
from eventhandler.config import Settings
from eventhandler.db import create_pool
from eventhandler.models import DLQFilter
from eventhandler.replay import replay_headers
from tests.support import kafka as k
from tests.support.dlq import DLQ
from tests.support.proxy import TcpProxy
from tests.support.services import free_port
from tests.support.waiting import wait_for
from tests.support.worker import scalar, threaded_worker

STAGES = ("deserialize", "handler", "projection")


class Endpoint:
    """The worker's HTTP side on 127.0.0.1:port."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()

    def status(self, path: str) -> int:
        return self.get(path)[0]

    def answers(self) -> bool:
        try:
            return self.status("/healthz") == 200
        except OSError:
            return False

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = self.get("/metrics")
        assert status == 200
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, frozenset(labels.items())))

    def wait_value(self, name: str, expected: float, timeout: float = 30, **labels: str) -> None:
        wait_for(
            lambda: self.value(name, **labels) == expected,
            timeout=timeout,
            message=f"{name}{labels} == {expected} (now {self.value(name, **labels)})",
        )

    def ready(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/readyz")
        return status, json.loads(body)


@pytest.fixture
def endpoint_port() -> int:
    return free_port()


@pytest.fixture
def endpoint(endpoint_port: int) -> Endpoint:
    return Endpoint(endpoint_port)


@pytest.fixture
def producer(kafka_bootstrap: str) -> k.TestProducer:
    return k.TestProducer(kafka_bootstrap)


def wait_ready(endpoint: Endpoint, timeout: float = 60) -> None:
    wait_for(endpoint.answers, timeout=15, message="the worker's HTTP endpoint")
    wait_for(lambda: endpoint.ready()[0] == 200, timeout=timeout, message=f"/readyz 200 ({endpoint.ready()})")


def send(producer: k.TestProducer, topic: str, values: list[bytes], partition: int = 0) -> None:
    for value in values:
        producer.send(topic, value, key=b"k", partition=partition)
    producer.flush()


def test_counters_move_as_events_succeed_and_fail(
    make_settings: Callable[..., Settings],
    endpoint_port: int,
    endpoint: Endpoint,
    producer: k.TestProducer,
    topic: str,
) -> None:
    consumed = "eventhandler_messages_consumed_total"
    processed = "eventhandler_events_processed_total"
    failed = "eventhandler_events_failed_total"
    with threaded_worker(make_settings(metrics_port=endpoint_port), serve_http=True):
        wait_ready(endpoint)
        for stage in STAGES:  # every stage is exported from the start, so rate() and alerts see a 0
            assert endpoint.value(failed, stage=stage) == 0

        send(
            producer,
            topic,
            [k.structured(e) for e in [k.registered("dev-1"), *(k.reading("dev-1") for _ in range(3))]],
        )
        endpoint.wait_value(processed, 3, event_type="device.reading")
        assert endpoint.value(processed, event_type="device.registered") == 1
        assert endpoint.value(consumed, topic=topic) == 4
        assert all(endpoint.value(failed, stage=stage) == 0 for stage in STAGES)

        send(
            producer,
            topic,
            [
                b"not json",  # deserialize
                k.structured(k.reading("ghost")),  # handler
                k.structured(k.registered("nul", name="bad \u0000 name")),  # projection
                k.structured(k.reading("dev-1")),
            ],
        )
        endpoint.wait_value(processed, 4, event_type="device.reading")
        for stage in STAGES:
            endpoint.wait_value(failed, 1, stage=stage)
        assert endpoint.value(consumed, topic=topic) == 8
        assert endpoint.value(processed, event_type="device.registered") == 1  # the failed one is not counted

        samples = endpoint.samples()
        assert samples[("eventhandler_batch_size_messages_sum", frozenset())] == 8
        assert samples[("eventhandler_batch_size_messages_count", frozenset())] >= 2
        assert samples[("eventhandler_batch_duration_seconds_count", frozenset())] >= 2
        assert samples[("eventhandler_build_info", frozenset({("version", __version__)}))] == 1
        assert samples[("eventhandler_ready", frozenset())] == 1
        assert samples[("eventhandler_assigned_partitions", frozenset())] == 4


def test_dlq_depth_and_age_follow_inserts_replays_and_resolutions(
    make_settings: Callable[..., Settings],
    endpoint_port: int,
    endpoint: Endpoint,
    producer: k.TestProducer,
    topic: str,
    group: str,
    db: psycopg.Connection[Any],
) -> None:
    depth = "eventhandler_dlq_depth"
    age = "eventhandler_dlq_oldest_pending_age_seconds"
    replayed_age = "eventhandler_dlq_oldest_replayed_age_seconds"
    settings = make_settings(metrics_port=endpoint_port)
    pool = create_pool(settings)
    repository = DLQ.on(pool)
    try:
        with threaded_worker(settings, serve_http=True):
            wait_ready(endpoint)
            endpoint.wait_value(depth, 0, consumer=group, status="pending")
            assert endpoint.value(age, consumer=group) == 0

            ghost = k.reading("ghost-1")
            send(producer, topic, [k.structured(ghost), b"not json 1", b"not json 2"])
            endpoint.wait_value(depth, 3, consumer=group, status="pending")
            wait_for(lambda: (endpoint.value(age, consumer=group) or 0) > 0, message="oldest pending age > 0")
            assert endpoint.value(depth, consumer=group, status="resolved") == 0

            # an operator resolves one row
            junk = scalar(db, "SELECT min(dlq_id) FROM dlq WHERE stage = 'deserialize'")
            assert repository.operators.resolve([junk], actor="test", note="junk") == [junk]
            endpoint.wait_value(depth, 2, consumer=group, status="pending")
            endpoint.wait_value(depth, 1, consumer=group, status="resolved")

            # the cause of the handler failure is fixed, and the row is replayed
            send(producer, topic, [k.structured(k.registered("ghost-1"))])
            wait_for(lambda: scalar(db, "SELECT count(*) FROM devices") == 1, message="device registered")
            with repository.replays.lease() as lease:
                [row], claim = repository.replays.take(
                    DLQFilter(event_type="device.reading", statuses=("pending",)),
                    limit=10,
                    lease=lease,
                    lease_seconds=60,
                )
                assert claim is not None
                repository.replays.finish(
                    lease=lease,
                    claim=claim,
                    published={topic: [row.dlq_id]},
                    actor="test",
                    detail={},
                )
            endpoint.wait_value(depth, 1, consumer=group, status="replayed")
            endpoint.wait_value(depth, 1, consumer=group, status="pending")
            # until the replayed copy comes back, the row ages as `replayed` (here: as if for 2 hours)
            db.execute(
                "UPDATE dlq SET last_replayed_at = now() - interval '2 hours' WHERE dlq_id = %s",
                (row.dlq_id,),
            )
            wait_for(
                lambda: (endpoint.value(replayed_age, consumer=group) or 0) >= 7200,
                message=f"oldest replayed age >= 2h (now {endpoint.value(replayed_age, consumer=group)})",
            )
            producer.send(
                topic,
                row.event_payload,
                key=row.message_key,
                headers=replay_headers(row),
                partition=0,
            )
            producer.flush()
            endpoint.wait_value(depth, 2, consumer=group, status="resolved")
            endpoint.wait_value(depth, 0, consumer=group, status="replayed")
            endpoint.wait_value(replayed_age, 0, consumer=group)
            assert endpoint.value(depth, consumer=group, status="pending") == 1
            # counters move when the worker records the batch, just after its commit is visible
            endpoint.wait_value("eventhandler_dlq_resolved_by_replay_total", 1)

            # the last pending row goes: nothing is waiting, so nothing is old
            last = scalar(db, "SELECT dlq_id FROM dlq WHERE status = 'pending'")
            assert repository.operators.discard([last], actor="test") == [last]
            endpoint.wait_value(depth, 0, consumer=group, status="pending")
            endpoint.wait_value(depth, 1, consumer=group, status="discarded")
            endpoint.wait_value(age, 0, consumer=group)
    finally:
        pool.close()


@pytest.mark.parametrize("cut", ["refuse", "blackhole"])
def test_readyz_flips_while_postgres_is_cut_and_back(
    cut: str,
    make_settings: Callable[..., Settings],
    endpoint_port: int,
    endpoint: Endpoint,
    pg_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, proxied_url = pg_proxy
    settings = make_settings(metrics_port=endpoint_port, database_url=proxied_url)
    with threaded_worker(settings, serve_http=True):
        wait_ready(endpoint)
        # an idle worker, assigned and positioned: only the DLQ depth refresh talks to PostgreSQL
        endpoint.wait_value("eventhandler_assigned_partitions", 4)
        _status, detail = endpoint.ready()
        assert detail["postgres"] == "ok"
        assert detail["kafka"] == "ok"
        assert endpoint.value("eventhandler_ready") == 1

        getattr(proxy, cut)()
        wait_for(
            lambda: endpoint.ready()[0] == 503, timeout=30, message=f"/readyz 503 with PostgreSQL cut ({cut})"
        )
        assert endpoint.ready()[1]["postgres"] == "unreachable"
        assert endpoint.value("eventhandler_ready") == 0
        assert endpoint.status("/healthz") == 200  # alive, only not ready

        proxy.forward()
        wait_ready(endpoint, timeout=60)
        assert endpoint.ready()[1]["postgres"] == "ok"
        assert endpoint.value("eventhandler_ready") == 1


def test_healthz_and_unknown_paths(
    make_settings: Callable[..., Settings], endpoint_port: int, endpoint: Endpoint
) -> None:
    with threaded_worker(make_settings(metrics_port=endpoint_port), serve_http=True):
        wait_for(endpoint.answers, timeout=15, message="the worker's HTTP endpoint")
        status, body = endpoint.get("/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert endpoint.status("/metrics?name[]=x") == 200
        assert endpoint.status("/nope") == 404


def lags(endpoint: Endpoint, topic: str) -> dict[int, float]:
    return {
        int(dict(labels)["partition"]): value
        for (name, labels), value in endpoint.samples().items()
        if name == "eventhandler_consumer_lag_messages" and dict(labels)["topic"] == topic
    }


@pytest.mark.apache_kafka  # Tansu's high watermark is wrong, so lag cannot be measured on it
def test_consumer_lag_is_zero_when_caught_up_and_grows_while_postgres_is_cut(
    make_settings: Callable[..., Settings],
    producer: k.TestProducer,
    topic: str,
    endpoint_port: int,
    endpoint: Endpoint,
    pg_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, proxied_url = pg_proxy
    send(producer, topic, [k.structured(k.registered("lag-1"))], partition=0)
    send(producer, topic, [k.structured(k.reading("lag-1", value=n)) for n in range(40)], partition=1)
    settings = make_settings(metrics_port=endpoint_port, database_url=proxied_url)
    with threaded_worker(settings, serve_http=True):
        wait_ready(endpoint)
        wait_for(
            lambda: lags(endpoint, topic) == {0: 0, 1: 0, 2: 0, 3: 0},
            timeout=60,
            message=f"every partition caught up (lag now {lags(endpoint, topic)})",
        )

        proxy.refuse()
        send(producer, topic, [k.structured(k.reading("lag-1", value=n)) for n in range(30)], partition=2)
        # the worker holds its position and pauses; the lag of the held partition shows what waits
        wait_for(
            lambda: lags(endpoint, topic).get(2) == 30,
            timeout=60,
            message=f"lag 30 on partition 2 while PostgreSQL is cut (lag now {lags(endpoint, topic)})",
        )
        assert lags(endpoint, topic)[1] == 0

        proxy.forward()
        wait_for(
            lambda: lags(endpoint, topic) == {0: 0, 1: 0, 2: 0, 3: 0},
            timeout=60,
            message=f"lag back to 0 after PostgreSQL returned (lag now {lags(endpoint, topic)})",
        )

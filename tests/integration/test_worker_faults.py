"""The guarantees under faults, against the real broker and PostgreSQL: kill -9 at random moments,
PostgreSQL cut mid-stream (refused and black-holed), a worker of two dying, SIGTERM."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from eventhandler.config import Settings
from tests.conftest import settings_env
from tests.support import kafka as k
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_for
from tests.support.worker import (
    ThreadedWorker,
    exit_code,
    kill9,
    run_until_idle,
    scalar,
    spawn_worker,
    threaded_worker,
)

pytestmark = pytest.mark.slow


def assert_exact(db: psycopg.Connection[Any], stream: k.Stream) -> None:
    """Every reading counted once, every poison message in the DLQ once."""
    assert scalar(db, "SELECT sum(reading_count) FROM devices") == stream.expected_readings
    assert scalar(db, "SELECT count(*) FROM dlq") == stream.expected_poison
    assert scalar(db, "SELECT count(*) FROM dlq WHERE failure_count <> 1") == 0
    assert scalar(db, "SELECT count(*) FROM applied_events") == stream.expected_readings + len(stream.devices)


def processed(db: psycopg.Connection[Any]) -> int:
    return int(scalar(db, "SELECT coalesce(sum(next_offset), 0) FROM consumer_positions"))


def test_kill_9_at_random_moments_loses_nothing_and_counts_nothing_twice(
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    tmp_path: Any,
    spawned: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    # A restarted worker rejoins after the dead member's session times out (~12 s with Tansu), so the
    # stream runs long enough for several kills while it is flowing.
    stream = k.Stream(kafka_bootstrap, topic, total=20_000, rate=450, poison_every=400)
    stream.register_devices()
    stream.start()
    env = settings_env(make_settings(batch_max_messages=500))
    rng = random.Random(20261122)
    kills = 0
    log = str(tmp_path / "worker.log")
    while not stream.done:
        worker = spawned(spawn_worker(env, log_path=log))
        before = processed(db)
        # kill once the worker is making progress, at a random moment after that
        wait_for(lambda b=before: processed(db) > b or stream.done, timeout=90, message="worker progress")
        time.sleep(rng.uniform(0.05, 2.0))  # the random moment of the kill
        kill9(worker)
        kills += 1
    stream.join()
    # The member killed last may still hold partitions until its session (3 s) times out: Apache Kafka
    # then gives the final worker only the others at first. Its idle stop must outlast that.
    final = spawned(spawn_worker(env, "--stop-when-idle", "8", log_path=log))
    assert final.wait(timeout=120) == 0
    assert kills >= 3
    assert_exact(db, stream)
    print(f"kill -9 loop: {kills} kills, {stream.sent} events, {stream.expected_poison} poison, counts exact")


@pytest.mark.parametrize("cut", ["refuse", "blackhole"])
def test_postgres_outage_mid_stream_is_retried_not_dead_lettered(
    cut: str,
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    pg_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, proxied_url = pg_proxy
    stream = k.Stream(kafka_bootstrap, topic, total=12_000, rate=400, poison_every=1_000)
    stream.register_devices()
    settings = make_settings(database_url=proxied_url, batch_max_messages=200)
    with threaded_worker(settings) as worker:
        stream.start()
        wait_for(lambda: processed(db) > 2_000, timeout=60, message="progress before the outage")
        getattr(proxy, cut)()
        cut_at = time.monotonic()
        position_at_cut = processed(db)
        time.sleep(15)  # the outage itself: PostgreSQL stays unreachable this long
        stalled = processed(db) - position_at_cut
        retries_during = worker.app.worker.stats.retries
        proxy.forward()
        restored_at = time.monotonic()
        wait_for(
            lambda: processed(db) > position_at_cut + 200, timeout=60, message="recovery after the outage"
        )
        recovery = time.monotonic() - restored_at
        stream.join()
        wait_for(lambda: processed(db) >= stream.sent + len(stream.devices), timeout=90, message="catch up")
        stats = worker.stop()
    assert stalled <= 200, "the position moved while PostgreSQL was unreachable"
    assert retries_during >= 3
    assert stats.failed == stream.expected_poison
    assert_exact(db, stream)
    print(
        f"outage ({cut}): {time.monotonic() - cut_at:.0f}s run, recovered {recovery:.1f}s after restore, "
        f"{retries_during} retries, counts exact"
    )


@pytest.mark.parametrize("group_protocol", k.GROUP_PROTOCOLS)
def test_two_workers_one_killed_mid_stream_lose_nothing(
    group_protocol: str,
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    tmp_path: Any,
    spawned: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    stream, env = group_stream(make_settings, kafka_bootstrap, topic, group_protocol)
    first = spawned(spawn_worker(env, log_path=str(tmp_path / "first.log")))
    second = spawned(spawn_worker(env, "--stop-when-idle", "8", log_path=str(tmp_path / "second.log")))
    stream.start()
    wait_for(lambda: processed(db) > 5_000, timeout=90, message="both workers progressing")
    assert assigned_partitions(tmp_path / "first.log")
    assert assigned_partitions(tmp_path / "second.log")
    kill9(first)
    stream.join()
    assert second.wait(timeout=180) == 0
    assert assigned_partitions(tmp_path / "second.log") >= {0, 1, 2, 3}  # it took over the dead one's
    assert_exact(db, stream)


@pytest.mark.parametrize("group_protocol", k.GROUP_PROTOCOLS)
def test_workers_added_mid_stream_share_the_partitions_and_lose_nothing(
    group_protocol: str,
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    tmp_path: Any,
    spawned: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    stream, env = group_stream(make_settings, kafka_bootstrap, topic, group_protocol)
    logs = [tmp_path / f"worker-{n}.log" for n in range(3)]
    workers = [spawned(spawn_worker(env, "--stop-when-idle", "8", log_path=str(logs[0])))]
    stream.start()
    wait_for(lambda: processed(db) > 3_000, timeout=90, message="the first worker progressing")
    for log in logs[1:]:  # scale out from one worker to three while the stream flows
        workers.append(spawned(spawn_worker(env, "--stop-when-idle", "8", log_path=str(log))))
    wait_for(
        lambda: all(assigned_partitions(log) for log in logs[1:]),
        timeout=90,
        message="the new workers to be given partitions",
    )
    stream.join()
    assert [worker.wait(timeout=180) for worker in workers] == [0, 0, 0]
    assert_exact(db, stream)


def group_stream(
    make_settings: Callable[..., Settings], bootstrap: str, topic: str, group_protocol: str
) -> tuple[k.Stream, dict[str, str]]:
    """A stream of 20,000 events with poison, its devices registered, and the environment of workers
    that share it in one group under `group_protocol`."""
    stream = k.Stream(bootstrap, topic, total=20_000, rate=1_500, poison_every=500)
    stream.register_devices()
    options = k.consumer_options(group_protocol)
    return stream, settings_env(make_settings(batch_max_messages=300, kafka_consumer_options=options))


def assigned_partitions(log: Any) -> set[int]:
    """Partitions a worker's log says it was assigned at some point."""
    import json
    from pathlib import Path

    found: set[int] = set()
    path = Path(log)
    if not path.exists():
        return found
    for line in path.read_text(errors="replace").splitlines():
        if '"partitions_assigned"' not in line:
            continue
        for name in json.loads(line).get("partitions", []):
            found.add(int(name.rsplit("[", 1)[1].rstrip("]")))
    return found


def test_sigterm_finishes_the_batch_commits_and_exits_zero(
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    tmp_path: Any,
    spawned: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    stream = k.Stream(kafka_bootstrap, topic, total=6_000, rate=1_000, poison_every=300)
    stream.register_devices()
    settings = make_settings(batch_max_messages=200)
    log_path = str(tmp_path / "w.log")
    worker = spawned(spawn_worker(settings_env(settings), log_path=log_path))
    stream.start()
    wait_for(lambda: processed(db) > 1_000, timeout=60, message="progress")
    worker.send_signal(signal.SIGTERM)
    asked = time.monotonic()
    assert exit_code(worker, 30, log_path) == 0
    assert time.monotonic() - asked < 15
    stream.join()
    run_until_idle(settings, idle=3)
    assert_exact(db, stream)


def test_sigusr1_prints_every_threads_stack_and_the_worker_goes_on(
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    tmp_path: Any,
    spawned: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    stream = k.Stream(kafka_bootstrap, topic, total=400, rate=2_000, poison_every=100)
    stream.register_devices()
    settings = make_settings()
    log_path = tmp_path / "w.log"
    worker = spawned(spawn_worker(settings_env(settings), log_path=str(log_path)))
    wait_for(lambda: b"worker_started" in log_path.read_bytes(), timeout=60, message="start")
    worker.send_signal(signal.SIGUSR1)
    wait_for(lambda: b"Current thread" in log_path.read_bytes(), timeout=10, message="stacks")
    assert b"in run\n" in log_path.read_bytes()  # the main thread's frame in Worker.run
    stream.start()
    stream.join()
    wait_for(lambda: processed(db) == stream.sent + len(stream.devices), timeout=60, message="all")
    worker.send_signal(signal.SIGTERM)
    assert exit_code(worker, 30, str(log_path)) == 0
    assert_exact(db, stream)


def test_partitions_assigned_while_postgres_is_down_wait_for_their_positions(
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    pg_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, proxied_url = pg_proxy
    settings = make_settings(database_url=proxied_url)
    stream = k.Stream(kafka_bootstrap, topic, total=3_000, rate=3_000, poison_every=500)
    stream.register_devices()
    stream.start()
    stream.join()
    run_until_idle(settings, idle=2)  # a first worker processes everything and stores its positions
    first = processed(db)
    assert first == stream.sent + len(stream.devices)
    more = k.Stream(kafka_bootstrap, topic, total=1_000, rate=5_000, poison_every=250)
    more.devices = stream.devices
    proxy.refuse()
    with threaded_worker(settings) as worker:
        # the new worker is assigned its partitions while PostgreSQL is unreachable: it must neither
        # fall back to an earlier offset nor dead-letter anything
        wait_for(lambda: worker.app.worker.source.assignment, timeout=60, message="assignment")
        assert worker.app.worker.source.unpositioned
        more.start()
        more.join()
        time.sleep(3)  # PostgreSQL stays away a while after the assignment
        proxy.forward()
        wait_for(lambda: processed(db) >= first + more.sent, timeout=60, message="the new events")
        stats = worker.stop()
    assert stats.consumed == more.sent  # nothing before the stored positions was read again
    assert (
        scalar(db, "SELECT sum(reading_count) FROM devices")
        == stream.expected_readings + more.expected_readings
    )
    assert scalar(db, "SELECT count(*) FROM dlq") == stream.expected_poison + more.expected_poison


def test_a_stop_during_an_outage_commits_nothing_past_the_failed_batch(
    make_settings: Callable[..., Settings],
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
    pg_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, proxied_url = pg_proxy
    stream = k.Stream(kafka_bootstrap, topic, total=8_000, rate=2_000, poison_every=400)
    stream.register_devices()
    settings = make_settings(database_url=proxied_url, batch_max_messages=300)
    worker = ThreadedWorker(settings).start()
    stream.start()
    wait_for(lambda: processed(db) > 1_500, timeout=60, message="progress before the outage")
    proxy.refuse()  # mid-stream: a batch is in flight or being decoded behind it
    wait_for(lambda: worker.app.worker.stats.retries >= 2, timeout=30, message="retries")
    worker.stop()  # shutdown while PostgreSQL is away: the batch in hand is given up, not skipped
    stream.join()
    proxy.forward()
    run_until_idle(make_settings(), idle=3)
    assert_exact(db, stream)

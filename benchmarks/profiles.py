"""How big each scenario is: the full profile the issue asks for, and a `--quick` one for CI."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    partitions: int
    devices: int
    happy_events: int  # device.reading events in the happy-path topic (registrations come first)
    naive_events: int  # the naive baseline runs on the first N messages of the same topic
    storm_events: int  # per failure-storm run
    replay_rows: int
    simulate_rows: int  # DLQ rows of one error group run through DLQService.simulate
    latency_rate: float  # events/s
    latency_seconds: float
    memory_events: int
    idle_seconds: float = 2.0  # `stop_when_idle` of the in-process worker runs


FULL = Profile(
    name="full",
    partitions=4,
    devices=1_000,
    happy_events=200_000,
    naive_events=10_000,
    storm_events=50_000,
    replay_rows=200_000,
    simulate_rows=10_000,
    latency_rate=2_000,
    latency_seconds=30,
    memory_events=1_000_000,
)

QUICK = Profile(
    name="quick",
    partitions=4,
    devices=200,
    happy_events=20_000,
    naive_events=2_000,
    storm_events=10_000,
    replay_rows=2_000,
    simulate_rows=2_000,
    latency_rate=2_000,
    latency_seconds=6,
    memory_events=100_000,
)

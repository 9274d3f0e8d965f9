"""Measuring the real worker from outside, without changing it.

Rates are taken from the end of the first batch to the end of the last, counting the events of every
batch but the first: that leaves out the consumer group join (seconds on Tansu) and the idle wait
before `stop_when_idle` ends the run, and it is the same rule for the worker and the baselines.
"""

from __future__ import annotations

import functools
import inspect
import math
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from eventhandler.app import App
from eventhandler.batch import BatchResult, Record


@dataclass
class Clock:
    """Events per second between the first and the last `mark`."""

    total: int = 0
    first_count: int = 0
    first_at: float | None = None
    last_at: float | None = None

    def mark(self, count: int, at: float | None = None) -> None:
        at = time.perf_counter() if at is None else at
        if self.first_at is None:
            self.first_at, self.first_count = at, count
        self.last_at = at
        self.total += count

    @property
    def seconds(self) -> float:
        if self.first_at is None or self.last_at is None:
            return 0.0
        return self.last_at - self.first_at

    @property
    def rate(self) -> float | None:
        if not self.seconds:
            return None
        return (self.total - self.first_count) / self.seconds


TRANSACTION = "PostgreSQL transaction (incl. pool, deadline)"  # the committer thread's step
# (owner, method name, label, nested inside another timed step): public methods of one app's objects
_STEPS: tuple[tuple[str, str, str, bool], ...] = (
    ("source", "consume", "consume (librdkafka → Record)", False),
    ("processor", "decode", "decode (JSON + pydantic)", False),
    ("inflight", "transaction", TRANSACTION, False),
    ("processor", "write", "… of which BatchProcessor.write", True),
    ("source", "commit_offsets", "Kafka offset commit", False),
)
OBSERVERS = "observers (metrics, stats, batch log line)"


class _Timed:
    """A callable object timed like a method (the in-flight batch's `Transaction`)."""

    def __init__(self, inner: Any, charge: Any) -> None:
        self._inner, self._charge = inner, charge

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self._charge(started, time.perf_counter())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class WorkerProbe:
    """Times a few public methods of one built `App`'s objects (instance attributes, so the classes
    and any other worker stay untouched) and the observers the app tells of every settled batch
    (`App.observers.settled`), after which it notes the batch: its end time and size, the time spent
    in each step, and optionally the produce-to-commit latency of every record.

    Step times count only inside the clock's window (after the first batch, up to the last), so
    they add up with the rate: the group join and the idle tail are left out of both. (The
    transaction runs in the in-flight batch's thread, overlapping the next batch's consume and decode,
    so step times may add up to more than the window.)"""

    app: App
    latency_after_ms: float | None = None  # collect latencies of records produced after this
    clock: Clock = field(default_factory=Clock)
    steps: dict[str, float] = field(default_factory=dict)
    nested: set[str] = field(default_factory=set)
    latencies_ms: list[float] = field(default_factory=list)
    # (start, end) of every main-thread step and every transaction, to measure how far they overlap
    main_spans: list[tuple[float, float]] = field(default_factory=list)
    transaction_spans: list[tuple[float, float]] = field(default_factory=list)
    _pending: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        worker = self.app.worker
        owners = {"source": worker.source, "processor": worker.processor, "inflight": worker.inflight}
        for owner, name, label, nested in _STEPS:
            self._time(owners[owner], name, label)
            if nested:
                self.nested.add(label)
        self.steps[OBSERVERS] = 0.0
        self._pending = dict.fromkeys(self.steps, 0.0)
        observers = self.app.observers
        settled = observers.settled

        def observed(records: list[Record], result: BatchResult, seconds: float) -> None:
            started = time.perf_counter()
            settled(records, result, seconds)
            ended = time.perf_counter()
            self._pending[OBSERVERS] += ended - started
            self.main_spans.append((started, ended))
            self._batch_end(records)  # the observers ran last: this batch is done

        observers.settled = observed  # type: ignore[method-assign]

    def _batch_end(self, records: list[Record]) -> None:
        first = self.clock.first_at is None
        self.clock.mark(len(records))
        if not first:
            for label, spent in self._pending.items():
                self.steps[label] += spent
        self._pending = dict.fromkeys(self.steps, 0.0)
        if self.latency_after_ms is not None:
            self._latencies(records)

    def _charge(self, label: str) -> Any:
        spans = self.transaction_spans if label == TRANSACTION else self.main_spans
        nested = any(inside for _, _, name, inside in _STEPS if name == label)  # its parent's span counts

        def charge(started: float, ended: float) -> None:
            self._pending[label] = self._pending.get(label, 0.0) + ended - started
            if not nested:
                spans.append((started, ended))

        return charge

    def _time(self, target: object, name: str, label: str) -> None:
        method = getattr(target, name, None)
        if method is None:  # the worker changed under us: report what is still there
            return
        self.steps[label] = 0.0
        charge = self._charge(label)
        if not inspect.ismethod(method):
            setattr(target, name, _Timed(method, charge))
            return

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                charge(started, time.perf_counter())

        setattr(target, name, timed)

    @property
    def unaccounted(self) -> float:
        """The main thread's window time outside its timed steps (the loop itself, waiting for the
        transaction to settle, Records → batch…): the transaction runs on the committer thread, so it
        is not subtracted here (see `overlap`)."""
        main = sum(
            seconds
            for label, seconds in self.steps.items()
            if label not in self.nested and label != TRANSACTION
        )
        return self.clock.seconds - main

    @property
    def overlap(self) -> float:
        """Window time during which the committer thread's transaction ran while the main thread was
        in one of its timed steps."""
        start, end = self.clock.first_at, self.clock.last_at
        if start is None or end is None:
            return 0.0
        main = _clipped(self.main_spans, start, end)
        transactions = _clipped(self.transaction_spans, start, end)
        total, i = 0.0, 0
        for t_start, t_end in transactions:  # both lists sorted, and a thread's spans never overlap
            while i < len(main) and main[i][1] <= t_start:
                i += 1
            j = i
            while j < len(main) and main[j][0] < t_end:
                total += min(t_end, main[j][1]) - max(t_start, main[j][0])
                j += 1
        return total

    @property
    def window_events(self) -> int:
        return self.clock.total - self.clock.first_count

    def _latencies(self, records: list[Record]) -> None:
        committed_ms = time.time() * 1000
        after = self.latency_after_ms or 0.0
        for record in records:
            if record.timestamp_ms is not None and record.timestamp_ms >= after:
                self.latencies_ms.append(committed_ms - record.timestamp_ms)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank), None when there is nothing to rank."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class PeakRss:
    """The peak resident set of a child process: its `VmHWM` (the kernel's high-water mark of this
    address space, reset at exec) read from /proc until the process exits. Not `wait4`'s
    `ru_maxrss`: Linux folds the forked parent's RSS (this benchmark's) into it at exec."""

    process: subprocess.Popen[bytes]
    peak_kib: int = 0

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            self.peak_kib = max(self.peak_kib, self._hwm_kib())
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {self.process.pid} still running after {timeout:.0f}s")
            time.sleep(0.1)  # sampling a monotonic high-water mark: only the last 0.1 s can be missed
        return self.process.returncode

    def _hwm_kib(self) -> int:
        try:
            with open(f"/proc/{self.process.pid}/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass  # exited between poll() and the read
        return 0


def _clipped(spans: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    return sorted((max(a, start), min(b, end)) for a, b in spans if b > start and a < end)

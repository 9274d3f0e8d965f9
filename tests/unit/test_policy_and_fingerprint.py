"""The failure policy (retry or dead-letter), the retry backoff, and the fingerprint that groups alike
DLQ failures."""

from __future__ import annotations

import random
import statistics

import psycopg
import psycopg_pool
import pytest
from psycopg import errors as pg_errors

from eventhandler.db import classify
from eventhandler.errors import (
    BrokerUnavailable,
    DatabaseUnavailable,
    DeserializationError,
    HandlerFailure,
    ProjectionFailure,
    SuspectFailure,
    TransientError,
    UnknownEventType,
)
from eventhandler.models import fingerprint, normalise_error
from eventhandler.policy import SUSPECT_ATTEMPTS, Backoff, Decision, FailurePolicy

POLICY = FailurePolicy()

# -- decide ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(psycopg.OperationalError("connection refused"), id="operational"),
        pytest.param(psycopg.InterfaceError("connection closed"), id="interface"),
        pytest.param(psycopg_pool.PoolTimeout("couldn't get a connection"), id="pool-timeout"),
        pytest.param(pg_errors.SerializationFailure("could not serialize"), id="serialization"),
        pytest.param(pg_errors.DeadlockDetected("deadlock detected"), id="deadlock"),
        pytest.param(pg_errors.QueryCanceled("statement timeout"), id="statement-timeout"),
        pytest.param(pg_errors.LockNotAvailable("lock timeout"), id="lock-timeout"),
        pytest.param(pg_errors.AdminShutdown("terminating connection"), id="server-shutdown"),
        pytest.param(pg_errors.UndefinedTable("relation does not exist"), id="missing-table"),
        pytest.param(DatabaseUnavailable("down"), id="database-unavailable"),
        pytest.param(BrokerUnavailable("down"), id="broker-unavailable"),
        pytest.param(TransientError("later"), id="transient"),
    ],
)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert POLICY.decide(exc, "projection") is Decision.RETRY


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(pg_errors.UniqueViolation("duplicate key"), id="unique"),
        pytest.param(pg_errors.ForeignKeyViolation("fk"), id="foreign-key"),
        pytest.param(pg_errors.CheckViolation("check"), id="check"),
        pytest.param(pg_errors.NotNullViolation("not null"), id="not-null"),
        pytest.param(pg_errors.NumericValueOutOfRange("out of range"), id="out-of-range"),
        pytest.param(pg_errors.InvalidTextRepresentation("bad input"), id="bad-text"),
        pytest.param(pg_errors.StringDataRightTruncation("too long"), id="too-long"),
        pytest.param(pg_errors.RaiseException("raised by a trigger"), id="plpgsql-raise"),
        pytest.param(
            pg_errors.ProgramLimitExceeded("index row size 3056 exceeds maximum"), id="index-row-too-large"
        ),
        pytest.param(pg_errors.StatementTooComplex("stack depth limit exceeded"), id="statement-too-complex"),
        pytest.param(psycopg.DataError("NUL character"), id="data-error"),
        pytest.param(UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogate"), id="unencodable"),
        pytest.param(HandlerFailure("device not registered"), id="handler"),
        pytest.param(DeserializationError("not json"), id="deserialize"),
        pytest.param(UnknownEventType("no handler"), id="unknown-type"),
        pytest.param(ProjectionFailure("constraint"), id="projection"),
        pytest.param(ValueError("a bug in a user handler"), id="value-error"),
        pytest.param(KeyError("missing"), id="key-error"),
        pytest.param(TypeError("bad operand"), id="type-error"),
    ],
)
def test_deterministic_failures_are_dead_lettered(exc: BaseException) -> None:
    assert POLICY.decide(exc, "projection") is Decision.DEAD_LETTER


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(
            pg_errors.QueryCanceled("canceling statement due to statement timeout"), id="statement-timeout"
        ),
        pytest.param(pg_errors.InternalError_("unexpected chunk number"), id="internal-error"),
    ],
)
def test_suspect_failures_are_retried_until_the_policy_isolates_them(exc: BaseException) -> None:
    assert isinstance(classify(exc), SuspectFailure)
    assert POLICY.decide(exc, "projection") is Decision.RETRY
    assert POLICY.decide(exc, "projection", isolating=True) is Decision.DEAD_LETTER


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(psycopg.OperationalError("connection refused"), id="refused"),
        pytest.param(pg_errors.AdminShutdown("terminating connection"), id="server-shutdown"),
        pytest.param(pg_errors.DeadlockDetected("deadlock detected"), id="deadlock"),
        pytest.param(pg_errors.UndefinedTable("relation does not exist"), id="missing-table"),
    ],
)
def test_an_outage_or_the_situation_is_never_isolated(exc: BaseException) -> None:
    assert POLICY.decide(exc, "projection", isolating=True) is Decision.RETRY


def test_a_handler_failure_is_dead_lettered_at_the_handler_stage_too() -> None:
    assert POLICY.decide(HandlerFailure("device not registered"), "handler") is Decision.DEAD_LETTER
    assert POLICY.decide(DatabaseUnavailable("down"), "handler") is Decision.RETRY


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(DeserializationError("not json"), id="deserialize"),
        pytest.param(ValueError("a bug in a user deserializer"), id="value-error"),
        pytest.param(DatabaseUnavailable("down"), id="even-a-transient-one"),
    ],
)
def test_anything_that_fails_to_deserialize_is_the_message_s_fault(exc: BaseException) -> None:
    assert POLICY.decide(exc, "deserialize") is Decision.DEAD_LETTER


def test_unknown_types_are_skipped_only_when_the_policy_says_so() -> None:
    unknown = UnknownEventType("no handler")
    assert POLICY.decide(unknown, "deserialize") is Decision.DEAD_LETTER
    assert FailurePolicy(skip_unknown=True).decide(unknown, "deserialize") is Decision.SKIP
    assert (
        FailurePolicy(skip_unknown=True).decide(DeserializationError("x"), "deserialize")
        is Decision.DEAD_LETTER
    )


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(ProjectionFailure("a constraint of a batch-level statement"), id="permanent"),
        pytest.param(DatabaseUnavailable("down"), id="outage"),
        pytest.param(pg_errors.UndefinedTable("relation dlq does not exist"), id="missing-table"),
    ],
)
def test_a_batch_whose_own_statements_fail_is_retried_however_often(exc: BaseException) -> None:
    for attempt in (1, SUSPECT_ATTEMPTS, 100):
        assert POLICY.decide(exc, "batch", attempt) is Decision.RETRY


def test_a_batch_is_isolated_after_suspect_attempts_suspect_failures_in_a_row() -> None:
    suspect = pg_errors.QueryCanceled("canceling statement due to statement timeout")
    decisions = [POLICY.decide(suspect, "batch", attempt) for attempt in range(1, SUSPECT_ATTEMPTS + 2)]
    assert decisions == [Decision.RETRY] * (SUSPECT_ATTEMPTS - 1) + [Decision.ISOLATE] * 2
    assert FailurePolicy(suspect_attempts=1).decide(suspect, "batch", 1) is Decision.ISOLATE


@pytest.mark.parametrize("where", ["deserialize", "handler", "projection", "batch"])
def test_what_is_not_an_exception_stops_the_worker(where: str) -> None:
    assert POLICY.decide(KeyboardInterrupt(), where) is Decision.STOP  # type: ignore[arg-type]
    assert POLICY.decide(SystemExit(1), where) is Decision.STOP  # type: ignore[arg-type]


# -- Backoff -----------------------------------------------------------------------------------------------


def test_backoff_doubles_from_the_initial_delay() -> None:
    backoff = Backoff(initial=0.2, maximum=60.0)
    rng = random.Random(1)
    for attempt, base in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 3.2)]:
        for _ in range(200):
            delay = backoff.delay(attempt, rng)
            assert base / 2 <= delay <= base, (attempt, delay)


def test_backoff_is_capped_at_the_maximum() -> None:
    backoff = Backoff(initial=0.2, maximum=15.0)
    rng = random.Random(2)
    delays = [backoff.delay(attempt, rng) for attempt in range(8, 60) for _ in range(20)]
    assert max(delays) <= 15.0
    assert min(delays) >= 7.5


@pytest.mark.parametrize("attempt", [1_025, 5_000, 1_000_000])
def test_backoff_stays_capped_however_long_an_outage_lasts(attempt: int) -> None:
    """The worker counts attempts for as long as PostgreSQL is down (1,025 attempts is about three hours
    at the default settings); the delay must stay at the cap, not overflow."""
    delay = Backoff(initial=0.2, maximum=15.0).delay(attempt, random.Random(3))
    assert 7.5 <= delay <= 15.0


def test_backoff_attempt_zero_or_below_uses_the_initial_delay() -> None:
    backoff = Backoff(initial=1.0, maximum=10.0)
    rng = random.Random(4)
    assert all(0.5 <= backoff.delay(a, rng) <= 1.0 for a in (0, -3) for _ in range(50))


def test_backoff_with_initial_above_maximum_uses_the_maximum() -> None:
    assert 2.5 <= Backoff(initial=30.0, maximum=5.0).delay(1, random.Random(5)) <= 5.0


def test_backoff_is_jittered() -> None:
    """Workers that failed together must not retry in lockstep."""
    backoff = Backoff(initial=1.0, maximum=30.0)
    rng = random.Random(6)
    delays = [backoff.delay(3, rng) for _ in range(500)]
    assert len(set(delays)) > 450
    assert statistics.pstdev(delays) > 0.3  # uniform over [2, 4] has a deviation of about 0.58
    assert min(delays) < 2.2
    assert max(delays) > 3.8


def test_backoff_uses_the_given_random_source() -> None:
    backoff = Backoff(initial=1.0, maximum=30.0)
    first = [backoff.delay(a, random.Random(7)) for a in range(1, 6)]
    again = [backoff.delay(a, random.Random(7)) for a in range(1, 6)]
    assert first == again


# -- normalise_error and fingerprint ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        pytest.param("device 'dev-1' is not registered", "device 'sensor-99' is not registered", id="quoted"),
        pytest.param('constraint "x" failed for "a"', 'constraint "x" failed for "b"', id="double-quoted"),
        pytest.param("value 42 out of range", "value -7.5e3 out of range", id="numbers"),
        pytest.param(
            "event 123e4567-e89b-12d3-a456-426614174000 failed",
            "event 9F0C1B2A-0000-4D3E-8F00-ABCDEFABCDEF failed",
            id="uuids",
        ),
        pytest.param("object 0xdeadbeefcafe1234 gone", "object 0x0123456789abcdef gone", id="hex"),
        pytest.param("device dev-1 rejected", "device dev-204 rejected", id="dashed-ids"),
        pytest.param("line 3\nTraceback: detail A", "line 4\nTraceback: detail B", id="first-line-only"),
        pytest.param("too   many\tspaces", "too many spaces", id="whitespace"),
        pytest.param(
            "reading at 2024-01-02T03:04:05Z rejected",
            "reading at 2025-11-30T17:48:59Z rejected",
            id="timestamps",
        ),
    ],
)
def test_alike_errors_have_one_fingerprint(one: str, other: str) -> None:
    assert normalise_error(one) == normalise_error(other)
    assert fingerprint("handler", "HandlerFailure", one) == fingerprint("handler", "HandlerFailure", other)


def test_normalised_text_keeps_the_words_and_marks_what_was_replaced() -> None:
    assert normalise_error("device 'dev-1' is not registered") == "device <str> is not registered"
    assert normalise_error("id 123e4567-e89b-12d3-a456-426614174000 at 12.5") == "id <uuid> at <n>"
    assert normalise_error("data.value: Input should be a valid number") == (
        "data.value: Input should be a valid number"
    )


@pytest.mark.parametrize(
    "message",
    ["device sensor42 is not registered", "column int64 overflow", "hash sha256 mismatch"],
)
def test_digits_inside_a_word_are_either_kept_or_replaced_whole(message: str) -> None:
    """A partial replacement (`sensor4<n>`) splits alike errors into groups by their first digits."""
    word = message.split()[1]
    prefix = word.rstrip("0123456789")
    normalised = normalise_error(message)
    assert word in normalised.split() or f"{prefix}<n>" in normalised.split(), normalised


def test_different_errors_have_different_fingerprints() -> None:
    base = fingerprint("handler", "HandlerFailure", "device 'a' is not registered")
    assert base != fingerprint("projection", "HandlerFailure", "device 'a' is not registered")
    assert base != fingerprint("deserialize", "HandlerFailure", "device 'a' is not registered")
    assert base != fingerprint("handler", "ProjectionFailure", "device 'a' is not registered")
    assert base != fingerprint("handler", "HandlerFailure", "device 'a' is decommissioned")


def test_fingerprint_is_short_stable_hex() -> None:
    value = fingerprint("deserialize", "DeserializationError", "message value is not valid JSON")
    assert value == fingerprint("deserialize", "DeserializationError", "message value is not valid JSON")
    assert len(value) == 16
    int(value, 16)


def test_normalised_text_is_bounded_and_safe_for_any_input() -> None:
    assert len(normalise_error("x" * 10_000)) == 500
    assert normalise_error("") == ""
    # lone surrogates (from undecodable input) and NUL still fingerprint
    assert len(fingerprint("deserialize", "DeserializationError", "bad \udcff \x00 value")) == 16

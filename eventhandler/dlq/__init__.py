"""The dead letter queue: the `dlq` table, behind one small interface per user.

- the worker writes failures and resolves replayed rows inside its batch transaction, so a DLQ row
  and the consumed position commit together (`DeadLetterWriter`; `writer.PostgresDLQWriter`);
- operators read rows and change them, each change audited (`OperatorStore`;
  `operators.PostgresOperatorStore`);
- a replay claims rows under a lease, publishes them and marks them (`ReplayRows`;
  `replays.PostgresReplayRows`).

Every statement is in `eventhandler/queries/dlq_*.sql`. Driver errors leave as `TransientError` or
`PermanentError` (see `db.translate_db_errors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import psycopg

from eventhandler.models import (
    AuditEntry,
    DepthSnapshot,
    DLQEntry,
    DLQFilter,
    DLQSummary,
    FailedMessage,
    FingerprintGroup,
    OutgoingRow,
    ReplayOrigin,
)

# a replayed message that succeeded: its origin, its event's source and id, and its value
Replay = tuple[ReplayOrigin, str, str, bytes | None]


class DeadLetterWriter(Protocol):
    """The worker's side, inside its batch transaction (the seam the unit tests fake)."""

    def record_failures(self, conn: psycopg.Connection[Any], failures: Sequence[FailedMessage]) -> list[int]:
        """Store failures inside the caller's transaction; returns their dlq_ids."""
        ...

    def open_replays(
        self, conn: psycopg.Connection[Any], consumer: str, failures: Sequence[FailedMessage]
    ) -> set[int]:
        """The positions in `failures` of replays of open rows of `consumer` (as `record_failures`
        matches a replay to its row)."""
        ...

    def resolve_replayed(
        self, conn: psycopg.Connection[Any], consumer: str, replays: Sequence[Replay]
    ) -> list[int]:
        """Mark rows whose replayed message now succeeded (and matches them), inside the caller's
        transaction."""
        ...


class DepthSource(Protocol):
    """What the metrics refresh reads."""

    def depth_snapshot(self, timeout: float = 30.0) -> DepthSnapshot: ...


class OperatorStore(DepthSource, Protocol):
    """The operators' reads and changes (the service's side)."""

    def list_rows(
        self, flt: DLQFilter, *, limit: int = 100, after_id: int | None = None
    ) -> list[DLQSummary]: ...
    def matching_ids(self, flt: DLQFilter, *, limit: int | None = None) -> list[int]: ...
    def history(self, dlq_id: int) -> list[AuditEntry]: ...
    def open_by_hour(self) -> list[int]: ...
    def count(self, flt: DLQFilter) -> int: ...
    def get(self, dlq_id: int) -> DLQEntry: ...
    def entries(self, ids: Sequence[int], max_bytes: int | None = None) -> dict[int, DLQEntry]: ...
    def fingerprints(self, flt: DLQFilter) -> list[str]: ...
    def counts_by(self, column: str, flt: DLQFilter) -> list[tuple[str | None, str, int]]: ...
    def fingerprint_groups(self, flt: DLQFilter, *, limit: int = 10) -> list[FingerprintGroup]: ...
    def oldest_pending_age(self) -> dict[str, float]: ...
    def resolve(self, ids: Sequence[int], *, actor: str, note: str | None = None) -> list[int]: ...
    def discard(self, ids: Sequence[int], *, actor: str, note: str | None = None) -> list[int]: ...
    def edit(self, dlq_id: int, payload: bytes | None, *, actor: str, detail: dict[str, Any]) -> bool: ...
    def delete(self, ids: Sequence[int], *, actor: str) -> list[int]: ...
    def audit(self, actor: str, action: str, ids: Sequence[int], detail: dict[str, Any]) -> None: ...
    def purge(self, *, older_than_seconds: float, actor: str, consumer: str | None = None) -> list[int]: ...


class ReplayRows(Protocol):
    """A replay's hold on the rows it publishes (the replayer's side)."""

    def lease(self) -> AbstractContextManager[int]: ...
    def lease_held(self, lease: int) -> bool: ...
    def matching_ids(self, flt: DLQFilter, *, limit: int | None = None) -> list[int]: ...
    def take(
        self, flt: DLQFilter, *, limit: int, lease: int, lease_seconds: float
    ) -> tuple[list[OutgoingRow], int | None]: ...
    def finish(
        self,
        *,
        lease: int,
        claim: int,
        published: dict[str, list[int]],
        actor: str,
        detail: dict[str, Any],
    ) -> None: ...

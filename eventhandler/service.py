"""The DLQ operations that operators run, shared by the command line and the admin API.

One place for the rules: which rows an operation may touch, the audit record of every change, and the
log line that goes with it. The CLI and the API only parse input and render output.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from eventhandler.dlq import PostgresDLQRepository
from eventhandler.errors import Busy, InvalidOperation, NotFound, NotPermitted, PublishFailed
from eventhandler.logs import get_logger
from eventhandler.models import DLQFilter, DLQSummary, FingerprintGroup, Status
from eventhandler.redaction import Redactor, View
from eventhandler.replay import Replayer, ReplayReport

log = get_logger("eventhandler.audit")

MAX_CONCURRENT_REPLAYS = 4
NO_GROUP = "-"  # a fingerprint no row has (stored ones are 16 hex digits)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `2h`, `7d`, `1w` → seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30m, 2h or 7d")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def replay_target_problem(topic: str | None) -> str | None:
    """Why a replay may not publish to `topic` (None: it may)."""
    if topic is not None and topic.startswith("_"):  # __consumer_offsets, _schemas, _confluent-…
        return f"{topic!r} is one of Kafka's internal topics; a replay never publishes there"
    return None


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC if no offset is given) or an age such as `2h` (meaning 2 hours ago)."""
    try:
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(text))
    except OverflowError:
        raise ValueError(f"{text!r} reaches too far back") from None
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is neither an ISO 8601 time nor an age like 2h") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Stats:
    total: int
    by_status: dict[str, int]
    by_consumer: list[tuple[str | None, str, int]]
    by_stage: list[tuple[str | None, str, int]]
    by_event_type: list[tuple[str | None, str, int]]
    oldest_pending_age_seconds: dict[str, float]
    top_groups: list[FingerprintGroup]

    def as_dict(self) -> dict[str, Any]:
        def rows(items: list[tuple[str | None, str, int]], name: str) -> list[dict[str, Any]]:
            return [{name: key, "status": status, "count": count} for key, status, count in items]

        return {
            "total": self.total,
            "by_status": self.by_status,
            "by_consumer": rows(self.by_consumer, "consumer"),
            "by_stage": rows(self.by_stage, "stage"),
            "by_event_type": rows(self.by_event_type, "event_type"),
            "oldest_pending_age_seconds": self.oldest_pending_age_seconds,
            "top_groups": [g.model_dump(mode="json") for g in self.top_groups],
        }


class DLQService:
    def __init__(
        self,
        repository: PostgresDLQRepository,
        replayer: Replayer,
        *,
        redactor: Redactor | None = None,
    ) -> None:
        self.repository = repository
        self.replayer = replayer
        self.redactor = redactor or Redactor(())
        # Each replay holds a thread (and a producer) while it publishes; the API answers 503 beyond this.
        self._replays = threading.BoundedSemaphore(MAX_CONCURRENT_REPLAYS)

    # -- reading ---------------------------------------------------------------------------------------

    # Every read an operator sees goes through the redactor (see `redaction`).

    def readable_filter(self, flt: DLQFilter, *, reader: bool) -> DLQFilter:
        """A filter as an operator gave it (API, CLI), ready for the repository; call it once per
        request. While fields are redacted, a search in error text would confirm a guessed value to
        a read-only caller (`total` answers whether the text occurs), so only the admin token may
        search; and the fingerprint a view showed is keyed (see `Redactor.fingerprint`): it is
        turned back into the stored one here."""
        if reader and flt.error_contains is not None and self.redactor.active:
            raise NotPermitted(
                "error_contains needs the admin token while EVENTHANDLER_API_REDACT_FIELDS is set "
                "(a search would confirm redacted values); filter by fingerprint instead"
            )
        if not self.redactor.active or flt.fingerprint is None:
            return flt
        stored = self.repository.fingerprints(flt.model_copy(update={"fingerprint": None}))
        shown = {self.redactor.fingerprint(fingerprint): fingerprint for fingerprint in stored}
        return flt.model_copy(update={"fingerprint": shown.get(flt.fingerprint, NO_GROUP)})

    def list_rows(self, flt: DLQFilter, *, limit: int = 50, after_id: int | None = None) -> list[DLQSummary]:
        rows = self.repository.list_rows(flt, limit=limit, after_id=after_id)
        full = self.repository.entries([row.dlq_id for row in rows]) if self.redactor.active else {}
        return [self.redactor.summary(row, full.get(row.dlq_id)) for row in rows]

    def count(self, flt: DLQFilter) -> int:
        return self.repository.count(flt)

    def status(self, dlq_id: int) -> Status:
        return self.repository.get(dlq_id).status

    def view(self, dlq_id: int, *, reader: bool = False) -> View:
        """A row as operators see it. A read-only caller gets no traceback: its source paths and
        line numbers describe the deployment, not the message."""
        view = self.redactor.view(self.repository.get(dlq_id))
        if reader:
            view.entry = view.entry.model_copy(update={"error_traceback": None})
        return view

    def stats(self, flt: DLQFilter, *, top: int = 10) -> Stats:
        by_consumer = self.repository.counts_by("consumer", flt)
        by_status: dict[str, int] = {}
        for _, status, count in by_consumer:
            by_status[status] = by_status.get(status, 0) + count
        return Stats(
            total=sum(by_status.values()),
            by_status=by_status,
            by_consumer=by_consumer,
            by_stage=self.repository.counts_by("stage", flt),
            by_event_type=self.repository.counts_by("event_type", flt),
            oldest_pending_age_seconds=self.repository.oldest_pending_age(),
            top_groups=self._groups(flt, top),
        )

    def _groups(self, flt: DLQFilter, top: int) -> list[FingerprintGroup]:
        groups = self.repository.fingerprint_groups(flt, limit=top)
        samples = self.repository.entries([g.sample_id for g in groups]) if self.redactor.active else {}
        return [self.redactor.group(group, samples.get(group.sample_id)) for group in groups]

    # -- changing (each audited) ------------------------------------------------------------------------

    def require_ids(self, ids: Sequence[int]) -> None:
        """Raise `NotFound` naming the ids that do not exist."""
        missing = sorted(
            set(ids)
            - {r.dlq_id for r in self.repository.list_rows(DLQFilter(ids=tuple(ids)), limit=len(ids))}
        )
        if missing:
            raise NotFound(f"no DLQ row with id {', '.join(map(str, missing))}")

    def resolve(self, ids: Sequence[int], *, actor: str, note: str | None = None) -> list[int]:
        self.require_ids(ids)
        changed = self.repository.resolve(ids, actor=actor, note=note)
        log.info("dlq_resolved", actor=actor, dlq_ids=changed, requested=list(ids), note=note)
        return changed

    def discard(self, ids: Sequence[int], *, actor: str, note: str | None = None) -> list[int]:
        self.require_ids(ids)
        changed = self.repository.discard(ids, actor=actor, note=note)
        log.info("dlq_discarded", actor=actor, dlq_ids=changed, requested=list(ids), note=note)
        return changed

    def delete(self, ids: Sequence[int], *, actor: str) -> list[int]:
        self.require_ids(ids)
        deleted = self.repository.delete(ids, actor=actor)
        log.info("dlq_deleted", actor=actor, dlq_ids=deleted)
        return deleted

    def purge(self, *, older_than_seconds: float, actor: str, consumer: str | None = None) -> list[int]:
        if older_than_seconds <= 0:
            raise InvalidOperation("purge needs a positive age")
        deleted = self.repository.purge(older_than_seconds=older_than_seconds, actor=actor, consumer=consumer)
        log.info("dlq_purged", actor=actor, count=len(deleted), older_than_seconds=older_than_seconds)
        return deleted

    # -- replay: one rule for the CLI, the API and the console -------------------------------------

    @staticmethod
    def replayable(flt: DLQFilter, *, force: bool = False, to_topic: str | None = None) -> DLQFilter:
        """The rows a replay may take. A resolved or discarded row is replayed only with `force`; with
        no status named, pending and replayed rows are (all of them with `force`). Kafka's internal
        topics are never a target."""
        problem = replay_target_problem(to_topic)
        if problem:
            raise InvalidOperation(problem)
        if force:
            return flt
        closed = sorted({"resolved", "discarded"} & set(flt.statuses))
        if closed:
            raise InvalidOperation(f"replaying {' or '.join(closed)} rows needs force")
        return flt if flt.statuses else flt.model_copy(update={"statuses": ("pending", "replayed")})

    def retry(
        self, dlq_id: int, *, actor: str, force: bool = False, to_topic: str | None = None
    ) -> ReplayReport:
        """Replay one row, or say exactly why not."""
        status = self.status(dlq_id)
        if status in ("resolved", "discarded") and not force:
            raise InvalidOperation(f"DLQ row {dlq_id} is {status}; set force to true to replay it anyway")
        report = self.replay(DLQFilter(ids=(dlq_id,)), actor=actor, limit=1, to_topic=to_topic, force=force)
        if report.matched == 0:
            raise InvalidOperation(f"DLQ row {dlq_id} changed status meanwhile; look at it again")
        if report.failed:
            raise PublishFailed(report.failures.get(dlq_id, "delivery not confirmed"))
        if report.published == 0:
            raise InvalidOperation(f"DLQ row {dlq_id} is being replayed by another request")
        return report

    def replay(
        self,
        flt: DLQFilter,
        *,
        actor: str,
        limit: int | None = None,
        to_topic: str | None = None,
        rate: float | None = None,
        dry_run: bool = False,
        force: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> ReplayReport:
        flt = self.replayable(flt, force=force, to_topic=to_topic)
        if flt.ids:
            self.require_ids(flt.ids)
        if not self._replays.acquire(blocking=False):
            raise Busy(f"{MAX_CONCURRENT_REPLAYS} replays are running already; try again when one is done")
        try:
            report = self.replayer.replay(
                flt,
                limit=limit,
                to_topic=to_topic,
                rate=rate,
                dry_run=dry_run,
                actor=actor,
                progress=progress,
            )
        finally:
            self._replays.release()
        if not dry_run:
            log.info(
                "dlq_replayed",
                actor=actor,
                matched=report.matched,
                published=report.published,
                failed=report.failed,
                to_topic=to_topic,
            )
        return report

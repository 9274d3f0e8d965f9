"""The DLQ operations that operators run, shared by the command line and the admin API.

One place for the rules: which rows an operation may touch, the audit record of every change, and the
log line that goes with it. The CLI and the API only parse input and render output.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from eventhandler import repair
from eventhandler.canary import Canary, Outcomes, canary_replay
from eventhandler.circuits import CircuitBoard
from eventhandler.detail import row_detail
from eventhandler.dlq import OperatorStore
from eventhandler.errors import Busy, InvalidOperation, NotFound, NotPermitted, PublishFailed
from eventhandler.filters import replay_target_problem
from eventhandler.logs import get_logger
from eventhandler.models import (
    STATUSES,
    AuditEntry,
    CircuitState,
    DLQDetail,
    DLQFilter,
    DLQSummary,
    FingerprintGroup,
    Stats,
    Status,
)
from eventhandler.redaction import Redactor, View
from eventhandler.replay import Replayer, ReplayPlan, ReplayReport
from eventhandler.simulate import Simulation, Simulator

log = get_logger("eventhandler.audit")

MAX_CONCURRENT_REPLAYS = 4
MAX_CIRCUIT_CLOSE_SECONDS = 30 * 86_400  # an operator lets a systemic failure through for a month at most
NO_GROUP = "-"  # a fingerprint no row has (stored ones are 16 hex digits)
PARKED_NOT_REPLAYED = (
    "parked rows are not replayed: the worker releases them in order once the failure that blocks "
    "their key is closed (replay or resolve that row)"
)
Closed = Literal["resolved", "discarded"]  # what an operator closes a row as


class DLQService:
    def __init__(
        self,
        repository: OperatorStore,
        replayer: Replayer,
        *,
        redactor: Redactor | None = None,
        circuits: CircuitBoard | None = None,
        simulator: Simulator | None = None,
    ) -> None:
        self.repository = repository
        self.replayer = replayer
        self.simulator = simulator
        self.circuit_board = circuits
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
        if reader and self.redactor.active and (flt.error_contains or flt.payload_contains) is not None:
            raise NotPermitted(
                "error_contains and payload_contains need the admin token while "
                "EVENTHANDLER_API_REDACT_FIELDS is set (a search would confirm redacted values)"
            )
        if not self.redactor.active or flt.fingerprint is None:
            return flt
        stored = self.repository.fingerprints(flt.model_copy(update={"fingerprint": None}))
        shown = {self.redactor.fingerprint(fingerprint): fingerprint for fingerprint in stored}
        return flt.model_copy(update={"fingerprint": shown.get(flt.fingerprint, NO_GROUP)})

    def list_rows(self, flt: DLQFilter, *, limit: int = 50, after_id: int | None = None) -> list[DLQSummary]:
        rows = self.repository.list_rows(flt, limit=limit, after_id=after_id)
        return self.redactor.summaries(rows, self.repository.entries)

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

    def history(self, dlq_id: int) -> list[AuditEntry]:
        """Who did what to a row, oldest first (the audit rows hold no redacted value)."""
        return self.repository.history(dlq_id)

    def detail(self, dlq_id: int, *, reader: bool = False) -> DLQDetail:
        return row_detail(self.view(dlq_id, reader=reader))

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
            circuits=self.circuits(flt.consumer) if self.circuit_board is not None else [],
            open_by_hour=self.repository.open_by_hour(),
        )

    def _groups(self, flt: DLQFilter, top: int) -> list[FingerprintGroup]:
        groups = self.repository.fingerprint_groups(flt, limit=top)
        samples = self.repository.entries([g.sample_id for g in groups]) if self.redactor.active else {}
        return [self.redactor.group(group, samples.get(group.sample_id)) for group in groups]

    # -- the flood guard's circuits -------------------------------------------------------------

    def circuits(self, consumer: str | None = None) -> list[CircuitState]:
        """Circuits as views show them: the fingerprint keyed and the error withheld while redacting
        (its text may quote a masked value, and the circuit keeps no payload to find it by)."""
        return [self._circuit_view(c) for c in self._board().circuits(consumer)]

    def close_circuit(
        self, fingerprint: str, *, consumer: str | None, seconds: float, actor: str, note: str | None = None
    ) -> CircuitState:
        """An operator closes a circuit (`fingerprint` as views show it): its failure is dead-lettered
        for `seconds`, then the guard judges it again. The workers read it at their next trial."""
        if not 0 < seconds <= MAX_CIRCUIT_CLOSE_SECONDS:
            raise InvalidOperation(
                f"a circuit is closed for more than 0 s and at most {MAX_CIRCUIT_CLOSE_SECONDS:g} s"
            )
        found = [
            c
            for c in self._board().circuits(consumer, limit=10_000)
            if self.redactor.fingerprint(c.fingerprint) == fingerprint
        ]
        if not found:
            raise NotFound(
                f"no circuit with fingerprint {fingerprint}" + (f" for {consumer}" if consumer else "")
            )
        if len(found) > 1:
            consumers = ", ".join(sorted(c.consumer for c in found))
            raise InvalidOperation(f"circuits of {consumers} have that fingerprint: name the consumer")
        closed = self._board().close_by_operator(
            found[0].consumer, found[0].fingerprint, seconds=seconds, actor=actor, note=note
        )
        log.info(
            "circuit_closed",
            actor=actor,
            consumer=closed.consumer,
            fingerprint=fingerprint,
            seconds=seconds,
            note=note,
        )
        return self._circuit_view(closed)

    def _board(self) -> CircuitBoard:
        if self.circuit_board is None:
            raise InvalidOperation("this service was built without the flood guard's circuits")
        return self.circuit_board

    def _circuit_view(self, circuit: CircuitState) -> CircuitState:
        if not self.redactor.active:
            return circuit
        return circuit.model_copy(
            update={"fingerprint": self.redactor.fingerprint(circuit.fingerprint), "error_message": None}
        )

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
        return self._close(ids, "resolved", actor, note)

    def discard(self, ids: Sequence[int], *, actor: str, note: str | None = None) -> list[int]:
        return self._close(ids, "discarded", actor, note)

    def _close(self, ids: Sequence[int], status: Closed, actor: str, note: str | None) -> list[int]:
        """The ids changed: not those closed already, nor those a replay is publishing."""
        self.require_ids(ids)
        close = self.repository.resolve if status == "resolved" else self.repository.discard
        changed = close(ids, actor=actor, note=note)
        log.info(f"dlq_{status}", actor=actor, dlq_ids=changed, requested=list(ids), note=note)
        return changed

    def close_row(self, dlq_id: int, status: Closed, *, actor: str, note: str | None = None) -> bool:
        """Resolve or discard one row: True when it changed, False when it had that status already.
        Only a pending or replayed row can be closed (a discarded row resolved would say its cause was
        dealt with), and not while a replay is publishing it."""
        if self._close([dlq_id], status, actor, note):
            return True
        now = self.status(dlq_id)
        if now == status:
            return False
        if now in ("pending", "replayed"):  # what a close takes: a replay's claim held it back
            raise InvalidOperation(f"DLQ row {dlq_id} is being replayed; look at it again once it is marked")
        raise InvalidOperation(f"DLQ row {dlq_id} is {now}; only pending or replayed rows can be {status}")

    def edit(
        self,
        dlq_id: int,
        *,
        actor: str,
        payload: bytes | None = None,
        patch: Sequence[dict[str, Any]] | None = None,
        note: str | None = None,
    ) -> View:
        """Keep a repair of a pending row's payload beside its original bytes: a whole new `payload`,
        or a JSON Patch applied to the current one (the repair, if there is one). Checked with the
        current deserializer first; audited with the diff as views show it."""
        entry = self.repository.get(dlq_id)
        if entry.status != "pending":
            raise InvalidOperation(f"DLQ row {dlq_id} is {entry.status}; only a pending row can be edited")
        new = repair.new_payload(entry, payload, patch, may_test=not self.redactor.active)
        try:
            repair.validate(entry, new, self._simulator().deserialize)
        except InvalidOperation as exc:  # the error may quote the payload's values
            shown = self.redactor.entry_text(entry.model_copy(update={"edited_payload": new}), str(exc))
            raise InvalidOperation(shown) from None
        stored = None if new == entry.event_payload else new  # back to the original: no repair
        after = self.redactor.view(entry.model_copy(update={"edited_payload": stored}))
        detail = {"diff": after.diff, "note": note, "bytes": len(new), "undone": stored is None}
        if not self.repository.edit(dlq_id, stored, actor=actor, detail=detail):
            raise InvalidOperation(f"DLQ row {dlq_id} is being replayed or changed status; look at it again")
        log.info("dlq_edited", actor=actor, dlq_id=dlq_id, changes=len(after.diff or []), note=note)
        return self.view(dlq_id)

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

    def _replayable(self, flt: DLQFilter, *, force: bool, to_topic: str | None) -> DLQFilter:
        """The rows a replay may take. A resolved or discarded row is replayed only with `force`; with
        no status named, pending and replayed rows are (all of them with `force`). Kafka's internal
        topics are never a target, and every id named must exist. Parked rows are never replayed, not
        even with force: the worker releases them in their key's order (a replay would apply one out
        of it)."""
        problem = replay_target_problem(to_topic)
        if problem:
            raise InvalidOperation(problem)
        if "parked" in flt.statuses:
            raise InvalidOperation(PARKED_NOT_REPLAYED)
        if force and not flt.statuses:
            flt = flt.model_copy(update={"statuses": tuple(s for s in STATUSES if s != "parked")})
        if not force:
            closed = sorted({"resolved", "discarded"} & set(flt.statuses))
            if closed:
                raise InvalidOperation(f"replaying {' or '.join(closed)} rows needs force")
            if not flt.statuses:
                flt = flt.model_copy(update={"statuses": ("pending", "replayed")})
        if flt.ids:
            self.require_ids(flt.ids)
        return flt

    def preview(
        self,
        flt: DLQFilter,
        *,
        limit: int | None = None,
        to_topic: str | None = None,
        force: bool = False,
        rows: int = 0,
    ) -> ReplayPlan:
        """The dry run of `replay` with the same arguments: how many rows it would take and (`rows`)
        the first of them. Nothing changes and nothing is audited. It answers `Busy` whenever the
        replay would, so that a dry run tells the caller what pressing the button would do."""
        flt = self._replayable(flt, force=force, to_topic=to_topic)
        with self._replay_slot():
            pass
        matched = self.count(flt)
        matched = min(matched, limit) if limit is not None else matched
        shown = self.list_rows(flt, limit=min(matched, rows)) if matched and rows else []
        return ReplayPlan(matched=matched, rows=shown)

    def simulate(
        self, flt: DLQFilter, *, actor: str, limit: int | None = None, force: bool = False
    ) -> Simulation:
        """What `replay` with the same arguments would do: the current code run on the rows in a
        transaction that is rolled back (see `simulate`). Nothing changes, so nothing is audited."""
        flt = self._replayable(flt, force=force, to_topic=None)
        with self._replay_slot():
            simulation = self._simulator().simulate(flt, limit=limit)
        log.info("dlq_simulated", actor=actor, matched=simulation.matched, **simulation.outcomes)
        return simulation

    def _simulator(self) -> Simulator:
        if self.simulator is None:
            raise InvalidOperation("this service was built without the handlers' code (a simulator)")
        return self.simulator

    def retry(
        self, dlq_id: int, *, actor: str, force: bool = False, to_topic: str | None = None
    ) -> ReplayReport:
        """Replay one row, or say exactly why not."""
        status = self.status(dlq_id)
        if status == "parked":
            raise InvalidOperation(f"DLQ row {dlq_id} is parked; {PARKED_NOT_REPLAYED}")
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

    @contextmanager
    def _replay_slot(self) -> Iterator[None]:
        """One of the `MAX_CONCURRENT_REPLAYS` slots (each replay holds a thread and a producer)."""
        if not self._replays.acquire(blocking=False):
            raise Busy(f"{MAX_CONCURRENT_REPLAYS} replays are running already; try again when one is done")
        try:
            yield
        finally:
            self._replays.release()

    def replay(
        self,
        flt: DLQFilter,
        *,
        actor: str,
        limit: int | None = None,
        to_topic: str | None = None,
        rate: float | None = None,
        force: bool = False,
        progress: Callable[[int], None] | None = None,
        canary: Canary | None = None,
        on_outcomes: Callable[[Outcomes], None] | None = None,
    ) -> ReplayReport:
        """Republish the matching rows (at most `limit`, oldest first); `preview` is its dry run.
        With a `canary`, the first rows go alone, and the rest only if enough of them resolve."""
        flt = self._replayable(flt, force=force, to_topic=to_topic)

        def publish(rows: DLQFilter, limit: int | None = limit) -> ReplayReport:
            return self.replayer.replay(
                rows, limit=limit, to_topic=to_topic, rate=rate, actor=actor, progress=progress
            )

        with self._replay_slot():
            if canary is None:
                report = publish(flt)
            else:
                report = canary_replay(
                    self.repository,
                    flt,
                    canary,
                    lambda f: publish(f, None),
                    limit=limit,
                    actor=actor,
                    on_outcomes=on_outcomes,
                )
        log.info(
            "dlq_replayed",
            actor=actor,
            matched=report.matched,
            published=report.published,
            failed=report.failed,
            to_topic=to_topic,
        )
        return report

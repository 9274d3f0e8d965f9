"""A replay started from the console runs in a thread of the API process; its page follows it here.

The board keeps the newest jobs in memory (it is progress, not record: the audit log has what was
done). Behind a load balancer, the job's page must reach the replica that runs it (sticky sessions).
"""

from __future__ import annotations

import contextvars
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eventhandler.api.http import error_status
from eventhandler.canary import Outcomes
from eventhandler.errors import EventHandlerError
from eventhandler.logs import get_logger
from eventhandler.replay import ReplayReport

log = get_logger("eventhandler.console")
KEPT = 50


@dataclass
class Job:
    id: str
    actor: str
    matched: int
    started: float = field(default_factory=time.monotonic)
    published: int = 0  # so far
    canary: Outcomes | None = None  # the canary's outcomes so far, while it waits
    report: ReplayReport | None = None  # when done
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.report is not None or self.error is not None

    @property
    def published_ids(self) -> list[int]:
        return self.report.published_ids if self.report is not None else []

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "matched": self.matched, "published": self.published, "done": self.done}


class JobBoard:
    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, actor: str, matched: int, run: Callable[[Job], ReplayReport]) -> Job:
        """Run `run` in a thread of its own; the job it is given says how far it got."""
        job = Job(secrets.token_urlsafe(12), actor, matched)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > KEPT:
                self._jobs.popitem(last=False)

        def work() -> None:
            try:
                job.report = run(job)
            except EventHandlerError as exc:
                job.error = error_status(exc)[1]
            except Exception:  # a replay that broke must say so on its page, not vanish
                log.exception("console_replay_failed", job=job.id)
                job.error = "the replay failed (see the API's log)"

        # The request's log context (request id, client) goes with it into the audit rows; not a daemon:
        # a shutdown waits for the chunk it is publishing to be marked.
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(work,), name=f"console-replay-{job.id}").start()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

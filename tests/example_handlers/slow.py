"""A user projection whose write takes as long as its event says (`pg_sleep`), so that one event can
provoke a statement timeout while PostgreSQL answers every other statement."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from eventhandler.events import Event
from eventhandler.handlers import SimpleProjection, Write


class Slow(BaseModel):
    model_config = ConfigDict(frozen=True)
    seconds: float = Field(ge=0, le=60)


slow = SimpleProjection("example-slow")


@slow.on("example.slow", Slow)
def sleep(event: Event) -> list[Write]:
    data: Slow = event.data  # type: ignore[assignment]
    return [Write("SELECT pg_sleep(%s)", (data.seconds,))]


projections = [slow]

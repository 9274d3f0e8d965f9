"""One exception hierarchy. Every subclass says whether retrying can help.

`TransientError` means "the world is temporarily broken" (a service is down, a lock timed out):
the worker holds its position and retries. `PermanentError` means "this input will fail the same way
every time": the message goes to the dead letter queue.
"""

from __future__ import annotations


class EventHandlerError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(EventHandlerError):
    """A setting is missing or invalid; the program cannot start."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"invalid setting {setting}: {reason}")
        self.setting = setting
        self.reason = reason


class TransientError(EventHandlerError):
    """Retrying later may succeed: connectivity, timeouts, deadlocks, serialization failures."""


class PermanentError(EventHandlerError):
    """Retrying the same input fails the same way."""


class DatabaseUnavailable(TransientError):
    """PostgreSQL cannot be reached or did not answer in time."""


class SuspectFailure(TransientError):
    """PostgreSQL answered with an error that may be the situation's or one event's (a statement
    timeout, an internal error): retried like any transient failure, and once it persists while
    PostgreSQL answers, the batch is bisected and the event that still fails is dead-lettered."""


class DeserializationError(PermanentError):
    """The bytes of a message cannot become a valid event.

    `event_type` is the type the message claims, when it got that far; `json` is False when the value
    is not JSON at all (so nothing in it is worth a second look)."""

    def __init__(self, message: str, *, event_type: str | None = None, json: bool = True) -> None:
        super().__init__(message)
        self.event_type = event_type
        self.json = json


class UnknownEventType(PermanentError):
    """No handler is registered for the event's type."""


class HandlerFailure(PermanentError):
    """A handler rejected an event (a domain rule, such as a reading for an unknown device)."""


class ProjectionFailure(PermanentError):
    """PostgreSQL rejected the writes of one event (a constraint, a data error)."""


class NotFound(EventHandlerError):
    """A DLQ row (or other record) asked for by id does not exist."""


class InvalidOperation(EventHandlerError):
    """An operator asked for something the current state does not allow."""


class NotPermitted(EventHandlerError):
    """The caller's role may not do this (a read-only token asking what redaction hides)."""


class MigrationError(EventHandlerError):
    """A migration failed or the applied migrations do not match the files."""


class BrokerUnavailable(TransientError):
    """Kafka cannot be reached or did not answer in time."""


class Busy(TransientError):
    """Too many operations of one kind at once (API replays); try again shortly."""


class PublishFailed(EventHandlerError):
    """The broker rejected a message (a replay publish that did not get a successful delivery report)."""

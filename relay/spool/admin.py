"""Operator actions on queued messages (queue hold/release/delete/flush), as pure record
changes and the errors they raise. Pure: no I/O; the running relay (relay.spool.runner)
and the offline tool (relay.control.SpoolAdmin) apply them to their own state.

- hold: the message stays queued and is never delivered until released.
- release: the message is no longer held and is due now.
- flush: a deferred message that is not held is due now.
- delete: the message leaves the queue without a bounce (done by the caller).
"""

from __future__ import annotations

from dataclasses import replace

from relay.spool.records import QueuedMessage

__all__ = [
    "MessageBusy",
    "MessageHeld",
    "QueueAdminError",
    "UnknownMessage",
    "flushable",
    "on_hold",
    "released",
]


class QueueAdminError(Exception):
    """An operator action that cannot be done; `kind` names the reason on the wire."""

    kind = "error"


class UnknownMessage(QueueAdminError):
    kind = "unknown"

    def __init__(self, qid: str) -> None:
        super().__init__(f"no queued message with id {qid}")


class MessageBusy(QueueAdminError):
    kind = "busy"

    def __init__(self, qid: str) -> None:
        super().__init__(
            f"message {qid} is being delivered right now; try again when the attempt is over"
        )


class MessageHeld(QueueAdminError):
    kind = "held"

    def __init__(self, qid: str) -> None:
        super().__init__(f"message {qid} is on hold; release it to deliver it")


def on_hold(msg: QueuedMessage) -> QueuedMessage:
    return replace(msg, held=True)


def released(msg: QueuedMessage, now: float) -> QueuedMessage:
    return replace(msg, held=False, next_attempt=now)


def flushable(msg: QueuedMessage, now: float) -> bool:
    """Deferred (has pending recipients, not due yet) and not held."""
    return not msg.held and not msg.done and msg.next_attempt > now

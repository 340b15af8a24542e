"""On-disk queue records: the envelope and per-recipient state of one message.

Format version 1 is a JSON object (UTF-8). The message body lives in a separate,
immutable data file; only the envelope changes after acceptance. `dump` and
`load` are exact inverses; `load` rejects anything it does not understand with
`ValueError` so that recovery can quarantine the file instead of guessing.
Pure: no I/O.

Each recipient keeps its attempt history (`relay.model.Step`, one per connection or
failed host, oldest first), bounded: the first step and the most recent `HISTORY_KEPT`
are kept and `history_dropped` counts the ones dropped between them, so a message
retried for days does not grow without limit. The keys "history" and
"history_dropped" (and "last_relay") were added within version 1: a record without
them loads with an empty history. The optional keys "held" (an operator put the message
on hold: the runner never delivers it) and "delay_warned" (the one delay DSN was sent)
were added within version 1 as well: written only when true, so a record without them
is byte-identical to what older relays wrote and loads as false. docs/operations.md
"Queue record format" describes the JSON; `to_doc`/`from_doc` give it as a JSON object
(the control socket speaks it).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from relay.model import Outcome, Step

__all__ = [
    "FORMAT_VERSION",
    "HISTORY_KEPT",
    "QueuedMessage",
    "RecipientState",
    "RecipientStatus",
    "dump",
    "from_doc",
    "load",
    "to_doc",
    "valid_queue_id",
]

FORMAT_VERSION = 1
#: Most recent steps kept per recipient, besides the first one (RecipientState.with_steps).
HISTORY_KEPT = 20
_QID = re.compile(r"^[0-9A-F]{10,32}$")


def valid_queue_id(qid: str) -> bool:
    # fullmatch: with match(), "$" also accepts a trailing newline ("…ABC\n").
    return bool(_QID.fullmatch(qid))


class RecipientStatus(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class RecipientState:
    address: str
    status: RecipientStatus = RecipientStatus.PENDING
    attempts: int = 0
    last_reply: str = ""
    last_relay: str = ""
    history: tuple[Step, ...] = ()  # the first step and the most recent ones, oldest first
    history_dropped: int = 0  # steps dropped between the first and the kept recent ones

    def with_steps(self, steps: Iterable[Step]) -> RecipientState:
        """This state with `steps` appended to its history, bounded to the first step and
        the most recent HISTORY_KEPT; the steps dropped are counted in history_dropped."""
        history = self.history + tuple(steps)
        excess = len(history) - 1 - HISTORY_KEPT
        if excess <= 0:
            return replace(self, history=history)
        return replace(
            self,
            history=history[:1] + history[1 + excess :],
            history_dropped=self.history_dropped + excess,
        )


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    queue_id: str
    sender: str  # "" is the null reverse-path (bounces)
    recipients: tuple[RecipientState, ...]
    received: float  # epoch seconds
    next_attempt: float
    client: str = ""
    helo: str = ""
    size: int = 0
    attempts: int = 0
    is_bounce: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    held: bool = False  # on hold by the operator (queue hold): never delivered until released
    delay_warned: bool = False  # the delay DSN (delivery.delay_warning_after) was sent

    @property
    def pending(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.status is RecipientStatus.PENDING)

    @property
    def done(self) -> bool:
        return not self.pending

    def with_recipients(self, recipients: tuple[RecipientState, ...]) -> QueuedMessage:
        return replace(self, recipients=recipients)


def dump(msg: QueuedMessage) -> bytes:
    return json.dumps(to_doc(msg), sort_keys=True, separators=(",", ":")).encode()


def to_doc(msg: QueuedMessage) -> dict[str, Any]:
    """The record as a JSON-ready object (what `dump` encodes)."""
    doc: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "queue_id": msg.queue_id,
        "sender": msg.sender,
        "recipients": [
            {
                "address": r.address,
                "status": r.status.value,
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "last_relay": r.last_relay,
                "history": [_dump_step(step) for step in r.history],
                "history_dropped": r.history_dropped,
            }
            for r in msg.recipients
        ],
        "received": msg.received,
        "next_attempt": msg.next_attempt,
        "client": msg.client,
        "helo": msg.helo,
        "size": msg.size,
        "attempts": msg.attempts,
        "is_bounce": msg.is_bounce,
        "extra": msg.extra,
    }
    # Optional within version 1: present only when true (older records stay unchanged).
    if msg.held:
        doc["held"] = True
    if msg.delay_warned:
        doc["delay_warned"] = True
    return doc


def load(raw: bytes) -> QueuedMessage:
    """Parse an envelope record.

    Raises:
        ValueError: not a version-1 record or a field has the wrong type.
    """
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: nested too deeply for the parser (a damaged file).
        raise ValueError(f"not a JSON envelope record: {exc}") from exc
    return from_doc(doc)


def from_doc(doc: object) -> QueuedMessage:
    """Parse a record given as a decoded JSON value (the inverse of `to_doc`).

    Raises:
        ValueError: not a version-1 record or a field has the wrong type.
    """
    if not isinstance(doc, dict) or not _is_version(doc.get("version")):
        raise ValueError(
            f"unsupported envelope record version: {doc.get('version')!r}"
            if isinstance(doc, dict)
            else "envelope record is not an object"
        )
    try:
        recipients = tuple(
            RecipientState(
                address=_str(r["address"]),
                status=RecipientStatus(r["status"]),
                attempts=_int(r["attempts"]),
                last_reply=_str(r["last_reply"]),
                last_relay=_str(r.get("last_relay", "")),
                history=tuple(_load_step(step) for step in _list(r.get("history", []))),
                history_dropped=_count(r.get("history_dropped", 0)),
            )
            for r in doc["recipients"]
        )
        qid = _str(doc["queue_id"])
        if not valid_queue_id(qid):
            raise ValueError(f"bad queue id {qid!r}")
        extra = doc.get("extra", {})
        if not isinstance(extra, dict):
            raise ValueError("extra is not an object")
        return QueuedMessage(
            queue_id=qid,
            sender=_str(doc["sender"]),
            recipients=recipients,
            received=_num(doc["received"]),
            next_attempt=_num(doc["next_attempt"]),
            client=_str(doc["client"]),
            helo=_str(doc["helo"]),
            size=_int(doc["size"]),
            attempts=_int(doc["attempts"]),
            is_bounce=_bool(doc["is_bounce"]),
            extra=extra,
            held=_bool(doc.get("held", False)),
            delay_warned=_bool(doc.get("delay_warned", False)),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed envelope record: {exc!r}") from exc


def _dump_step(step: Step) -> dict[str, Any]:
    return {
        "time": step.time,
        "outcome": step.outcome.value,
        "reply": step.reply,
        "host": step.host,
        "address": step.address,
        "port": step.port,
        "tls": step.tls,
        "dane": step.dane,
    }


def _load_step(doc: object) -> Step:
    if not isinstance(doc, dict):
        raise TypeError(f"expected a history step object, got {doc!r}")
    port = _int(doc["port"])
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port in history step: {port}")
    return Step(
        time=_num(doc["time"]),
        outcome=Outcome(doc["outcome"]),
        reply=_str(doc["reply"]),
        host=_str(doc["host"]),
        address=_str(doc["address"]),
        port=port,
        tls=_str(doc["tls"]),
        dane=_str(doc["dane"]),
    )


def _list(v: object) -> list[object]:
    if not isinstance(v, list):
        raise TypeError(f"expected a list, got {v!r}")
    return v


def _count(v: object) -> int:
    n = _int(v)
    if n < 0:
        raise ValueError(f"expected a count, got {n}")
    return n


def _is_version(v: object) -> bool:
    # Exactly the integer 1: json gives True/1.0 for "true"/"1.0", which compare equal to 1.
    return type(v) is int and v == FORMAT_VERSION


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected true or false, got {v!r}")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {v!r}")
    return v


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}")
    return v


def _num(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"expected a number, got {v!r}")
    return float(v)

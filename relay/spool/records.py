"""On-disk queue records: the envelope and per-recipient state of one message.

Format version 1 is a JSON object (UTF-8). The message body lives in a separate,
immutable data file; only the envelope changes after acceptance. `dump` and
`load` are exact inverses; `load` rejects anything it does not understand with
`ValueError` so that recovery can quarantine the file instead of guessing.
Pure: no I/O.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "QueuedMessage",
    "RecipientState",
    "RecipientStatus",
    "dump",
    "load",
    "valid_queue_id",
]

FORMAT_VERSION = 1
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

    @property
    def pending(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.status is RecipientStatus.PENDING)

    @property
    def done(self) -> bool:
        return not self.pending

    def with_recipients(self, recipients: tuple[RecipientState, ...]) -> QueuedMessage:
        return replace(self, recipients=recipients)


def dump(msg: QueuedMessage) -> bytes:
    doc = {
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
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def load(raw: bytes) -> QueuedMessage:
    """Parse an envelope record.

    Raises:
        ValueError: not a version-1 record or a field has the wrong type.
    """
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a JSON envelope record: {exc}") from exc
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
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed envelope record: {exc!r}") from exc


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

"""Value objects shared by the inbound side, the spool and the delivery engine.

Pure data: frozen dataclasses, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relay.smtp.reply import SmtpReply

__all__ = ["Outcome", "RecipientResult", "domain_of"]


class Outcome(enum.Enum):
    """How one delivery attempt ended for one recipient (DESIGN.md "Outcomes")."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    recipient: str
    outcome: Outcome
    reply: SmtpReply
    relay: str = ""  # "host[address]:port" that gave the reply, or "" when none was reached
    reason: str = ""  # short token for metrics: "sent", "dane_verification", "remote_5xx", …


def domain_of(address: str) -> str:
    """The lower-cased domain part of a mailbox, without a trailing dot."""
    return address.rpartition("@")[2].rstrip(".").lower()

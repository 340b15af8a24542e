"""Value objects shared by the inbound side, the spool and the delivery engine.

Pure data: frozen dataclasses, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from relay.smtp.reply import SmtpReply

__all__ = ["Outcome", "RecipientResult", "Step", "domain_of"]


class Outcome(enum.Enum):
    """How one delivery attempt ended for one recipient (DESIGN.md "Outcomes")."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a delivery attempt: a connection, or a host or domain that failed before one.

    Kept in the queue record's attempt history (relay.spool.records) and told in DSNs.
    """

    time: float  # epoch seconds, from the delivery clock
    outcome: Outcome
    reply: str  # "451 4.7.5 Server certificate not verified (no-match)"
    host: str = ""  # MX host or next hop; "" when none was chosen (e.g. MX lookup failure)
    address: str = ""  # "" when no connection was made (e.g. TLSA lookup failure)
    port: int = 0  # 0 when no connection was made
    tls: str = "none"  # verified / trusted / encrypted / none
    dane: str = "none"  # "pass reason=match", "fail reason=no-match", "none reason=no_tlsa", "none"

    @property
    def where(self) -> str:
        """ "host[address]:port", "host" when no connection was made, "-" for no host."""
        if not self.host:
            return "-"
        if not self.address:
            return self.host
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    recipient: str
    outcome: Outcome
    reply: SmtpReply
    relay: str = ""  # "host[address]:port" that gave the reply, or "" when none was reached
    reason: str = ""  # short token for metrics: "sent", "dane_verification", "remote_5xx", …
    # Every step of this delivery attempt that concerned the recipient, in order; the last
    # one decided its outcome. The story of the result, not part of its equality.
    history: tuple[Step, ...] = field(default=(), compare=False)


def domain_of(address: str) -> str:
    """The lower-cased domain part of a mailbox, without a trailing dot."""
    return address.rpartition("@")[2].rstrip(".").lower()

"""Per-session error limits of the inbound SMTP server (Postfix smtpd_soft_error_limit,
smtpd_hard_error_limit, smtpd_error_sleep_time). Pure: no I/O, no clock.

Contract:
- Every 4xx or 5xx reply the server sends counts as one error: to any command, to the end
  of DATA, to AUTH, and aiosmtpd's own syntax replies. A multi-line reply counts once (at
  its last line). A 421 does not count: it ends the session by itself.
- A message accepted (`250` to the end of DATA) sets the count back to 0: the limits are
  on the errors a client makes without delivering mail, as in Postfix.
- `delayed(reply)`: True for an error reply sent when the session already has
  `soft` errors or more (the caller waits `server.error_sleep_time` first, with
  asyncio.sleep). Other replies are never delayed.
- `record(reply)` counts the reply and returns True once the count reaches `hard`: the
  caller then answers `421 4.7.0 HOST Error: too many errors` and closes (RFC 5321 §3.8).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SessionErrors", "is_error_reply"]

#: The start of RelayHandler.handle_DATA's reply once a message is queued.
_QUEUED = "250 2.0.0 Ok: queued as "


def is_error_reply(reply: str) -> bool:
    """The last line of a 4xx or 5xx reply, other than 421 (RFC 5321 §4.2.1)."""
    return (
        len(reply) >= 3
        and reply[0] in "45"
        and reply[1:3].isdigit()
        and reply[3:4] != "-"
        and not reply.startswith("421")
    )


@dataclass
class SessionErrors:
    """The error replies of one SMTP session."""

    soft: int
    hard: int
    count: int = 0

    def delayed(self, reply: str) -> bool:
        return is_error_reply(reply) and self.count >= self.soft

    def record(self, reply: str) -> bool:
        """Count `reply`; True when it is the error that reaches the hard limit."""
        if reply.startswith(_QUEUED):
            self.count = 0
        elif is_error_reply(reply):
            self.count += 1
            return self.count >= self.hard
        return False

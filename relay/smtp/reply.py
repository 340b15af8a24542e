"""SMTP replies as values: code, enhanced status code (RFC 3463) and text.

Pure: parsing and formatting only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SmtpReply"]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True, slots=True)
class SmtpReply:
    code: int
    enhanced: str
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        text = " ".join(self.text.split())
        return (
            f"{self.code} {self.enhanced} {text}".strip()
            if self.enhanced
            else f"{self.code} {text}"
        )

    @classmethod
    def from_peer(cls, code: int, message: str) -> SmtpReply:
        """Build a reply from what a peer said; the enhanced code is split off if present."""
        text = " ".join(message.split())
        first, _, rest = text.partition(" ")
        if _ENHANCED.match(first) and first[0] == str(code)[0]:
            return cls(code, first, rest)
        klass = str(code)[0]
        return cls(code, f"{klass}.0.0" if klass in "245" else "", text)

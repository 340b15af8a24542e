"""Address and command-argument checks shared by the inbound and outbound sides. Pure."""

from __future__ import annotations

__all__ = ["escaped", "log_quoted", "wire_safe"]


def wire_safe(text: str) -> bool:
    """True if `text` can be sent in an SMTP command: no control characters (RFC 5321
    §4.1.2 allows none in a path) and no lone surrogates, which is how bytes that were
    not UTF-8 arrive from a surrogate-escaping decoder and which cannot be encoded again."""
    return not any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in text)


def escaped(text: str) -> str:
    """`text` with every character outside printable ASCII written as a Python escape
    (``\\xad``, ``\\u200d``, ``\\udcff``): safe for log lines, replies and terminals, and
    shows the invisible characters (soft hyphen, joiners, bidi controls) an attacker hides."""
    return "".join(c if " " <= c <= "~" else ascii(c)[1:-1] for c in text)


def log_quoted(value: object) -> str:
    """`value` as the inside of a double-quoted log field (`why="…"`): escaped, with `"`
    written as `'` (as delivery lines write reply="…"), so the JSON formatter keeps it whole."""
    return escaped(str(value)).replace('"', "'")

"""The HELO/EHLO argument: which names the front end accepts, and how a name is written
into the Received: header. Pure.

Contract:
- `helo_problem(name)` is None for an acceptable argument, else a short ASCII reason.
  Acceptable (RFC 5321 §4.1.1.1: `Domain / address-literal`):
  * a domain name that `relay.smtp.domain.ascii_domain` takes (RFC 5321 §4.1.2 / §2.3.5
    LDH labels, at most 63 and 253 octets; U-labels by IDNA 2008, as the server offers
    SMTPUTF8, RFC 6531 §3.7.1), also a single label (`localhost`, Postfix accepts it) and
    with `_` in a label (Windows host names; Postfix accepts them, Exim does not);
  * an address literal `[IPv4]` or `[IPv6:…]` holding a valid address (RFC 5321 §4.1.3);
  * a bare IPv4 or IPv6 address without brackets: not RFC 5321 syntax, but sent by many
    devices and accepted by Postfix and Exim.
  Anything else (spaces, `;`, `(`, control characters, `[300.1.1.1]`, other literal tags,
  an all-numeric top-level label) is refused.
- `trace_name(name)` is the name as written in `Received: from NAME`: an accepted domain
  with U-labels as its A-label form (the header stays ASCII), an accepted literal or
  address as given; anything else (only reachable if a caller skipped `helo_problem`)
  with every character outside `A-Z a-z 0-9 . - _ : [ ]` replaced by `?`, so no client
  can put `;`, `(`, `)`, CR, LF or a control character into the trace header (RFC 5322
  §3.6.7: the date follows the `;`). At most 255 characters.
"""

from __future__ import annotations

import ipaddress
import re

from relay.smtp.domain import DomainSyntaxError, ascii_domain

__all__ = ["helo_problem", "trace_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_MAX = 255


def _literal_problem(name: str) -> str | None:
    body = name[1:-1]
    if body[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(body[5:])
        except ValueError:
            return "not a valid IPv6 address literal"
        return None
    if ":" in body:
        # RFC 5321 §4.1.3: General-address-literal needs a registered tag; none is but IPv6.
        return "unknown address literal tag"
    try:
        ipaddress.IPv4Address(body)
    except ValueError:
        return "not a valid IPv4 address literal"
    return None


def helo_problem(name: str) -> str | None:
    """None when `name` is an acceptable HELO/EHLO argument, else why not."""
    if not name:
        return "empty"
    if name.startswith("[") and name.endswith("]"):
        return _literal_problem(name)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return None  # a bare address (Postfix and Exim accept it)
    try:
        ascii_domain(name, underscore=True)
    except DomainSyntaxError as exc:
        return str(exc)
    return None


def trace_name(name: str) -> str:
    """`name` as it may appear in `Received: from NAME` (see the module contract)."""
    if helo_problem(name) is None:
        if name.isascii():
            return name[:_MAX]
        return ascii_domain(name, underscore=True)[:_MAX]
    return _UNSAFE.sub("?", name)[:_MAX]

"""Mail domains and host names as the ASCII names DNS is asked about. Pure.

Owns `ascii_domain(text, *, underscore=False)`: the one conversion from a domain as
written in an address, a command line or an MX record to the lower-case ASCII name that
is looked up, connected to and sent as SNI. Every path into DNS and TLS goes through it,
so the relay never routes mail for one domain to another:

* ASCII labels must be letters, digits and hyphens, not starting or ending with a
  hyphen (RFC 5321 §2.3.5, RFC 1123 §2.1); "_" only with ``underscore=True`` (service
  labels such as ``_25._tcp``, RFC 7672 §2.2.3), never in a host name.
* Non-ASCII labels become A-labels by IDNA 2008 (RFC 5890, RFC 5891) *without* the UTS #46
  mapping: "ß" stays "ß" (straße.de is xn--strae-oqa.de, not strasse.de), and a soft
  hyphen, a zero-width joiner or any other DISALLOWED or out-of-context code point is
  refused, never silently deleted. The only local mapping is lower-casing and NFC
  (RFC 5891 §5.2, RFC 5895 §2 steps 1 and 4), which change no name a person can tell
  apart.
* Refused: empty names and labels (``a..b``), labels over 63 octets and names over 253
  (RFC 1035 §2.3.4), backslash escapes (RFC 1035 §5.1 presentation syntax is not part of a
  mail domain, RFC 5321 §4.1.2), address literals ``[192.0.2.1]`` (RFC 5321 §4.1.3) and
  IP addresses or all-numeric top-level labels written as names (RFC 3696 §2).

One final dot is accepted and dropped (the absolute form of the same name). A-labels
given in ASCII are taken as they are (any xn-- label is one DNS name; registries have
published IDNA 2003 names that IDNA 2008 would not produce).

Raises `DomainSyntaxError` (a ValueError) whose text is a short, ASCII-only reason,
safe for logs, SMTP replies, DSNs and terminals. Does no I/O and never looks anything up.
"""

from __future__ import annotations

import ipaddress
import string
import unicodedata

import idna

from relay.smtp.address import escaped

__all__ = [
    "MAX_LABEL",
    "MAX_NAME",
    "DomainSyntaxError",
    "ascii_domain",
    "is_address_literal",
    "mailbox_key",
]

#: RFC 1035 §2.3.4: octets in one label.
MAX_LABEL = 63
#: RFC 1035 §2.3.4: 255 octets on the wire, i.e. 253 characters without the final dot.
MAX_NAME = 253

_LDH = frozenset(string.ascii_lowercase + string.digits + "-")
_LDH_UNDERSCORE = _LDH | {"_"}


class DomainSyntaxError(ValueError):
    """`text` is not a domain name mail can be routed by; str() is the reason (ASCII).

    `literal` is True for an address literal or an IP address written as a name: a
    well-formed destination this relay does not route to, rather than bad syntax.
    """

    def __init__(self, reason: str, *, literal: bool = False) -> None:
        super().__init__(reason)
        self.literal = literal


def _shown(text: str) -> str:
    """`text` quoted, every non-ASCII or non-printable character escaped (``'a\\x1bb'``);
    printable ASCII, backslashes included, as it is (``'\\001.test'`` stays readable)."""
    return f"'{escaped(text)}'"


def is_address_literal(text: str) -> bool:
    """True for an RFC 5321 §4.1.3 address literal such as ``[192.0.2.1]``."""
    return text.startswith("[")


def ascii_domain(text: str, *, underscore: bool = False) -> str:
    """The lower-case ASCII (A-label) form of the domain or host name `text`.

    `underscore` allows "_" in labels, for owner names such as ``_25._tcp.mx.example``;
    mail domains and host names never need it (RFC 5321 §2.3.5).

    Raises:
        DomainSyntaxError: `text` is not a name that DNS could hold for mail (see the
            module docstring); ``literal`` says it is an address literal or an IP address.
    """
    if not text:
        raise DomainSyntaxError("empty domain")
    if is_address_literal(text):
        # RFC 5321 §4.1.3: an address literal is not a domain; DANE needs a name (RFC 7672).
        raise DomainSyntaxError(
            f"{_shown(text)} is an address literal, not a domain name", literal=True
        )
    if "\\" in text:
        # RFC 1035 §5.1 escapes (\001, \046) would smuggle other octets in; RFC 5321 §4.1.2
        # has no such syntax.
        raise DomainSyntaxError(f"{_shown(text)} contains a backslash escape")
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise DomainSyntaxError("empty domain (the root)")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        # RFC 5321 §2.3.5 / RFC 3696 §2: an IP address is not a domain name.
        raise DomainSyntaxError(f"{_shown(name)} is an IP address, not a domain name", literal=True)
    name = name.lower()
    if not name.isascii():
        # RFC 5891 §5.2, RFC 5895 §2 steps 1 and 4: lower case, then NFC; no UTS #46 mapping.
        name = unicodedata.normalize("NFC", name)
    labels = [_label(label, underscore) for label in name.split(".")]
    out = ".".join(labels)
    if len(out) > MAX_NAME:
        raise DomainSyntaxError(f"name longer than {MAX_NAME} octets ({len(out)})")
    if labels[-1].isdigit():
        # RFC 3696 §2: a top-level label is never all-numeric.
        raise DomainSyntaxError(f"{_shown(out)} has an all-numeric top-level label")
    return out


def _label(label: str, underscore: bool) -> str:
    """One lower-cased label in its ASCII form.

    Raises:
        DomainSyntaxError: empty, too long, a character outside LDH (and "_" when allowed),
            a hyphen at either end, or a non-ASCII label that is not a valid U-label.
    """
    if not label:
        raise DomainSyntaxError("empty label")
    if label.isascii():
        if len(label) > MAX_LABEL:
            raise DomainSyntaxError(f"label longer than {MAX_LABEL} octets ({len(label)})")
        allowed = _LDH_UNDERSCORE if underscore else _LDH
        bad = next((c for c in label if c not in allowed), None)
        if bad is not None:
            # RFC 5321 §2.3.5, RFC 1123 §2.1: letters, digits and hyphens only.
            raise DomainSyntaxError(f"character {_shown(bad)} not allowed in {_shown(label)}")
        if label.startswith("-") or label.endswith("-"):
            # RFC 1123 §2.1 / RFC 5891 §4.2.3.1: no hyphen at the start or the end.
            raise DomainSyntaxError(f"label {_shown(label)} starts or ends with a hyphen")
        return label
    try:
        # RFC 5891 §4, §5.4 (IDNA 2008, no UTS #46): DISALLOWED and out-of-context code
        # points (soft hyphen, ZWJ, ...) are refused, never mapped away.
        a_label = idna.alabel(label).decode("ascii")
    except (UnicodeError, ValueError) as exc:
        why = str(exc).encode("ascii", "backslashreplace").decode("ascii")
        raise DomainSyntaxError(f"label {_shown(label)} is not valid IDNA 2008 ({why})") from exc
    if len(a_label) > MAX_LABEL:  # idna checks this too; kept explicit for the reason text
        raise DomainSyntaxError(f"label longer than {MAX_LABEL} octets ({len(a_label)})")
    return a_label


def mailbox_key(address: str) -> str:
    """The form in which two recipient addresses name the same mailbox: the local part
    exactly as given (RFC 5321 §2.4: only the destination host may treat it as case
    insensitive) and the domain in A-label form, lower case (RFC 5321 §2.4: domain names
    are not case sensitive; RFC 5891). A domain that is no DNS name is only lower-cased."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    if domain.isascii():
        return f"{local}@{domain.lower()}"  # the A-label form already, or no DNS name
    try:
        domain = ascii_domain(domain)
    except DomainSyntaxError:
        domain = domain.lower()
    return f"{local}@{domain}"

"""relay.smtp.domain.ascii_domain: the one conversion from a mail domain to its DNS name.

The table is the contract: each row is an input, what it must become (or the reason it is
refused), and the finding or RFC it comes from.
"""

from __future__ import annotations

import pytest

from relay.smtp.domain import DomainSyntaxError, ascii_domain, is_address_literal

LONG_LABEL = "a" * 63
# 4 labels of 63 + 3 dots = 255 characters; 3 of 63 + one of 61 = 253.
NAME_253 = ".".join([LONG_LABEL] * 3 + ["b" * 61])

ACCEPTED = [
    # (input, ASCII form)
    ("example.org", "example.org"),
    ("Example.ORG", "example.org"),  # RFC 5321 §2.4: domains are case-insensitive
    ("example.org.", "example.org"),  # the absolute form of the same name
    ("mx-1.example.org", "mx-1.example.org"),
    ("1.2.3.4.in-addr.example", "1.2.3.4.in-addr.example"),  # numeric labels below the TLD
    # F1: IDNA 2008 keeps ß (RFC 5892: PVALID); IDNA 2003 / UTS #46 would give strasse.de.
    ("straße.de", "xn--strae-oqa.de"),
    ("STRAẞE.de", "xn--strae-oqa.de"),  # capital sharp s, lower-cased first (RFC 5895 §2)
    ("münchen.de", "xn--mnchen-3ya.de"),
    ("Bücher.example", "xn--bcher-kva.example"),
    ("e\u0301.de", "xn--9ca.de"),  # NFD input, NFC before IDNA (RFC 5891 §5.2)
    ("xn--strae-oqa.de", "xn--strae-oqa.de"),  # an A-label stays as it is
    ("XN--STRAE-OQA.DE", "xn--strae-oqa.de"),
    (LONG_LABEL + ".test", LONG_LABEL + ".test"),  # exactly 63 octets
    (NAME_253, NAME_253),  # exactly 253 octets
]

REFUSED = [
    # (input, words of the reason, literal)
    ("", "empty domain", False),
    (".", "empty domain", False),
    ("a..b.test", "empty label", False),  # F7
    (".example.org", "empty label", False),
    ("example.org..", "empty label", False),
    (("a" * 64) + ".test", "label longer than 63 octets", False),  # F7
    (NAME_253 + "b", "name longer than 253 octets", False),  # F7
    # F1: invisible characters are refused, never deleted (IDNA 2003 maps them away).
    ("pay\u00adpal.de", "not valid IDNA 2008", False),  # soft hyphen: DISALLOWED
    ("pay\u200dpal.de", "not valid IDNA 2008", False),  # ZWJ: CONTEXTJ, no virama before
    ("pay\u200bpal.de", "not valid IDNA 2008", False),  # zero-width space
    ("ex\u3002ample.de", "not valid IDNA 2008", False),  # ideographic full stop is no dot here
    ("ｅxample.de", "not valid IDNA 2008", False),  # fullwidth letter: UTS #46 would map it
    ("a\udcff.test", "not valid IDNA 2008", False),  # F8: a non-UTF-8 byte, surrogate-escaped
    # F1: presentation escapes would be decoded by dnspython into other octets.
    ("exampl\\101.de", "backslash escape", False),
    ("\\001\\001.test", "backslash escape", False),  # F4
    ("a\\.b.test", "backslash escape", False),
    # RFC 5321 §2.3.5 / RFC 1123 §2.1: letters, digits, hyphen.
    ("_25._tcp.example.org", "character '_' not allowed", False),
    ("a b.test", "character ' ' not allowed", False),
    ("a\x1b[31m.test", "character '\\x1b' not allowed", False),  # F8: ESC
    ("a@b.test", "character '@' not allowed", False),
    ("-mx.example.org", "starts or ends with a hyphen", False),
    ("mx-.example.org", "starts or ends with a hyphen", False),
    ("example.123", "all-numeric top-level label", False),
    # F10: address literals and IP addresses are not domain names.
    ("[192.0.2.1]", "address literal", True),
    ("[IPv6:2001:db8::1]", "address literal", True),
    ("192.0.2.1", "is an IP address", True),
    ("192.0.2.1.", "is an IP address", True),
    ("2001:db8::1", "is an IP address", True),
]


@pytest.mark.parametrize(("text", "expected"), ACCEPTED)
def test_accepted_names_become_their_ascii_form(text: str, expected: str) -> None:
    assert ascii_domain(text) == expected
    assert ascii_domain(expected) == expected  # idempotent: the ASCII form is a fixed point


@pytest.mark.parametrize(("text", "reason", "literal"), REFUSED)
def test_refused_names_raise_a_short_ascii_reason(text: str, reason: str, literal: bool) -> None:
    with pytest.raises(DomainSyntaxError) as info:
        ascii_domain(text)
    message = str(info.value)
    assert reason in message
    assert info.value.literal is literal
    assert isinstance(info.value, ValueError)
    # Safe for logs, SMTP replies, DSNs and terminals: ASCII without control characters.
    assert message.isascii() and message.isprintable()


def test_straße_is_not_strasse() -> None:
    """F1: two different registrable domains must stay two different DNS names."""
    assert ascii_domain("straße.de") != ascii_domain("strasse.de")


def test_underscore_only_where_asked_for() -> None:
    """RFC 7672 §2.2.3: TLSA owner names have service labels; host names never do."""
    assert ascii_domain("_25._tcp.MX.example.org", underscore=True) == "_25._tcp.mx.example.org"
    assert ascii_domain("_25._tcp.straße.de", underscore=True) == "_25._tcp.xn--strae-oqa.de"
    with pytest.raises(DomainSyntaxError, match="backslash"):
        ascii_domain("_25._tcp.\\001.test", underscore=True)
    with pytest.raises(DomainSyntaxError, match="character '_' not allowed"):
        ascii_domain("mx_1.example.org")


@pytest.mark.parametrize(
    ("text", "literal"),
    [("[192.0.2.1]", True), ("[IPv6:::1]", True), ("example.org", False), ("a]", False)],
)
def test_is_address_literal(text: str, literal: bool) -> None:
    assert is_address_literal(text) is literal

"""relay.smtp.address.wire_safe: what may be put into an SMTP command argument."""

from __future__ import annotations

import pytest

from relay.smtp.address import wire_safe


@pytest.mark.parametrize(
    "text",
    ["bob@example.org", "", "ålice@exämple.org", 'FROM:<"a b"@example.org> SIZE=10', "~!#$%"],
)
def test_printable_text_and_utf8_are_wire_safe(text: str) -> None:
    assert wire_safe(text) is True


@pytest.mark.parametrize(
    "text",
    [
        "a\x00b@example.org",  # NUL
        '"a\x01b"@example.org',  # control character in a quoted local part
        "bob@example.org\r\nRCPT TO:<x@y>",  # command injection
        "a\x7fb@example.org",  # DEL
        "b\udcffob@example.org",  # a non-UTF-8 byte, surrogate-escaped
    ],
)
def test_control_characters_and_lone_surrogates_are_not(text: str) -> None:
    assert wire_safe(text) is False

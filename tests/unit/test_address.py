"""relay.smtp.address: what may be put into an SMTP command argument (wire_safe), and how an
address is shown in logs, replies and terminals (escaped)."""

from __future__ import annotations

import pytest

from relay.smtp.address import escaped, wire_safe


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


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("bob@example.org", "bob@example.org"),
        ("u@straße.de", "u@stra\\xdfe.de"),
        ("u@pay\u00adpal.de", "u@pay\\xadpal.de"),  # invisible soft hyphen made visible
        ("u@pay\u200dpal.de", "u@pay\\u200dpal.de"),
        ("u@\u202eed.example", "u@\\u202eed.example"),  # bidi override
        ("a\x1b[31m@b", "a\\x1b[31m@b"),  # ESC
        ("b\udcffob@x", "b\\udcffob@x"),  # a non-UTF-8 byte
        ("a\\101@b", "a\\101@b"),  # backslashes as they are
        ("emoji \U0001f600", "emoji \\U0001f600"),
    ],
)
def test_escaped_shows_every_character_outside_printable_ascii(text: str, shown: str) -> None:
    assert escaped(text) == shown
    assert escaped(text).isascii() and escaped(text).isprintable()

"""relay.delivery.transport.message_data: the exact bytes written after a 354."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.transport import message_data

# The first implementation (two regex passes), kept here as the reference model.
_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def _reference(body: bytes) -> bytes:
    data = _LINE_ENDINGS.sub(b"\r\n", body)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _LEADING_DOT.sub(b"..", data) + b".\r\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", b"\r\n.\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
        # RFC 5321 §4.5.2: a line that starts with "." gets one more.
        (b".\r\n", b"..\r\n.\r\n"),
        (b".a\r\n..b\r\nc.\r\n", b"..a\r\n...b\r\nc.\r\n.\r\n"),
        # RFC 5321 §2.3.8: bare LF and bare CR become CRLF, and the line after them is
        # dot-stuffed too, so "\n.\n" can never end the data early.
        (b"x\n.\ny", b"x\r\n..\r\ny\r\n.\r\n"),
        (b"x\r.\ry", b"x\r\n..\r\ny\r\n.\r\n"),
        (b"x\r\r\n.\n\r", b"x\r\n\r\n..\r\n\r\n.\r\n"),
        (b"\n\r", b"\r\n\r\n.\r\n"),
        (b"a\r", b"a\r\n.\r\n"),
    ],
)
def test_message_data_gives_exact_bytes(body: bytes, expected: bytes) -> None:
    assert message_data(body) == expected
    assert _reference(body) == expected


_PIECES = st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"\xff", b" "])


@given(st.lists(_PIECES, max_size=40).map(b"".join))
def test_message_data_matches_the_regex_reference(body: bytes) -> None:
    assert message_data(body) == _reference(body)

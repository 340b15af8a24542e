"""LimitedSMTP.smtp_DATA (chunked reader) against aiosmtpd's own line-by-line smtp_DATA.

Two real aiosmtpd servers on loopback get the same bytes: one runs the library's
`SMTP.smtp_DATA`, the other the relay's. Every reply they write, in order, and every
message content their handler receives must be identical, for bodies with bare CR and
LF, leading dots, fake and real end markers, overlong lines, size limits and pipelined
commands after the end of data. The one intended difference: a line of exactly 1001
octets with its CRLF and no leading dot, which aiosmtpd takes and RFC 5321 §4.5.3.1.6
(1000 octets) does not; it has its own test.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relay.inbound.server import LimitedSMTP

TIMEOUT = 10.0


class _Capture:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.contents.append(envelope.original_content)
        return "250 2.0.0 kept"


class _Chunked(SMTP):
    """aiosmtpd's SMTP with only the relay's DATA reader put in."""

    smtp_DATA = LimitedSMTP.smtp_DATA
    _end_data = LimitedSMTP._end_data


async def _transcript(cls: type[SMTP], stream: bytes, size_limit: int | None) -> tuple[Any, ...]:
    handler = _Capture()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: cls(handler, hostname="mx.test", data_size_limit=size_limit, decode_data=False),
        "127.0.0.1",
        0,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(stream)
        await writer.drain()
        out = await asyncio.wait_for(reader.read(), TIMEOUT)  # until the server closes
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    # The greeting names the library version; the rest must match byte for byte.
    return out.split(b"\r\n", 1)[1], handler.contents


async def _both(body: bytes, size_limit: int | None) -> tuple[Any, Any]:
    stream = (
        b"EHLO client.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
        + body
        # Ends the data if the body did not, else ends whatever command line it left open.
        + b"\r\n.\r\nNOOP\r\nQUIT\r\n"
    )
    return await _transcript(SMTP, stream, size_limit), await _transcript(
        _Chunked, stream, size_limit
    )


CASES = {
    "plain": b"Subject: x\r\n\r\nhello",
    "dots": b"..\r\n.a\r\n...b\r\nc",
    "empty": b"",
    "bare-lf-dot": b"a\n.\nMAIL FROM:<e@f.example>\r\nRCPT TO:<g@h.example>\r\nDATA\r\nx",
    "bare-cr-dot": b"a\r.\rb",
    "real-end-then-commands": b"a\r\n.\r\nRSET\r\nMAIL FROM:<e@f.example>\r\nRCPT TO:<g@h.example>"
    b"\r\nDATA\r\nsecond",
    "dotted-line-999": b"." + b"x" * 999,
    "dotted-line-1000": b"." + b"x" * 1000,
    "line-1000": b"x" * 1000,
    "line-1001": b"x" * 1001,
    "line-1002": b"x" * 1002,
    "line-5000": b"x" * 5000 + b"\r\nafter",
    "eight-bit": b"\xff\xfe\x00\xe9t\xe9",
}


@pytest.mark.asyncio
@pytest.mark.parametrize("size_limit", [None, 0, 40, 1002, 2000])
@pytest.mark.parametrize("body", CASES.values(), ids=CASES.keys())
async def test_same_replies_and_contents_as_aiosmtpd(body: bytes, size_limit: int | None) -> None:
    library, chunked = await _both(body, size_limit)
    assert chunked == library
    assert library[0]  # the servers did answer


def _has_a_1001_octet_line(body: bytes) -> bool:
    """A line of 999 octets before its CRLF, not dot-stuffed (the intended difference)."""
    return any(len(line) == 999 and line[:1] != b"." for line in body.split(b"\r\n"))


@pytest.mark.asyncio
async def test_a_1001_octet_line_is_refused_where_aiosmtpd_takes_it() -> None:
    body = b"Subject: x\r\n\r\n" + b"x" * 999
    library, chunked = await _both(body, None)
    assert library[1] == [body + b"\r\n"]
    assert chunked[1] == []
    assert chunked[0] == library[0].replace(
        b"250 2.0.0 kept", b"500 Line too long (see RFC5321 4.5.3.1.6)"
    )


_PIECES = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"\xff", b"\r\n.\r\n", b"x" * 400, b"x" * 199]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, max_size=12).map(b"".join), st.sampled_from([None, 30, 700, 1500]))
def test_random_bodies_get_the_same_replies_and_contents(
    body: bytes, size_limit: int | None
) -> None:
    assume(not _has_a_1001_octet_line(body))
    library, chunked = asyncio.run(_both(body, size_limit))
    assert chunked == library

"""SMTP smuggling (RFC 5321 §2.3.8, §4.1.1.4) against the real aiosmtpd front end.

A bare CR or LF in DATA, or an end of data other than CRLF.CRLF, must never turn one
message into two: by default such a message is refused with 550 5.5.2 and nothing is
queued; with `bare_line_endings = "accept"` it is queued once, as received.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from inboundkit import RawClient, frontend

from relay.inbound.handler import has_bare_line_ending
from relay.spool.store import SpoolStore

SMUGGLED = (
    b"MAIL FROM:<evil@attacker.example>\r\n"
    b"RCPT TO:<victim@example.org>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled message\r\n"
)

FAKE_ENDS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "LF-LF.CRLF": b"\n\n.\r\n",
    "CRLF-LF.CRLF": b"\r\n\n.\r\n",
}


async def _transaction(c: RawClient) -> None:
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
    assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
    assert (await c.cmd("DATA")).code == 354


@pytest.mark.asyncio
@pytest.mark.parametrize("fake_end", FAKE_ENDS.values(), ids=FAKE_ENDS.keys())
async def test_smuggling_input_is_refused_550_and_nothing_is_queued(
    tmp_path: Path, fake_end: bytes
) -> None:
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        await _transaction(c)
        await c.send(b"Subject: carrier\r\n\r\nfirst part" + fake_end + SMUGGLED + b"\r\n.\r\n")
        reply = await c.reply()
        assert reply == (
            550,
            "5.5.2 Message contains bare CR or LF characters (RFC 5321 section 2.3.8)",
        )
        # Exactly one reply for everything sent: the smuggled commands were data.
        assert (await c.cmd("NOOP")).code == 250
        # The session goes on: a clean message afterwards is queued, alone.
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<carol@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(b"Subject: clean\r\n\r\nclean\r\n.")).code == 250
        await c.close()
        assert [m.recipients[0].address for m in fe.queued] == ["carol@example.org"]
        assert len(fe.files("env")) == 1
        assert len(fe.files("data")) == 1
        assert fe.rejections("bare_line_ending") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("fake_end", FAKE_ENDS.values(), ids=FAKE_ENDS.keys())
async def test_accept_mode_queues_one_message_as_received(tmp_path: Path, fake_end: bytes) -> None:
    async with frontend(tmp_path, bare_line_endings="accept") as fe:
        c = await fe.connect()
        await _transaction(c)
        content = b"Subject: carrier\r\n\r\nfirst part" + fake_end + SMUGGLED
        await c.send(content + b"\r\n.\r\n")
        reply = await c.reply()
        assert reply.code == 250
        assert (await c.cmd("NOOP")).code == 250
        await c.close()
        (msg,) = fe.queued
        assert [r.address for r in msg.recipients] == ["bob@example.org"]
        assert msg.sender == "alice@sender.example"
        assert fe.files("env") == [msg.queue_id]
        body = SpoolStore(fe.spool).read_body(msg.queue_id)
        # Stored as received after the Received: header, the first dot of a line removed
        # (RFC 5321 §4.5.2 transparency): the bare CR/LF are kept as they came.
        assert body.endswith(content.replace(b"\r\n.", b"\r\n") + b"\r\n")
        assert body.count(b"Received: ") == 1
        assert fe.rejections("bare_line_ending") == 0


def test_bare_line_ending_detection() -> None:
    assert has_bare_line_ending(b"a\r\nb\r\n") is False
    assert has_bare_line_ending(b"") is False
    assert has_bare_line_ending(b"a\nb\r\n") is True
    assert has_bare_line_ending(b"a\rb\r\n") is True
    assert has_bare_line_ending(b"a\r\r\n") is True
    assert has_bare_line_ending(b"a\n\r\n") is True
    assert has_bare_line_ending(b"\r\n\r\n.\r\n") is False

"""The inbound hop limit (server.max_received_headers, RFC 5321 §6.3) and repeated RCPT of
one mailbox, through the real aiosmtpd front end, handler and spool (inboundkit)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from inboundkit import frontend

from relay.inbound.handler import received_headers
from relay.spool.records import load

pytestmark = pytest.mark.timeout(30)

FROM = "MAIL FROM:<alice@sender.example>"


def hops(n: int) -> bytes:
    return b"".join(
        b"Received: from hop%d.example by x; Fri, 4 Dec 2026 10:00:00 +0000\r\n" % i
        for i in range(n)
    )


async def send(fe: object, content: bytes, *rcpts: str) -> tuple[int, str]:
    c = await fe.connect()  # type: ignore[attr-defined]
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd(FROM)).code == 250
    for rcpt in rcpts:
        assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    reply = await c.cmd(content + b".")
    await c.close()
    return reply.code, reply.text


@pytest.mark.asyncio
async def test_more_received_headers_than_the_limit_are_refused_554_5_4_6(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.smtpd")
    async with frontend(tmp_path, max_received_headers=3) as fe:
        body = b"Subject: loop\r\n\r\nReceived: in the body is not a header\r\n"
        assert await send(fe, hops(4) + body, "bob@example.org") == (554, "5.4.6 Too many hops")
        assert fe.queued == [] and fe.files("env") == []
        assert fe.rejections("too_many_hops") == 1
        (line,) = [r.getMessage() for r in caplog.records if "too-many-hops" in r.getMessage()]
        assert line == (
            "reject=DATA client=127.0.0.1 from=<alice@sender.example> to=<bob@example.org> "
            'reply="554 5.4.6" reason=too-many-hops hops=4 limit=3'
        )
        # At the limit (the relay's own Received: is not counted) the message is queued.
        code, text = await send(fe, hops(3) + body, "bob@example.org")
        assert code == 250, text
        assert len(fe.queued) == 1
        assert fe.rejections("too_many_hops") == 1


@pytest.mark.asyncio
async def test_the_default_hop_limit_is_50(tmp_path: Path) -> None:
    async with frontend(tmp_path) as fe:
        assert (await send(fe, hops(50) + b"\r\nhi\r\n", "bob@example.org"))[0] == 250
        assert await send(fe, hops(51) + b"\r\nhi\r\n", "bob@example.org") == (
            554,
            "5.4.6 Too many hops",
        )


def test_received_headers_are_counted_in_the_header_section_only() -> None:
    assert received_headers(b"") == 0
    assert received_headers(b"Received: a\r\nRECEIVED : b\r\n\treceived: folded\r\n") == 2
    assert received_headers(b"X: 1\r\n\r\nReceived: body\r\n") == 0
    assert received_headers(b"\r\nReceived: body only\r\n") == 0
    assert received_headers(b"received: a\nReceived: b\n\nReceived: c\n") == 2  # bare LF
    assert received_headers(b"X-Received: no\r\nReceivedX: no\r\n") == 0


@pytest.mark.asyncio
async def test_a_repeated_rcpt_is_answered_250_and_queued_once(tmp_path: Path) -> None:
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(FROM)).code == 250
        replies = [
            await c.cmd(f"RCPT TO:<{rcpt}>")
            for rcpt in (
                "bob@example.org",
                "bob@EXAMPLE.ORG",  # the domain is compared case-insensitively
                "carol@example.org",
                "Bob@example.org",  # the local part exactly: another mailbox
                "bob@example.org",
            )
        ]
        assert [r.code for r in replies] == [250] * 5
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(b"Subject: dup\r\n\r\nhi\r\n.")).code == 250
        await c.close()
        (msg,) = fe.queued
        assert [r.address for r in msg.recipients] == [
            "bob@example.org",
            "carol@example.org",
            "Bob@example.org",
        ]
        on_disk = load((fe.spool / "env" / msg.queue_id).read_bytes())
        assert [r.address for r in on_disk.recipients] == [
            "bob@example.org",
            "carol@example.org",
            "Bob@example.org",
        ]


@pytest.mark.asyncio
async def test_duplicates_do_not_count_against_max_recipients_and_reset_per_transaction(
    tmp_path: Path,
) -> None:
    async with frontend(tmp_path, max_recipients=1) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(FROM)).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("RSET")).code == 250
        assert (await c.cmd(FROM)).code == 250
        assert (await c.cmd("RCPT TO:<carol@example.org>")).code == 250  # a new envelope
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(b"Subject: x\r\n\r\nhi\r\n.")).code == 250
        await c.close()
        (msg,) = fe.queued
        assert [r.address for r in msg.recipients] == ["carol@example.org"]

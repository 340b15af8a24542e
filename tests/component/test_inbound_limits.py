"""Front-end limits against the real aiosmtpd server: message size (EHLO SIZE, MAIL SIZE=,
DATA), line length, recipients per message, connections overall and per client address.
Each refusal has its reply code, leaves nothing in the spool and is counted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from inboundkit import Frontend, RawClient, frontend


async def _greeted_after_release(fe: Frontend, source: str | None = None) -> RawClient:
    """A new connection once a closed one has given its slot back (deadline 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        c = await fe.connect(source)
        assert c.greeting is not None
        if c.greeting.code == 220 or time.monotonic() > deadline:
            return c
        await c.close()
        await asyncio.sleep(0.02)


def _assert_spool_empty(fe: Frontend) -> None:
    assert fe.files("env") == []
    assert fe.files("data") == []
    assert fe.files("tmp") == []
    assert fe.queued == []


@pytest.mark.asyncio
async def test_size_is_advertised_and_enforced_at_mail_and_in_data(tmp_path: Path) -> None:
    async with frontend(tmp_path, max_message_size=2048) as fe:
        c = await fe.connect()
        ehlo = await c.cmd("EHLO client.test")
        assert "SIZE 2048" in ehlo.text.splitlines()
        too_big = await c.cmd("MAIL FROM:<alice@sender.example> SIZE=2049")
        assert too_big == (552, "5.3.4 Message size exceeds fixed limit")
        assert (await c.cmd("MAIL FROM:<alice@sender.example> SIZE=2048")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(b"Subject: big\r\n\r\n")
        for _ in range(40):  # 2880 bytes: the limit is passed half way
            await c.send(b"x" * 70 + b"\r\n")
        # Before the end of data nothing of it is on disk.
        _assert_spool_empty(fe)
        reply = await c.cmd(b".")
        assert reply == (552, "5.3.4 Error: message file too big")
        assert (await c.cmd("RSET")).code == 250
        await c.close()
        _assert_spool_empty(fe)
        assert fe.rejections("message_too_big") == 2


@pytest.mark.asyncio
async def test_message_at_the_size_limit_is_queued(tmp_path: Path) -> None:
    async with frontend(tmp_path, max_message_size=1024) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        content = b"Subject: fits\r\n\r\n" + b"y" * 500 + b"\r\n" + b"w" * (1024 - 521) + b"\r\n"
        assert len(content) == 1024
        assert (await c.cmd(content + b".")).code == 250
        await c.close()
        assert len(fe.queued) == 1
        assert fe.queued[0].size > 1024  # the Received: header is added after the check


LINE_TOO_LONG = (
    554,
    "5.6.0 Message content rejected: line longer than 1000 octets (RFC 5321 section 4.5.3.1.6)",
)


@pytest.mark.asyncio
@pytest.mark.parametrize("length", [1001, 1002])
async def test_overlong_command_gets_500_and_overlong_data_line_554_after_the_dot(
    tmp_path: Path, length: int
) -> None:
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        long_cmd = await c.cmd("MAIL FROM:<" + "a" * 2000 + "@sender.example>")
        assert long_cmd == (500, "5.5.2 Error: command line too long")
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        # RFC 5321 §4.5.3.1.6: 1000 octets with CRLF is the longest line; 1001 is refused.
        # After the final dot RFC 5321 §4.3.2 allows no 500: 554.
        line = b"z" * (length - 2) + b"\r\n"
        assert await c.cmd(b"Subject: long\r\n\r\n" + line + b".") == LINE_TOO_LONG
        assert await c.cmd("RSET") == (250, "2.0.0 Ok")
        await c.close()
        _assert_spool_empty(fe)
        assert fe.rejections("line_too_long") == 1
        assert fe.rejections("command_too_long") == 1


@pytest.mark.asyncio
async def test_a_dot_stuffed_line_of_1000_octets_is_accepted(tmp_path: Path) -> None:
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        # RFC 5321 §4.5.3.1.6: the limit does not count the dot added for transparency, so
        # ".." + 997 octets + CRLF (1001 on the wire) is a 1000-octet line.
        sent = b".." + b"d" * 997 + b"\r\n"
        assert (await c.cmd(b"Subject: dots\r\n\r\n" + sent + b".")).code == 250
        assert (await c.cmd(b"MAIL FROM:<alice@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert await c.cmd(b"Subject: dots\r\n\r\n." + sent + b".") == LINE_TOO_LONG
        await c.close()
        (msg,) = fe.queued
        assert fe.store.read_body(msg.queue_id).endswith(b"\r\n\r\n." + b"d" * 997 + b"\r\n")


@pytest.mark.asyncio
async def test_a_998_octet_line_is_accepted(tmp_path: Path) -> None:
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(b"Subject: ok\r\n\r\n" + b"z" * 998 + b"\r\n.")).code == 250
        await c.close()
        assert len(fe.queued) == 1


@pytest.mark.asyncio
async def test_recipients_over_the_limit_get_452(tmp_path: Path) -> None:
    async with frontend(tmp_path, max_recipients=2) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<a@example.org>")).code == 250
        assert (await c.cmd("RCPT TO:<b@example.org>")).code == 250
        assert await c.cmd("RCPT TO:<c@example.org>") == (452, "4.5.3 Error: too many recipients")
        await c.close()
        assert fe.rejections("too_many_recipients") == 1


@pytest.mark.asyncio
async def test_connections_per_client_address_are_limited(tmp_path: Path) -> None:
    async with frontend(tmp_path, max_connections=10, max_connections_per_client=2) as fe:
        first = await fe.connect("127.0.0.1")
        second = await fe.connect("127.0.0.1")
        assert first.greeting is not None and first.greeting.code == 220
        assert second.greeting is not None and second.greeting.code == 220
        third = await fe.connect("127.0.0.1")
        assert third.greeting == (
            421,
            "4.7.0 relay.test Error: too many connections from 127.0.0.1",
        )
        assert await third.closed()
        # Another client address is not affected.
        other = await fe.connect("127.0.0.2")
        assert other.greeting is not None and other.greeting.code == 220
        # The open connections still work.
        assert (await first.cmd("EHLO client.test")).code == 250
        # A closed connection gives its slot back.
        assert (await second.cmd("QUIT")).code == 221
        await second.close()
        again = await _greeted_after_release(fe, "127.0.0.1")
        assert again.greeting is not None and again.greeting.code == 220
        for c in (first, third, other, again):
            await c.close()
        assert fe.rejections("too_many_connections_from_client") >= 1


@pytest.mark.asyncio
async def test_connections_overall_are_limited(tmp_path: Path) -> None:
    async with frontend(tmp_path, max_connections=2, max_connections_per_client=2) as fe:
        a = await fe.connect("127.0.0.1")
        b = await fe.connect("127.0.0.2")
        c = await fe.connect("127.0.0.3")
        assert c.greeting == (421, "4.7.0 relay.test Error: too many connections")
        assert await c.closed()
        assert fe.rejections("too_many_connections") == 1
        assert (await a.cmd("QUIT")).code == 221
        await a.close()
        d = await _greeted_after_release(fe, "127.0.0.3")
        assert d.greeting is not None and d.greeting.code == 220
        for x in (b, c, d):
            await x.close()

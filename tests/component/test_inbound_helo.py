"""HELO/EHLO argument checks on the real front end (RFC 5321 §4.1.1.1: a Domain or an
address literal, §4.1.3): what is refused with 501 (and leaves the session as it was,
§4.1.4), what is accepted, and that a refused name never reaches the Received: header."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from inboundkit import frontend

from relay.inbound.helo import helo_problem, trace_name

INJECTION = (
    "evil.test ([10.0.0.1]) by trusted.example.com with ESMTPS id X; Mon, 1 Jan 2024 00:00:00 +0000"
)
BAD = [
    INJECTION,
    "a\x00b.test",
    "a\x1b[31mb.test",
    "bad\rX-Injected: yes",
    "a\x7fb.test",
    "[300.1.1.1]",
    "[1.2.3]",
    "[IPv6:2001:db8::zz]",
    "[foo:bar]",
    "semi;colon.test",
    "123",
    "a..b.test",
]
GOOD = [
    "client.test",
    "client.test.",
    "localhost",
    "my_pc.corp.test",
    "b\u00fccher.example",
    "[192.0.2.1]",
    "[IPv6:2001:db8::1]",
    "192.0.2.1",
]


def _reply(verb: str) -> tuple[int, str]:
    return (501, f"Invalid {verb} name: a domain name or an address literal is expected")


@pytest.mark.asyncio
@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
async def test_invalid_names_get_501_and_the_client_is_not_greeted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, verb: str, name: str
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.smtpd")
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        assert await c.cmd(f"{verb} {name}".encode()) == _reply(verb)
        # RFC 5321 §4.1.4: the state is as before the command, i.e. no HELO yet.
        assert (await c.cmd("MAIL FROM:<a@client.test>")).code == 503
        await c.close()
        assert fe.rejections("invalid_helo") == 1
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reject=")]
    assert line.startswith(f"reject={verb} client=127.0.0.1 helo=")
    assert ' reply=501 reason=invalid-helo why="' in line
    assert all(" " <= ch <= "~" for ch in line)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", GOOD)
async def test_domains_and_address_literals_are_accepted(tmp_path: Path, name: str) -> None:
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        assert (await c.cmd(f"EHLO {name}".encode())).code == 250
        assert (await c.cmd(f"HELO {name}".encode())).code == 250
        assert (await c.cmd("MAIL FROM:<a@client.test>")).code == 250
        await c.close()
        assert fe.rejections("invalid_helo") == 0


@pytest.mark.asyncio
async def test_a_refused_ehlo_keeps_the_transaction_under_way(tmp_path: Path) -> None:
    """RFC 5321 §4.1.4: after a refused EHLO the server stays in the state it was in."""
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<a@client.test>")).code == 250
        assert await c.cmd(f"EHLO {INJECTION}") == _reply("EHLO")
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(b"Subject: t\r\n\r\nx\r\n.")).code == 250
        await c.close()
        assert fe.queued[0].helo == "client.test"
        body = fe.store.read_body(fe.queued[0].queue_id)
        assert body.startswith(b"Received: from client.test ([127.0.0.1])\r\n")


def test_reasons_and_trace_names() -> None:
    assert helo_problem("[300.1.1.1]") == "not a valid IPv4 address literal"
    assert helo_problem("[foo:bar]") == "unknown address literal tag"
    assert helo_problem("[IPv6:::1]") is None
    assert trace_name("B\u00fccher.Example") == "xn--bcher-kva.example"
    assert trace_name("Client.Test") == "Client.Test"
    assert trace_name(INJECTION) == (
        "evil.test??[10.0.0.1]??by?trusted.example.com?with?ESMTPS?id?X??"
        "Mon??1?Jan?2024?00:00:00??0000"
    )
    assert trace_name("x" * 300) == "x" * 255

"""Every reply of the real inbound front end carries an RFC 3463 enhanced status code
(RFC 2034 §3), aiosmtpd's own replies included, and EHLO says so (ENHANCEDSTATUSCODES)
along with PIPELINING (RFC 2920), which the command loop serves. An over-long AUTH answer
is 500 5.5.6 (RFC 4954 §6) and the session goes on."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

import pytest
from inboundkit import Reply, frontend, insecure_client
from lab.certs import make_self_signed

from relay.config import Listener
from relay.inbound.auth import Credentials, FailureLimiter, write_entry
from relay.inbound.server import AuthGate, with_enhanced_code
from relay.inbound.tls import TlsContextHolder

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

AUTH_LISTENER = (Listener("127.0.0.1", 0, auth=True),)
ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


def _setup(tmp_path: Path) -> tuple[TlsContextHolder, AuthGate]:
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    users = tmp_path / "users"
    write_entry(users, "alice", b"s3cret pass")
    return TlsContextHolder(cert, key), AuthGate(Credentials(users), FailureLimiter(5, 600.0))


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def test_ehlo_advertises_pipelining_and_enhancedstatuscodes(tmp_path: Path) -> None:
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        ehlo = (await c.cmd("EHLO client.test")).text.splitlines()
        assert "PIPELINING" in ehlo
        assert "ENHANCEDSTATUSCODES" in ehlo
        assert ehlo[0] == "relay.test"
        assert ehlo[-1] == "HELP"
        # RFC 2920 §3.1: the whole transaction in one write, the replies in order.
        await c.send(
            b"MAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.org>\r\n"
            b"RCPT TO:<carol@example.org>\r\nDATA\r\n"
        )
        replies = [await c.reply() for _ in range(4)]
        assert [r.code for r in replies] == [250, 250, 250, 354]
        assert (await c.cmd(b"Subject: p\r\n\r\nbody\r\n.")).code == 250
        await c.close()
        assert len(fe.queued) == 1


async def test_aiosmtpd_replies_carry_enhanced_codes(tmp_path: Path) -> None:
    tls, gate = _setup(tmp_path)
    async with frontend(tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER) as fe:
        c = await fe.connect()
        transcript: list[Reply] = []

        async def cmd(line: str) -> Reply:
            reply = await c.cmd(line)
            transcript.append(reply)
            return reply

        assert await cmd("MAIL FROM:<alice@sender.example>") == (
            503,
            "5.5.1 Error: send HELO/EHLO first",
        )
        assert (await c.cmd("EHLO client.test")).code == 250  # RFC 2034 §3: exempt
        assert await cmd("RSET") == (250, "2.0.0 Ok")
        assert await cmd("NOOP") == (250, "2.0.0 Ok")
        assert await cmd("RCPT TO:<bob@example.org>") == (503, "5.5.1 Error: need MAIL command")
        assert await cmd("DATA") == (503, "5.5.1 Error: need RCPT command")
        assert await cmd("MAIL TO:<alice@sender.example>") == (
            501,
            "5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]",
        )
        assert (await cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert await cmd("MAIL FROM:<alice@sender.example>") == (
            503,
            "5.5.1 Error: nested MAIL command",
        )
        assert await cmd("DATA") == (503, "5.5.1 Error: need RCPT command")
        assert await cmd("RCPT TO:<bob@example.org> NOTIFY=NEVER") == (
            555,
            "5.5.4 RCPT TO parameters not recognized or not implemented",
        )
        assert await cmd("RCPT FROM:<bob@example.org>") == (
            501,
            "5.5.4 Syntax: RCPT TO: <address> [SP <mail-parameters>]",
        )
        assert await cmd("FOO") == (500, '5.5.2 Error: command "FOO" not recognized')
        # RFC 5321 §4.2.2: HELP is answered 214.
        help_all = await cmd("HELP")
        assert help_all.code == 214
        assert help_all.text.startswith("2.0.0 Supported commands: ")
        assert await cmd("HELP RSET") == (214, "2.0.0 Syntax: RSET")
        assert await cmd("VRFY <bob@example.org>") == (
            252,
            "2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
        )
        assert await cmd("STARTTLS") == (220, "2.0.0 Ready to start TLS")
        await c.writer.start_tls(insecure_client(), server_hostname="relay.test")
        assert (await c.cmd("EHLO client.test")).code == 250
        assert await cmd("AUTH") == (501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
        assert await cmd("AUTH PLAIN a b") == (
            501,
            "5.5.4 Syntax: AUTH mechanism [initial-response]",
        )
        assert (await cmd("AUTH PLAIN " + _plain("alice", "s3cret pass"))).code == 235
        assert await cmd("AUTH PLAIN " + _plain("alice", "s3cret pass")) == (
            503,
            "5.5.1 Error: already authenticated",
        )
        assert await cmd("QUIT") == (221, "2.0.0 Bye")
        await c.close()
        assert [r for r in transcript if not ENHANCED.match(r.text)] == []


async def test_overlong_auth_answer_gets_500_5_5_6_and_the_session_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tls, gate = _setup(tmp_path)
    async with frontend(tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        await c.starttls()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert await c.cmd("AUTH PLAIN") == (334, "")
        # Sent in pieces, so the reader sees the line grow past its limit.
        await c.send(b"A" * 1500)
        await c.send(b"A" * 1500 + b"\r\n")
        assert await c.reply() == (500, "5.5.6 Authentication Exchange line is too long")
        assert await c.cmd("NOOP") == (250, "2.0.0 Ok")
        assert await c.cmd("AUTH PLAIN " + _plain("alice", "s3cret pass")) == (
            235,
            "2.7.0 Authentication successful",
        )
        await c.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("250 OK", "250 2.0.0 Ok"),
        ("250 2.1.5 Ok", "250 2.1.5 Ok"),  # already has one
        ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
        ("451 Temporary trouble", "451 4.0.0 Temporary trouble"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ],
)
async def test_with_enhanced_code(sent: str, expected: str) -> None:
    assert with_enhanced_code(sent) == expected

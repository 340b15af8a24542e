"""Client-supplied text in the front end's log lines (addresses, AUTH user, HELO name) is
written through `relay.smtp.address.escaped`: a control character (ESC, CR, NUL, DEL), a C1
control or a Unicode line separator from a client never reaches the log as itself, so a
client can neither start a new log line nor send escape sequences to a terminal."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
from pathlib import Path

import pytest
from inboundkit import RawClient, frontend
from lab.certs import make_self_signed

from relay.config import Listener, RelayConfig
from relay.inbound.auth import Credentials, FailureLimiter, write_entry
from relay.inbound.server import AuthGate
from relay.inbound.tls import TlsContextHolder

OUTSIDE = RelayConfig(networks=(ipaddress.ip_network("192.0.2.0/24"),))


def _smtpd_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "relay.smtpd"]


def _printable(line: str) -> bool:
    return all(" " <= c <= "~" for c in line)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("char", "shown"),
    [("\x1b", "\\x1b"), ("\r", "\\r"), ("\x00", "\\x00"), ("\x7f", "\\x7f")],
)
async def test_refused_sender_with_a_control_character_is_logged_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, char: str, shown: str
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        reply = await c.cmd(f"MAIL FROM:<x{char}y@sender.example>".encode())
        assert reply == (501, "5.1.7 Bad sender address syntax")
        await c.close()
    (line,) = [m for m in _smtpd_lines(caplog) if m.startswith("reject=MAIL")]
    assert line == (
        f'reject=MAIL client=127.0.0.1 from=<x{shown}y@sender.example> reply="501 5.1.7" '
        "reason=bad-sender-syntax"
    )


@pytest.mark.asyncio
async def test_queued_line_escapes_c1_controls_and_line_separators(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Such characters pass the wire check (they are not ASCII controls) and are queued as
    given (RFC 6531), but the log shows them escaped."""
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        sender, rcpt = "a\x9bb@sender.example", "x\u2028y\u202ez@example.org"
        assert (await c.cmd(f"MAIL FROM:<{sender}> SMTPUTF8".encode())).code == 250
        assert (await c.cmd(f"RCPT TO:<{rcpt}>".encode())).code == 250
        assert (await c.cmd("DATA")).code == 354
        queued = await c.cmd(b"Subject: t\r\n\r\nx\r\n.")
        assert queued.code == 250
        await c.close()
        assert fe.queued[0].sender == sender
        assert fe.queued[0].recipients[0].address == rcpt
    qid = queued.text.rsplit(" ", 1)[1]
    (line,) = [m for m in _smtpd_lines(caplog) if "status=queued" in m]
    assert line.startswith(
        f"queue_id={qid} client=127.0.0.1 from=<a\\x9bb@sender.example> "
        "to=<x\\u2028y\\u202ez@example.org> size="
    )


@pytest.mark.asyncio
async def test_auth_user_is_logged_escaped_on_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    users = tmp_path / "users"
    write_entry(users, "alice", b"s3cret pass")
    gate = AuthGate(Credentials(users), FailureLimiter(5, 600.0))
    async with frontend(
        tmp_path,
        tls=TlsContextHolder(cert, key),
        auth=gate,
        listen=(Listener("127.0.0.1", 0, auth=True),),
        relay_cfg=OUTSIDE,
    ) as fe:
        c: RawClient = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        await c.starttls()
        assert (await c.cmd("EHLO client.test")).code == 250
        blob = base64.b64encode(b"\0ev\x1b[2Jil\r\x7f\0pw").decode()
        assert (await c.cmd(f"AUTH PLAIN {blob}")).code == 535
        await c.close()
    (line,) = [m for m in _smtpd_lines(caplog) if m.startswith("auth ")]
    # (NUL cannot be in a PLAIN user name: it separates the fields, RFC 4616 §2.)
    assert line == (
        "auth client=127.0.0.1 mechanism=PLAIN user=ev\\x1b[2Jil\\r\\x7f status=failed failures=1"
    )


@pytest.mark.asyncio
async def test_session_line_shows_a_non_ascii_helo_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO b\u00fccher.example".encode())).code == 250
        assert (await c.cmd("QUIT")).code == 221
        await c.close()
        await _wait_session(caplog)
    (line,) = [m for m in _smtpd_lines(caplog) if m.startswith("session ")]
    assert " helo=b\\xfccher.example " in line
    assert all(_printable(m) for m in _smtpd_lines(caplog))


async def _wait_session(caplog: pytest.LogCaptureFixture) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not any(m.startswith("session ") for m in _smtpd_lines(caplog)):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)

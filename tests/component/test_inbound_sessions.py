"""One log line and one count per inbound SMTP session (issue 7), on the real aiosmtpd front
end: how the session ended (quit, disconnected, timeout, refused), whether STARTTLS was
completed (with the version and cipher counted), the HELO name, AUTH, and the queue ids.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from inboundkit import Frontend, frontend
from lab.certs import make_self_signed

from relay.inbound.tls import TlsContextHolder

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

SESSION = re.compile(
    r"^session client=127\.0\.0\.1 helo=(?P<helo>\S+) tls=(?P<tls>\S+) auth=(?P<auth>yes|no) "
    r"messages=(?P<messages>\d+) queue_ids=(?P<ids>\S+) outcome=(?P<outcome>\S+) "
    r"duration=\d+\.\d{3}$"
)


async def _session_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[dict[str, str]]:
    """The first `count` session lines, waiting (with a deadline) for the server to log
    them: it does so when its side of the connection is lost."""
    deadline = asyncio.get_running_loop().time() + 10

    def found() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("session ")]

    while len(found()) < count:
        assert asyncio.get_running_loop().time() < deadline, found()
        await asyncio.sleep(0.01)
    lines = found()
    assert len(lines) == count, lines
    parsed = []
    for line in lines:
        match = SESSION.match(line)
        assert match, line
        parsed.append(match.groupdict())
    return parsed


def _sessions(fe: Frontend, outcome: str, tls: str) -> float | None:
    return fe.metrics.registry.get_sample_value(
        "dane_relay_inbound_sessions_total", {"outcome": outcome, "tls": tls}
    )


async def test_starttls_session_with_a_message_is_one_line_and_one_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    leaf = make_self_signed(["relay.test"])
    cert, key = leaf.write(tmp_path, "srv")
    async with frontend(tmp_path, tls=TlsContextHolder(cert, key)) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO before.test")).code == 250
        await c.starttls()
        version = c.tls_version()
        cipher = c.writer.get_extra_info("ssl_object").cipher()[0]
        assert (await c.cmd("EHLO after.test")).code == 250
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        done = await c.cmd(b"Subject: s\r\n\r\nbody\r\n.")
        assert done.code == 250
        assert (await c.cmd("QUIT")).code == 221
        await c.close()
        (line,) = await _session_lines(caplog, 1)
        (msg,) = fe.queued
        assert done.text.endswith(f"queued as {msg.queue_id}")
        assert line == {
            "helo": "after.test",
            "tls": f"{version}/{cipher}",
            "auth": "no",
            "messages": "1",
            "ids": msg.queue_id,
            "outcome": "quit",
        }
        assert _sessions(fe, "quit", "yes") == 1
        assert _sessions(fe, "quit", "no") is None
        negotiated = fe.metrics.registry.get_sample_value(
            "dane_relay_tls_negotiated_total",
            {"direction": "inbound", "version": version, "cipher": cipher},
        )
        assert negotiated == 1


async def test_disconnect_timeout_and_refusal_are_told_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    async with frontend(tmp_path, timeout=0.5, max_connections=1) as fe:
        # Two messages in one session, then the client hangs up without QUIT.
        c = await fe.connect()
        # (A control character in the name is refused at HELO now, test_inbound_helo.py;
        # a U-label shows the session line's escaping.)
        assert (await c.cmd("HELO m\u00fclti.test".encode())).code == 250
        for rcpt in ("bob@example.org", "carol@example.org"):
            assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
            assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250
            assert (await c.cmd("DATA")).code == 354
            assert (await c.cmd(b"Subject: s\r\n\r\nbody\r\n.")).code == 250
        # While it is open, max_connections = 1 refuses a second client before the greeting.
        refused = await fe.connect()
        assert refused.greeting is not None and refused.greeting.code == 421
        assert await refused.closed()
        await c.close()
        (gone,) = await _session_lines(caplog, 1)
        assert gone == {
            "helo": "m\\xfclti.test",
            "tls": "none",
            "auth": "no",
            "messages": "2",
            "ids": ",".join(m.queue_id for m in fe.queued),
            "outcome": "disconnected",
        }
        # A client that says nothing: the server's idle timeout (server.timeout) ends it.
        idle = await fe.connect()
        assert idle.greeting is not None and idle.greeting.code == 220
        assert await idle.reply() == (421, "4.4.2 relay.test Error: timeout exceeded")
        assert await idle.closed()
        _, timed_out = await _session_lines(caplog, 2)
        assert timed_out == {
            "helo": "-",
            "tls": "none",
            "auth": "no",
            "messages": "0",
            "ids": "-",
            "outcome": "timeout",
        }
        assert _sessions(fe, "disconnected", "no") == 1
        assert _sessions(fe, "timeout", "no") == 1
        assert _sessions(fe, "refused", "no") == 1
        assert _sessions(fe, "quit", "no") is None

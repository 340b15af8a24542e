"""Review 7: every inbound refusal on the real aiosmtpd front end writes one `reject=VERB`
line whose `reply` is quoted with its enhanced code (so the JSON member keeps "5.x.y"),
and is counted under the reason it names: including the RCPT refusals that used to be
counted without a line, TLS required (COMMAND: refused before the command ran) and a
DATA line over 1000 octets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from inboundkit import frontend
from lab.certs import make_self_signed

from relay.config import Listener
from relay.inbound.tls import TlsContextHolder
from relay.logsetup import message_fields


def _rejects(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [
        message_fields(r.getMessage())
        for r in caplog.records
        if r.name == "relay.smtpd" and r.getMessage().startswith("reject")
    ]


@pytest.mark.asyncio
async def test_recipient_refusals_each_write_a_counted_reject_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    async with frontend(tmp_path, max_recipients=1) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<a@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@nodot>")).code == 504
        assert (await c.cmd("RCPT TO:<b\x01b@example.com>")).code == 501
        assert (await c.cmd("RCPT TO:<one@example.com>")).code == 250
        assert (await c.cmd("RCPT TO:<two@example.com>")).code == 452
        await c.close()
        assert fe.rejections("bad_recipient") == 2
        assert fe.rejections("too_many_recipients") == 1
    assert [(f["reject"], f["reply"], f["reason"], f["why"]) for f in _rejects(caplog)] == [
        ("RCPT", "504 5.5.2", "bad-recipient", "not-fully-qualified"),
        ("RCPT", "501 5.1.3", "bad-recipient", "syntax"),
        ("RCPT", "452 4.5.3", "too-many-recipients", "limit-1"),
    ]


@pytest.mark.asyncio
async def test_tls_required_and_long_lines_write_counted_reject_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    holder = TlsContextHolder(cert, key)
    listen = (Listener("127.0.0.1", 0, require_tls=True), Listener("127.0.0.1", 0))
    async with frontend(tmp_path, tls=holder, listen=listen) as fe:
        strict, plain = fe.ports
        s = await fe.connect(port=strict)
        assert (await s.cmd("EHLO client.test")).code == 250
        assert (await s.cmd("MAIL FROM:<a@sender.example>")).code == 530
        await s.close()
        c = await fe.connect(port=plain)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<a@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.com>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        reply = await c.cmd(b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n.")
        assert reply.code == 554
        await c.close()
        assert fe.rejections("tls_required") == 1
        assert fe.rejections("line_too_long") == 1
    assert [(f["reject"], f["reply"], f["reason"]) for f in _rejects(caplog)] == [
        ("COMMAND", "530 5.7.0", "tls-required"),
        ("DATA", "554 5.6.0", "line-too-long"),
    ]

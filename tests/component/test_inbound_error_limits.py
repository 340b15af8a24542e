"""Per-session error limits on the real aiosmtpd front end (server.soft_error_limit,
hard_error_limit, error_sleep_time; Postfix smtpd_*_error_limit): a client that keeps
getting 4xx/5xx replies (recipient guessing through the gateway, relay-denied floods) is
slowed and then disconnected with 421 4.7.0; accepted mail resets the count."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path

import pytest
from inboundkit import READ_TIMEOUT, Frontend, RawClient, frontend

from relay.config import RelayConfig
from relay.inbound.errorlimit import SessionErrors, is_error_reply
from relay.inbound.gateway import Gateway

OUTSIDE = RelayConfig(networks=(ipaddress.ip_network("192.0.2.0/24"),))
LISTED = Gateway(frozenset({"example.com"}), frozenset({"alice@example.com", "bob@example.com"}))
TOO_MANY = (421, "4.7.0 relay.test Error: too many errors")


async def _all_replies(c: RawClient) -> list[bytes]:
    """Every reply line until the server closes the connection."""
    data = b""
    while True:
        chunk = await asyncio.wait_for(c.reader.read(65536), READ_TIMEOUT)
        if not chunk:
            return data.split(b"\r\n")[:-1]
        data += chunk


def _sessions(fe: Frontend, outcome: str) -> float:
    value = fe.metrics.registry.get_sample_value(
        "dane_relay_inbound_sessions_total", {"outcome": outcome, "tls": "no"}
    )
    return value or 0.0


async def _wait_for(predicate: object, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + READ_TIMEOUT
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


def test_error_replies_are_the_last_line_of_4xx_and_5xx_but_421() -> None:
    assert is_error_reply("550 5.1.1 <x@example.com>: Recipient address rejected")
    assert is_error_reply("452 4.5.3 Error: too many recipients")
    assert is_error_reply("503 Error: need MAIL command")
    assert not is_error_reply("550-first line of several")
    assert not is_error_reply("421 4.7.0 relay.test Error: too many errors")
    assert not is_error_reply("250 2.1.5 Ok")
    assert not is_error_reply("354 End data with <CR><LF>.<CR><LF>")
    errors = SessionErrors(soft=1, hard=2)
    assert not errors.delayed("550 x") and not errors.record("550 x")
    assert errors.delayed("550 x") and not errors.delayed("250 Ok")
    errors.record("250 2.0.0 Ok: queued as 0123")
    assert errors.count == 0


@pytest.mark.asyncio
async def test_recipient_harvest_is_cut_off_at_the_hard_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """harvest.py: 2000 pipelined guesses, the two real names last. Only the first 20 are
    answered (550 5.1.1), then 421; the rest is never looked at."""
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    async with frontend(tmp_path, relay_cfg=OUTSIDE, gateway=LISTED, error_sleep_time=0.0) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO harvest.test")).code == 250
        assert (await c.cmd("MAIL FROM:<h@outside.example>")).code == 250
        names = [f"user{i}" for i in range(1998)] + ["alice", "bob"]
        await c.send(b"".join(f"RCPT TO:<{n}@example.com>\r\n".encode() for n in names))
        lines = await _all_replies(c)
        assert len(lines) == 21, lines
        assert all(line.startswith(b"550 5.1.1 <user") for line in lines[:20])
        assert lines[20] == b"421 4.7.0 relay.test Error: too many errors"
        await c.close()
        await _wait_for(lambda: _sessions(fe, "too_many_errors") == 1, "session metric")
        assert fe.rejections("unknown_recipient") == 20  # RCPT 21.. were never handled
        assert fe.rejections("too_many_errors") == 1
        messages = [r.getMessage() for r in caplog.records]
        assert (
            'reject=SESSION client=127.0.0.1 reply="421 4.7.0" reason=too-many-errors errors=20'
            in messages
        )
        assert any(
            m.startswith("session client=127.0.0.1 ") and "outcome=too_many_errors" in m
            for m in messages
        )


@pytest.mark.asyncio
async def test_relay_denied_flood_and_syntax_errors_count_alike(tmp_path: Path) -> None:
    async with frontend(
        tmp_path, relay_cfg=OUTSIDE, hard_error_limit=4, error_sleep_time=0.0
    ) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("RCPT TO:<a@elsewhere.example>")).code == 503  # no MAIL yet: 1
        assert (await c.cmd("MAIL FROM:<s@outside.example>")).code == 250
        assert (await c.cmd("RCPT TO:<b@elsewhere.example>")).code == 550  # 2
        assert (await c.cmd("BOGUS")).code == 500  # 3
        assert (await c.cmd("RCPT TO:<c@elsewhere.example>")).code == 550  # 4
        assert await c.reply() == TOO_MANY
        assert await c.closed()
        assert fe.rejections("relay_denied") == 2
        assert fe.rejections("too_many_errors") == 1


@pytest.mark.asyncio
async def test_accepted_mail_sets_the_error_count_back(tmp_path: Path) -> None:
    """Postfix counts errors made without delivering mail: a queued message resets."""
    async with frontend(tmp_path, relay_cfg=OUTSIDE, gateway=LISTED, hard_error_limit=3) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<s@outside.example>")).code == 250
        assert (await c.cmd("RCPT TO:<x1@example.com>")).code == 550
        assert (await c.cmd("RCPT TO:<x2@example.com>")).code == 550
        assert (await c.cmd("RCPT TO:<alice@example.com>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(b"Subject: t\r\n\r\nbody\r\n.")).code == 250
        assert (await c.cmd("MAIL FROM:<s@outside.example>")).code == 250
        assert (await c.cmd("RCPT TO:<x3@example.com>")).code == 550
        assert (await c.cmd("RCPT TO:<x4@example.com>")).code == 550
        assert (await c.cmd("RCPT TO:<bob@example.com>")).code == 250
        assert (await c.cmd("RCPT TO:<x5@example.com>")).code == 550
        assert await c.reply() == TOO_MANY
        assert await c.closed()
        assert len(fe.queued) == 1


@pytest.mark.asyncio
async def test_error_replies_past_the_soft_limit_wait_without_blocking_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.smtpd")
    async with frontend(
        tmp_path, relay_cfg=OUTSIDE, soft_error_limit=2, error_sleep_time=300.0
    ) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<s@outside.example>")).code == 250
        assert (await c.cmd("RCPT TO:<a@elsewhere.example>")).code == 550
        assert (await c.cmd("RCPT TO:<b@elsewhere.example>")).code == 550
        await c.send(b"RCPT TO:<c@elsewhere.example>\r\n")

        def refused_c() -> bool:
            return any("to=<c@elsewhere.example>" in r.getMessage() for r in caplog.records)

        await _wait_for(refused_c, "the third RCPT was handled")
        # The handler refused it, but its reply waits error_sleep_time (300 s) ...
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.reader.readline(), 0.5)
        # ... on asyncio.sleep: another session is served meanwhile.
        other = await fe.connect()
        assert other.greeting is not None and other.greeting.code == 220
        assert (await other.cmd("EHLO other.test")).code == 250
        assert (await other.cmd("NOOP")).code == 250
        await other.close()
        await c.close()

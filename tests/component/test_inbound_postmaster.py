"""RFC 5321 §4.5.1 on the real aiosmtpd front end: `RCPT TO:<postmaster>` (no domain, any
case) and `postmaster@<server.hostname>` are accepted from any client and queued for
server.postmaster (or postmaster@<first gateway domain>); postmaster@<gateway domain> is
accepted even when the recipient list does not name it; with no address configured the
reply says why. The client (127.0.0.1) is outside relay.networks unless a test says so."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest
from inboundkit import Frontend, frontend

from relay.config import RelayConfig
from relay.inbound.gateway import Gateway, RecipientTable

OUTSIDE = RelayConfig(networks=(ipaddress.ip_network("192.0.2.0/24"),))
PM = "hostmaster@admin.example"
UNSET_REPLY = "5.1.1 <{}>: no postmaster address configured (server.postmaster)"


async def _send(fe: Frontend, *rcpts: str) -> list[tuple[int, str]]:
    """One transaction: the RCPT replies; DATA is sent when one was accepted."""
    c = await fe.connect()
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<someone@sender.example>")).code == 250
    replies = [tuple(await c.cmd(f"RCPT TO:{r}")) for r in rcpts]
    if any(code == 250 for code, _ in replies):
        assert (await c.cmd("DATA")).code == 354
        reply = await c.cmd(b"Subject: to the postmaster\r\n\r\nhello\r\n.")
        assert reply.code == 250, reply
    await c.close()
    return replies  # type: ignore[return-value]


def _queued(fe: Frontend) -> list[list[str]]:
    return [[r.address for r in m.recipients] for m in fe.queued]


@pytest.mark.asyncio
@pytest.mark.parametrize("rcpt", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
async def test_bare_postmaster_from_outside_is_queued_for_server_postmaster(
    tmp_path: Path, rcpt: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    async with frontend(tmp_path, relay_cfg=OUTSIDE, postmaster=PM) as fe:
        assert await _send(fe, rcpt) == [(250, "2.1.5 Ok")]
        assert _queued(fe) == [[PM]]
        assert fe.rejections("relay_denied") == 0
    (line,) = [r.getMessage() for r in caplog.records if "status=queued" in r.getMessage()]
    assert f"to=<{PM}> orig_to={rcpt} size=" in line


@pytest.mark.asyncio
@pytest.mark.parametrize("rcpt", ["<postmaster@relay.test>", "<PostMaster@RELAY.Test>"])
async def test_postmaster_at_the_hostname_is_queued_for_server_postmaster(
    tmp_path: Path, rcpt: str
) -> None:
    async with frontend(tmp_path, relay_cfg=OUTSIDE, postmaster=PM) as fe:
        assert await _send(fe, rcpt) == [(250, "2.1.5 Ok")]
        assert _queued(fe) == [[PM]]


@pytest.mark.asyncio
async def test_relay_network_client_gets_the_rewrite_too(tmp_path: Path) -> None:
    """Before: 504 5.5.2 need fully-qualified address, for a client that may relay."""
    async with frontend(tmp_path, postmaster=PM) as fe:  # 127.0.0.0/8 may relay
        assert await _send(fe, "<postmaster>") == [(250, "2.1.5 Ok")]
        assert _queued(fe) == [[PM]]
        assert fe.rejections("bad_recipient") == 0


@pytest.mark.asyncio
async def test_the_other_postmasters_are_not_rewritten(tmp_path: Path) -> None:
    async with frontend(tmp_path, postmaster=PM) as fe:
        # A foreign domain's postmaster is an ordinary recipient (relayed here).
        assert await _send(fe, "<postmaster@outside.example>", "<postmasters>") == [
            (250, "2.1.5 Ok"),
            (504, "5.5.2 <postmasters>: Recipient address rejected: need fully-qualified address"),
        ]
        assert _queued(fe) == [["postmaster@outside.example"]]


@pytest.mark.asyncio
async def test_both_forms_are_one_recipient_kept_once(tmp_path: Path) -> None:
    async with frontend(tmp_path, relay_cfg=OUTSIDE, postmaster=PM) as fe:
        replies = await _send(fe, "<postmaster>", "<postmaster@relay.test>")
        assert replies == [(250, "2.1.5 Ok"), (250, "2.1.5 Ok")]
        assert _queued(fe) == [[PM]]


@pytest.mark.asyncio
async def test_postmaster_counts_towards_max_recipients(tmp_path: Path) -> None:
    async with frontend(tmp_path, postmaster=PM, max_recipients=1) as fe:
        replies = await _send(fe, "<bob@outside.example>", "<postmaster>")
        assert replies == [(250, "2.1.5 Ok"), (452, "4.5.3 Error: too many recipients")]
        assert _queued(fe) == [["bob@outside.example"]]


@pytest.mark.asyncio
async def test_unset_uses_the_first_gateway_domain(tmp_path: Path) -> None:
    gateway = Gateway(
        frozenset({"b.example", "a.example"}),
        frozenset({"bob@b.example"}),
        first_domain="b.example",
    )
    async with frontend(tmp_path, relay_cfg=OUTSIDE, gateway=gateway) as fe:
        assert await _send(fe, "<Postmaster>") == [(250, "2.1.5 Ok")]
        assert _queued(fe) == [["postmaster@b.example"]]


@pytest.mark.asyncio
@pytest.mark.parametrize("rcpt", ["<postmaster@local.example>", "<PostMaster@Local.Example>"])
async def test_postmaster_at_a_gateway_domain_missing_from_recipients_file(
    tmp_path: Path, rcpt: str
) -> None:
    listing = tmp_path / "recipients"
    listing.write_text("alice@local.example\n")
    gateway = Gateway(frozenset({"local.example"}), table=RecipientTable(listing))
    async with frontend(tmp_path, relay_cfg=OUTSIDE, gateway=gateway) as fe:
        replies = await _send(fe, "<mallory@local.example>", rcpt)
        assert replies == [
            (
                550,
                "5.1.1 <mallory@local.example>: Recipient address rejected: "
                "User unknown in local recipient table",
            ),
            (250, "2.1.5 Ok"),
        ]
        # Not rewritten: it goes to the internal server as given.
        assert _queued(fe) == [[rcpt.strip("<>")]]
        assert fe.rejections("unknown_recipient") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("relay_cfg", "rcpt"),
    [
        (OUTSIDE, "<postmaster>"),
        (OUTSIDE, "<Postmaster@relay.test>"),
        (RelayConfig(), "<POSTMASTER>"),  # a client that may relay: the same reply
    ],
)
async def test_unset_is_refused_with_a_reply_that_says_why(
    tmp_path: Path, relay_cfg: RelayConfig, rcpt: str
) -> None:
    async with frontend(tmp_path, relay_cfg=relay_cfg) as fe:
        assert await _send(fe, rcpt) == [(550, UNSET_REPLY.format(rcpt.strip("<>")))]
        assert fe.queued == []
        assert fe.rejections("no_postmaster") == 1
        assert fe.rejections("relay_denied") == 0


@pytest.mark.asyncio
async def test_unset_refusals_count_towards_the_error_limit(tmp_path: Path) -> None:
    async with frontend(
        tmp_path, relay_cfg=OUTSIDE, hard_error_limit=2, error_sleep_time=0.0
    ) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<someone@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<postmaster>")).code == 550
        assert (await c.cmd("RCPT TO:<postmaster>")).code == 550
        assert (await c.reply()).code == 421
        assert await c.closed()
        assert fe.rejections("no_postmaster") == 2
        assert fe.rejections("too_many_errors") == 1

"""Gateway mode on the real aiosmtpd front end: the RCPT TO forms a client really sends
(source routes, quoted local parts, percent hack, case, trailing dot, literals) as
aiosmtpd parses them, and what reaches the queue. The client (127.0.0.1) is outside
relay.networks and does not authenticate."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from inboundkit import frontend

from relay.config import RelayConfig
from relay.inbound.gateway import Gateway

OUTSIDE = RelayConfig(networks=(ipaddress.ip_network("192.0.2.0/24"),))
GATEWAY = Gateway(frozenset({"local.example"}))
LISTED = Gateway(frozenset({"local.example"}), frozenset({"alice@local.example"}))


def _denied(address: str) -> tuple[int, str]:
    return (550, f"5.7.1 <{address}>: Relay access denied")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("rcpt", "reply"),
    [
        ("<bob@outside.example>", _denied("bob@outside.example")),
        # RFC 5321 §3.6.1/§4.1.4: the source route is ignored; the mailbox is outside.
        ("<@local.example:bob@outside.example>", _denied("bob@outside.example")),
        ("<@local.example,@x.example:bob@outside.example>", _denied("bob@outside.example")),
        # Percent hack, bang path and a quoted "@" into a local domain.
        ("<bob%outside.example@local.example>", _denied("bob%outside.example@local.example")),
        ("<outside.example!bob@local.example>", _denied("outside.example!bob@local.example")),
        (
            '<"bob@outside.example"@local.example>',
            _denied('"bob@outside.example"@local.example'),
        ),
        ("<bob@[127.0.0.1]>", _denied("bob@[127.0.0.1]")),
        ("<bob@sub.local.example>", _denied("bob@sub.local.example")),
    ],
)
async def test_tricks_from_outside_are_refused_and_nothing_is_queued(
    tmp_path: Path, rcpt: str, reply: tuple[int, str]
) -> None:
    async with frontend(tmp_path, relay_cfg=OUTSIDE, gateway=GATEWAY) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<someone@sender.example>")).code == 250
        assert await c.cmd(f"RCPT TO:{rcpt}") == reply
        # Nothing accepted: DATA has no recipients.
        assert (await c.cmd("DATA")).code == 503
        await c.close()
        assert fe.queued == []
        assert fe.rejections("relay_denied") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("rcpt", "stored"),
    [
        ("<bob@local.example>", "bob@local.example"),
        ("<bob@LOCAL.EXAMPLE>", "bob@LOCAL.EXAMPLE"),
        ("<@outside.example:bob@local.example>", "bob@local.example"),
    ],
)
async def test_local_domain_is_accepted_from_anyone(tmp_path: Path, rcpt: str, stored: str) -> None:
    async with frontend(tmp_path, relay_cfg=OUTSIDE, gateway=GATEWAY) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<someone@sender.example>")).code == 250
        assert (await c.cmd(f"RCPT TO:{rcpt}")) == (250, "2.1.5 Ok")
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(b"Subject: in\r\n\r\nhello\r\n.")).code == 250
        await c.close()
        # Stored as given (the domain is routed in its A-label, lower-case form).
        assert [[r.address for r in m.recipients] for m in fe.queued] == [[stored]]
        assert fe.rejections("relay_denied") == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("rcpt", ["<bob@local.example.>", "<bob@outside.example.>"])
async def test_trailing_dot_is_refused_as_malformed(tmp_path: Path, rcpt: str) -> None:
    """RFC 5321 §4.1.2 Domain has no final dot: aiosmtpd refuses it before any policy (the
    decision itself would treat local.example. as local.example, see test_gateway_policy)."""
    async with frontend(tmp_path, relay_cfg=OUTSIDE, gateway=GATEWAY) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<someone@sender.example>")).code == 250
        assert await c.cmd(f"RCPT TO:{rcpt}") == (553, "5.1.3 Error: malformed address")
        await c.close()
        assert fe.queued == []


@pytest.mark.asyncio
async def test_unknown_local_recipient_gets_550_5_1_1(tmp_path: Path) -> None:
    async with frontend(tmp_path, relay_cfg=OUTSIDE, gateway=LISTED) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<someone@sender.example>")).code == 250
        assert await c.cmd("RCPT TO:<bob@local.example>") == (
            550,
            "5.1.1 <bob@local.example>: Recipient address rejected: "
            "User unknown in local recipient table",
        )
        assert (await c.cmd("RCPT TO:<Alice@Local.Example>")).code == 250
        await c.close()
        assert fe.rejections("unknown_recipient") == 1
        assert fe.rejections("relay_denied") == 0


@pytest.mark.asyncio
async def test_relay_network_client_still_relays_in_gateway_mode(tmp_path: Path) -> None:
    async with frontend(tmp_path, gateway=LISTED) as fe:  # 127.0.0.0/8 may relay
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<app@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@outside.example>")).code == 250
        # The recipient list holds for the local domains, whoever sends.
        assert (await c.cmd("RCPT TO:<bob@local.example>")).code == 550
        await c.close()

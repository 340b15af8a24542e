"""The Received: header the front end adds (RFC 5321 §4.4), asserted byte for byte: the
RFC 3848 WITH protocol (SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA), the TLS version and cipher
after STARTTLS, the queue id, `for` with a single recipient only, the AUTH user only when
server.received_auth_user is set, a HELO name that cannot inject header lines (U-labels as
A-labels), and no `for` for an address that could pass for the end of the clauses."""

from __future__ import annotations

import base64
import ipaddress
import ssl
from pathlib import Path
from types import SimpleNamespace

import pytest
from inboundkit import Frontend, RawClient, frontend, insecure_client
from lab.certs import make_self_signed

from relay.config import Listener, RelayConfig, ServerConfig
from relay.inbound.auth import Credentials, FailureLimiter, write_entry
from relay.inbound.handler import RelayHandler
from relay.inbound.server import AuthGate
from relay.inbound.tls import TlsContextHolder
from relay.metrics import Metrics
from relay.spool.store import SpoolStore

NOW = 1796385600.0  # Fri, 04 Dec 2026 12:00:00 UTC
DATE = "Fri, 04 Dec 2026 12:00:00 -0000"
OUTSIDE = RelayConfig(networks=(ipaddress.ip_network("192.0.2.0/24"),))
AUTH_LISTENER = (Listener("127.0.0.1", 0, auth=True),)
CONTENT = b"Subject: trace\r\n\r\nhello\r\n"


def _tls(tmp_path: Path) -> TlsContextHolder:
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    return TlsContextHolder(cert, key)


def _gate(tmp_path: Path) -> AuthGate:
    users = tmp_path / "users"
    write_entry(users, "alice", b"s3cret pass")
    return AuthGate(Credentials(users), FailureLimiter(5, 600.0))


def _tls12() -> ssl.SSLContext:
    ctx = insecure_client()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    return ctx


async def _send(c: RawClient, rcpts: list[str]) -> str:
    """MAIL, RCPT..., DATA; returns the queue id."""
    assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
    for rcpt in rcpts:
        assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250, rcpt
    assert (await c.cmd("DATA")).code == 354
    reply = await c.cmd(CONTENT + b".")
    assert reply.code == 250, reply
    return reply.text.rsplit(" ", 1)[1]


def _header(fe: Frontend, qid: str) -> str:
    body = SpoolStore(fe.spool).read_body(qid)
    assert body.endswith(b"\r\n" + CONTENT)
    return body[: -len(CONTENT)].decode()


@pytest.mark.asyncio
async def test_helo_plaintext_is_smtp(tmp_path: Path) -> None:
    async with frontend(tmp_path, clock=lambda: NOW) as fe:
        c = await fe.connect()
        assert (await c.cmd("HELO client.test")).code == 250
        qid = await _send(c, ["bob@example.org"])
        await c.close()
        assert _header(fe, qid) == (
            "Received: from client.test ([127.0.0.1])\r\n"
            f"\tby relay.test (dane-relay) with SMTP id {qid}\r\n"
            "\tfor <bob@example.org>;\r\n"
            f"\t{DATE}\r\n"
        )


@pytest.mark.asyncio
async def test_ehlo_plaintext_is_esmtp_and_two_recipients_are_not_named(tmp_path: Path) -> None:
    async with frontend(tmp_path, clock=lambda: NOW) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        qid = await _send(c, ["bob@example.org", "carol@example.net"])
        await c.close()
        assert _header(fe, qid) == (
            "Received: from client.test ([127.0.0.1])\r\n"
            f"\tby relay.test (dane-relay) with ESMTP id {qid};\r\n"
            f"\t{DATE}\r\n"
        )


@pytest.mark.asyncio
async def test_starttls_tls12_is_esmtps_with_version_and_cipher(tmp_path: Path) -> None:
    async with frontend(tmp_path, tls=_tls(tmp_path), clock=lambda: NOW) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        await c.starttls(_tls12())
        assert (await c.cmd("EHLO client.test")).code == 250
        qid = await _send(c, ["bob@example.org"])
        await c.close()
        assert _header(fe, qid) == (
            "Received: from client.test ([127.0.0.1])\r\n"
            "\t(using TLSv1.2 with cipher ECDHE-ECDSA-AES128-GCM-SHA256 (128/128 bits))\r\n"
            f"\tby relay.test (dane-relay) with ESMTPS id {qid}\r\n"
            "\tfor <bob@example.org>;\r\n"
            f"\t{DATE}\r\n"
        )


@pytest.mark.asyncio
async def test_starttls_tls13_default_cipher(tmp_path: Path) -> None:
    async with frontend(tmp_path, tls=_tls(tmp_path), clock=lambda: NOW) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        await c.starttls()
        assert (await c.cmd("EHLO client.test")).code == 250
        qid = await _send(c, ["bob@example.org"])
        await c.close()
        assert _header(fe, qid) == (
            "Received: from client.test ([127.0.0.1])\r\n"
            "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
            f"\tby relay.test (dane-relay) with ESMTPS id {qid}\r\n"
            "\tfor <bob@example.org>;\r\n"
            f"\t{DATE}\r\n"
        )


async def _authenticated(fe: Frontend) -> RawClient:
    c = await fe.connect()
    assert (await c.cmd("EHLO client.test")).code == 250
    await c.starttls(_tls12())
    assert (await c.cmd("EHLO client.test")).code == 250
    token = base64.b64encode(b"\0alice\0s3cret pass").decode()
    assert (await c.cmd(f"AUTH PLAIN {token}")).code == 235
    return c


@pytest.mark.asyncio
async def test_auth_over_tls_is_esmtpsa_and_the_user_stays_private(tmp_path: Path) -> None:
    async with frontend(
        tmp_path,
        tls=_tls(tmp_path),
        auth=_gate(tmp_path),
        listen=AUTH_LISTENER,
        relay_cfg=OUTSIDE,
        clock=lambda: NOW,
    ) as fe:
        c = await _authenticated(fe)
        qid = await _send(c, ["bob@example.org"])
        await c.close()
        assert _header(fe, qid) == (
            "Received: from client.test ([127.0.0.1])\r\n"
            "\t(using TLSv1.2 with cipher ECDHE-ECDSA-AES128-GCM-SHA256 (128/128 bits))\r\n"
            f"\tby relay.test (dane-relay) with ESMTPSA id {qid}\r\n"
            "\tfor <bob@example.org>;\r\n"
            f"\t{DATE}\r\n"
        )


@pytest.mark.asyncio
async def test_received_auth_user_names_the_user(tmp_path: Path) -> None:
    async with frontend(
        tmp_path,
        tls=_tls(tmp_path),
        auth=_gate(tmp_path),
        listen=AUTH_LISTENER,
        relay_cfg=OUTSIDE,
        clock=lambda: NOW,
        received_auth_user=True,
    ) as fe:
        c = await _authenticated(fe)
        qid = await _send(c, ["bob@example.org"])
        await c.close()
        assert _header(fe, qid) == (
            "Received: from client.test ([127.0.0.1])\r\n"
            "\t(using TLSv1.2 with cipher ECDHE-ECDSA-AES128-GCM-SHA256 (128/128 bits))\r\n"
            "\t(Authenticated sender: alice)\r\n"
            f"\tby relay.test (dane-relay) with ESMTPSA id {qid}\r\n"
            "\tfor <bob@example.org>;\r\n"
            f"\t{DATE}\r\n"
        )


@pytest.mark.asyncio
async def test_helo_name_that_could_inject_is_refused_and_never_written(tmp_path: Path) -> None:
    """The front end refuses such a name at EHLO (501, RFC 5321 §4.1.1.1); and should a
    session ever carry one, the writer replaces what could break the header with "?"."""
    hostile = "cl\u00efent.test\tX-Injected:1 (x); Mon, 1 Jan 2024"
    async with frontend(tmp_path, clock=lambda: NOW) as fe:
        c = await fe.connect()
        assert (await c.cmd(f"EHLO {hostile}".encode())).code == 501
        await c.close()
    handler = _handler(tmp_path)
    session = SimpleNamespace(peer=("127.0.0.1", 40000), host_name=hostile, extended_smtp=True)
    envelope = SimpleNamespace(rcpt_tos=["bob@example.org"])
    header = handler._received_header(session, envelope, "0123456789ABCDEF0123")
    assert header == (
        b"Received: from cl?ent.test?X-Injected:1??x???Mon??1?Jan?2024 ([127.0.0.1])\r\n"
        b"\tby relay.test (dane-relay) with ESMTP id 0123456789ABCDEF0123\r\n"
        b"\tfor <bob@example.org>;\r\n"
        b"\tFri, 04 Dec 2026 12:00:00 -0000\r\n"
    )


@pytest.mark.asyncio
async def test_u_label_helo_is_written_as_its_a_label(tmp_path: Path) -> None:
    async with frontend(tmp_path, clock=lambda: NOW) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO B\u00fccher.example".encode())).code == 250
        qid = await _send(c, ["bob@example.org"])
        await c.close()
        assert _header(fe, qid) == (
            "Received: from xn--bcher-kva.example ([127.0.0.1])\r\n"
            f"\tby relay.test (dane-relay) with ESMTP id {qid}\r\n"
            "\tfor <bob@example.org>;\r\n"
            f"\t{DATE}\r\n"
        )


@pytest.mark.asyncio
async def test_recipient_with_a_forged_date_gets_no_for_clause(tmp_path: Path) -> None:
    """Review 07_rcpt_in_received: a quoted local part holding "; DATE (forged)"."""
    rcpt = '"x>; Mon, 1 Jan 2024 00:00:00 +0000 (forged)"@example.org'
    async with frontend(tmp_path, clock=lambda: NOW) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        qid = await _send(c, [rcpt])
        await c.close()
        assert fe.queued[0].recipients[0].address == rcpt
        assert _header(fe, qid) == (
            "Received: from client.test ([127.0.0.1])\r\n"
            f"\tby relay.test (dane-relay) with ESMTP id {qid};\r\n"
            f"\t{DATE}\r\n"
        )


def _handler(tmp_path: Path) -> RelayHandler:
    return RelayHandler(
        SpoolStore(tmp_path / "spool2"),
        ServerConfig(),
        RelayConfig(),
        "relay.test",
        Metrics(),
        lambda _: None,
        clock=lambda: NOW,
    )


def test_ipv6_client_is_an_ipv6_address_literal(tmp_path: Path) -> None:
    """RFC 5321 §4.1.3: IPv6-address-literal = "IPv6:" IPv6-addr."""
    handler = RelayHandler(
        SpoolStore(tmp_path / "spool"),
        ServerConfig(),
        RelayConfig(),
        "relay.test",
        Metrics(),
        lambda _: None,
        clock=lambda: NOW,
    )
    session = SimpleNamespace(
        peer=("2001:db8::25", 40000, 0, 0), host_name="v6.client.test", extended_smtp=True
    )
    envelope = SimpleNamespace(rcpt_tos=["bob@example.org"])
    header = handler._received_header(session, envelope, "0123456789ABCDEF0123")
    assert header == (
        b"Received: from v6.client.test ([IPv6:2001:db8::25])\r\n"
        b"\tby relay.test (dane-relay) with ESMTP id 0123456789ABCDEF0123\r\n"
        b"\tfor <bob@example.org>;\r\n"
        b"\tFri, 04 Dec 2026 12:00:00 -0000\r\n"
    )

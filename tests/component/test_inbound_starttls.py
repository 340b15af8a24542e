"""STARTTLS on the real aiosmtpd front end: offered only with a certificate, TLS 1.2 at
least, require_tls per listener (530 5.7.0 before STARTTLS), and the reload (SIGHUP's
function) that new connections see while open ones keep going."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
from inboundkit import frontend, insecure_client
from lab.certs import Leaf, make_self_signed

from relay.config import Endpoint, Listener
from relay.inbound.tls import TlsContextHolder


def _holder(tmp_path: Path) -> tuple[TlsContextHolder, Leaf, Path, Path]:
    leaf = make_self_signed(["relay.test"])
    cert, key = leaf.write(tmp_path, "srv")
    return TlsContextHolder(cert, key), leaf, cert, key


@pytest.mark.asyncio
async def test_starttls_is_offered_and_negotiates_tls12_or_later(tmp_path: Path) -> None:
    holder, leaf, _, _ = _holder(tmp_path)
    async with frontend(tmp_path, tls=holder) as fe:
        c = await fe.connect()
        ehlo = await c.cmd("EHLO client.test")
        assert "STARTTLS" in ehlo.text.splitlines()
        await c.starttls()
        assert c.tls_version() in ("TLSv1.2", "TLSv1.3")
        assert c.peer_cert() == leaf.cert_der
        ehlo = await c.cmd("EHLO client.test")
        assert "STARTTLS" not in ehlo.text.splitlines()
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        await c.close()


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls11_client_is_refused(tmp_path: Path) -> None:
    holder, _, _, _ = _holder(tmp_path)
    old = insecure_client()
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    async with frontend(tmp_path, tls=holder) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        with pytest.raises(ssl.SSLError):
            await c.starttls(old)
        await c.close()


@pytest.mark.asyncio
async def test_without_certificate_starttls_is_not_offered(tmp_path: Path) -> None:
    async with frontend(tmp_path) as fe:
        c = await fe.connect()
        ehlo = await c.cmd("EHLO client.test")
        assert "STARTTLS" not in ehlo.text.splitlines()
        assert (await c.cmd("STARTTLS")).code in (500, 502, 454)
        await c.close()


@pytest.mark.asyncio
async def test_require_tls_listener_refuses_mail_before_starttls(tmp_path: Path) -> None:
    holder, _, _, _ = _holder(tmp_path)
    listen = (Endpoint("127.0.0.1", 0), Listener("127.0.0.1", 0, require_tls=True))
    async with frontend(tmp_path, tls=holder, listen=listen) as fe:
        plain_port, strict_port = fe.ports
        # The plain listener takes MAIL without TLS.
        c = await fe.connect(port=plain_port)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        await c.close()
        # The require_tls listener does not, until STARTTLS.
        s = await fe.connect(port=strict_port)
        assert (await s.cmd("EHLO client.test")).code == 250
        refused = await s.cmd("MAIL FROM:<alice@sender.example>")
        assert refused == (530, "5.7.0 Must issue a STARTTLS command first")
        await s.starttls()
        assert (await s.cmd("EHLO client.test")).code == 250
        assert (await s.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert (await s.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await s.cmd("DATA")).code == 354
        assert (await s.cmd(b"Subject: tls\r\n\r\nhi\r\n.")).code == 250
        await s.close()
        assert len(fe.queued) == 1
        assert fe.rejections("tls_required") == 1


@pytest.mark.asyncio
async def test_reload_serves_the_new_certificate_to_new_connections_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder, old_leaf, cert, key = _holder(tmp_path)
    async with frontend(tmp_path, tls=holder) as fe:
        before = await fe.connect()
        assert (await before.cmd("EHLO client.test")).code == 250
        await before.starttls()
        assert before.peer_cert() == old_leaf.cert_der

        new_leaf = make_self_signed(["relay.test"])
        cert.write_bytes(new_leaf.chain_pem)
        key.write_bytes(new_leaf.key_pem)
        assert holder.reload() is True

        after = await fe.connect()
        assert (await after.cmd("EHLO client.test")).code == 250
        await after.starttls()
        assert after.peer_cert() == new_leaf.cert_der
        # The connection opened before the reload is still served.
        assert (await before.cmd("EHLO client.test")).code == 250
        assert (await before.cmd("MAIL FROM:<alice@sender.example>")).code == 250

        # A broken pair (key of another certificate) is refused; the last good one stays.
        other = make_self_signed(["relay.test"])
        key.write_bytes(other.key_pem)
        with caplog.at_level(logging.ERROR, logger="relay.smtpd"):
            assert holder.reload() is False
        assert (
            "tls reload refused: server.tls_key_file: the key does not match the certificate "
            f"in tls_cert_file ({key}); the previous certificate and key stay in use"
        ) in caplog.messages
        third = await fe.connect()
        assert (await third.cmd("EHLO client.test")).code == 250
        await third.starttls()
        assert third.peer_cert() == new_leaf.cert_der
        for c in (before, after, third):
            await c.close()

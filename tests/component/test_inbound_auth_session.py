"""SMTP AUTH on the real aiosmtpd front end (RFC 4954): not offered and refused (538) before
STARTTLS, 535 for a wrong password (counted), 235 for the right one, 421 once a client
address has used up its failures, and relaying for an authenticated client whose address
is outside relay.networks (550 5.7.1 without AUTH)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import threading
from pathlib import Path

import pytest
from inboundkit import READ_TIMEOUT, Frontend, RawClient, frontend
from lab.certs import make_self_signed

from relay.config import Listener, RelayConfig
from relay.inbound.auth import Credentials, FailureLimiter, write_entry
from relay.inbound.server import AuthGate
from relay.inbound.tls import TlsContextHolder

# 192.0.2.0/24 (RFC 5737 TEST-NET-1) holds no address of this host: the test client on
# 127.0.0.1 is outside relay.networks.
OUTSIDE = RelayConfig(networks=(ipaddress.ip_network("192.0.2.0/24"),))
AUTH_LISTENER = (Listener("127.0.0.1", 0, auth=True),)


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _setup(tmp_path: Path, limit: int = 5) -> tuple[TlsContextHolder, AuthGate]:
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    users = tmp_path / "users"
    write_entry(users, "alice", b"s3cret pass")
    return TlsContextHolder(cert, key), AuthGate(Credentials(users), FailureLimiter(limit, 600.0))


def _auth_failures(fe: Frontend) -> float:
    value = fe.metrics.registry.get_sample_value("dane_relay_auth_failures_total")
    return value or 0.0


async def _tls_session(fe: Frontend) -> RawClient:
    c = await fe.connect()
    assert (await c.cmd("EHLO client.test")).code == 250
    await c.starttls()
    return c


@pytest.mark.asyncio
async def test_auth_is_not_offered_before_starttls_and_refused_with_538(tmp_path: Path) -> None:
    tls, gate = _setup(tmp_path)
    async with frontend(
        tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER, relay_cfg=OUTSIDE
    ) as fe:
        c = await fe.connect()
        ehlo = await c.cmd("EHLO client.test")
        assert ehlo.code == 250
        assert not [k for k in ehlo.text.splitlines() if k.upper().startswith("AUTH")]
        # RFC 4954 §4 / RFC 3207: no cleartext password exchange, even a correct one.
        refused = await c.cmd("AUTH PLAIN " + _plain("alice", "s3cret pass"))
        assert refused == (538, "5.7.11 Encryption required for requested authentication mechanism")
        refused = await c.cmd("AUTH LOGIN")
        assert refused.code == 538
        # Not authenticated: relaying from outside relay.networks is refused.
        assert (await c.cmd("MAIL FROM:<app@client.example>")).code == 250
        denied = await c.cmd("RCPT TO:<bob@outside.example>")
        assert denied == (550, "5.7.1 <bob@outside.example>: Relay access denied")
        assert _auth_failures(fe) == 0
        await c.close()


@pytest.mark.asyncio
async def test_after_starttls_auth_is_offered_wrong_password_535_right_one_235(
    tmp_path: Path,
) -> None:
    tls, gate = _setup(tmp_path)
    async with frontend(tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER) as fe:
        c = await _tls_session(fe)
        ehlo = await c.cmd("EHLO client.test")
        assert "AUTH LOGIN PLAIN" in ehlo.text.splitlines()
        wrong = await c.cmd("AUTH PLAIN " + _plain("alice", "s3cret pasS"))
        assert wrong == (535, "5.7.8 Authentication credentials invalid")
        assert _auth_failures(fe) == 1
        unknown = await c.cmd("AUTH PLAIN " + _plain("mallory", "s3cret pass"))
        assert unknown == (535, "5.7.8 Authentication credentials invalid")
        assert _auth_failures(fe) == 2
        right = await c.cmd("AUTH PLAIN " + _plain("alice", "s3cret pass"))
        assert right == (235, "2.7.0 Authentication successful")
        assert (await c.cmd("AUTH PLAIN " + _plain("alice", "s3cret pass"))).code == 503
        assert _auth_failures(fe) == 2
        await c.close()


@pytest.mark.asyncio
async def test_auth_login_dialogue(tmp_path: Path) -> None:
    tls, gate = _setup(tmp_path)
    async with frontend(tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER) as fe:
        c = await _tls_session(fe)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert await c.cmd("AUTH LOGIN") == (334, _b64("User Name\x00"))
        assert (await c.cmd(_b64("alice"))) == (334, _b64("Password\x00"))
        assert (await c.cmd(_b64("wrong"))).code == 535
        assert (await c.cmd("AUTH LOGIN " + _b64("alice"))).code == 334
        assert (await c.cmd(_b64("s3cret pass"))) == (235, "2.7.0 Authentication successful")
        assert _auth_failures(fe) == 1
        await c.close()


@pytest.mark.asyncio
async def test_failure_limit_answers_421_and_closes_for_that_address(tmp_path: Path) -> None:
    tls, gate = _setup(tmp_path, limit=3)
    async with frontend(tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER) as fe:
        c = await _tls_session(fe)
        assert (await c.cmd("EHLO client.test")).code == 250
        for _ in range(3):
            assert (await c.cmd("AUTH PLAIN " + _plain("alice", "guess"))).code == 535
        blocked = await c.cmd("AUTH PLAIN " + _plain("alice", "s3cret pass"))
        assert blocked == (421, "4.7.0 relay.test Error: too many failed authentication attempts")
        assert await c.closed()
        # A new connection from the same address is refused too, even with the right
        # password; the refusals are counted apart from the failures.
        again = await _tls_session(fe)
        assert (await again.cmd("EHLO client.test")).code == 250
        blocked = await again.cmd("AUTH PLAIN " + _plain("alice", "s3cret pass"))
        assert blocked.code == 421
        assert await again.closed()
        assert _auth_failures(fe) == 3
        assert fe.rejections("auth_rate_limited") == 2


@pytest.mark.asyncio
async def test_authenticated_client_outside_networks_may_relay(tmp_path: Path) -> None:
    tls, gate = _setup(tmp_path)
    async with frontend(
        tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER, relay_cfg=OUTSIDE
    ) as fe:
        # Without AUTH (TLS alone is not enough): relay denied, counted.
        c = await _tls_session(fe)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<app@client.example>")).code == 250
        denied = await c.cmd("RCPT TO:<bob@outside.example>")
        assert denied == (550, "5.7.1 <bob@outside.example>: Relay access denied")
        assert fe.rejections("relay_denied") == 1
        assert (await c.cmd("RSET")).code == 250
        # After AUTH the same client relays.
        assert (await c.cmd("AUTH PLAIN " + _plain("alice", "s3cret pass"))).code == 235
        assert (await c.cmd("MAIL FROM:<app@client.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@outside.example>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        done = await c.cmd(b"Subject: authenticated\r\n\r\nhello\r\n.")
        assert done.code == 250
        await c.close()
        assert [[r.address for r in m.recipients] for m in fe.queued] == [["bob@outside.example"]]
        assert fe.rejections("relay_denied") == 1


@pytest.mark.asyncio
async def test_listener_without_auth_offers_none_after_starttls(tmp_path: Path) -> None:
    tls, gate = _setup(tmp_path)
    async with frontend(tmp_path, tls=tls, auth=gate) as fe:  # a plain listener
        c = await _tls_session(fe)
        ehlo = await c.cmd("EHLO client.test")
        assert not [k for k in ehlo.text.splitlines() if k.upper().startswith("AUTH")]
        refused = await c.cmd("AUTH PLAIN " + _plain("alice", "s3cret pass"))
        assert refused == (503, "5.5.1 Error: authentication not enabled")
        await c.close()


class _HeldCredentials(Credentials):
    """Credentials whose check waits until the test lets it go (on its worker thread)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()

    def check(self, user: str, password: bytes) -> bool:
        self.entered.set()
        assert self.release.wait(READ_TIMEOUT)
        return super().check(user, password)


@pytest.mark.asyncio
async def test_password_check_does_not_stall_other_sessions(tmp_path: Path) -> None:
    """The scrypt check runs off the event loop: while one AUTH is being checked another
    session is answered (were it on the loop, the NOOP below would never be answered)."""
    tls, _ = _setup(tmp_path)
    held = _HeldCredentials(tmp_path / "users")
    gate = AuthGate(held, FailureLimiter(5, 600.0))
    async with frontend(tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER) as fe:
        c = await _tls_session(fe)
        assert (await c.cmd("EHLO client.test")).code == 250
        await c.send(f"AUTH PLAIN {_plain('alice', 's3cret pass')}\r\n".encode())
        assert await asyncio.to_thread(held.entered.wait, READ_TIMEOUT)
        other = await fe.connect()
        assert (await other.cmd("NOOP")).code == 250
        held.release.set()
        assert await c.reply() == (235, "2.7.0 Authentication successful")
        await other.close()
        await c.close()


def test_failure_limiter_forgets_expired_clients() -> None:
    """Failures from ever new addresses do not pile up once they have left the window."""
    now = [0.0]
    limiter = FailureLimiter(3, 60.0, clock=lambda: now[0])
    for i in range(1024):
        limiter.failed(f"2001:db8::{i:x}")
    assert len(limiter) == 1024
    now[0] = 61.0  # every one of them has expired
    assert limiter.failed("2001:db8::ffff") == 1
    assert len(limiter) == 1
    assert not limiter.blocked("2001:db8::1")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("command", "answers", "reply"),
    [
        ("AUTH PLAIN", ["*"], (501, "5.7.0 Auth aborted")),
        ("AUTH LOGIN", ["*"], (501, "5.7.0 Auth aborted")),
        ("AUTH LOGIN", [_b64("alice"), "*"], (501, "5.7.0 Auth aborted")),
        ("AUTH PLAIN", ["not base64!"], (501, "5.5.2 Can't decode base64")),
        ("AUTH LOGIN", ["%%%"], (501, "5.5.2 Can't decode base64")),
    ],
)
async def test_cancelled_or_garbled_auth_gets_exactly_one_reply(
    tmp_path: Path, command: str, answers: list[str], reply: tuple[int, str]
) -> None:
    """RFC 4954 §4: "*" cancels the exchange with a 501; one command, one final reply (a
    second one would be read as the answer to the client's next command)."""
    tls, gate = _setup(tmp_path)
    async with frontend(tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER) as fe:
        c = await _tls_session(fe)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(command)).code == 334
        for answer in answers[:-1]:
            assert (await c.cmd(answer)).code == 334
        assert await c.cmd(answers[-1]) == reply
        assert await c.cmd("NOOP") == (250, "2.0.0 Ok")
        assert (await c.cmd("AUTH PLAIN " + _plain("alice", "s3cret pass"))).code == 235
        await c.close()
        assert _auth_failures(fe) == 0

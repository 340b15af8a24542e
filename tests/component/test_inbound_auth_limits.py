"""AUTH hardening on the real front end. server.auth_failure_limit under parallel sessions
(review authbrute.py par 5 10: nine 535 replies with a limit of 5): an attempt is reserved
before its password is checked in a worker thread, so no more than the limit can fail per
window and client address. AUTH PLAIN with an authorization identity other than the user
(RFC 4616 §2, no proxy authorization here) fails."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import threading
from pathlib import Path

import pytest
from inboundkit import READ_TIMEOUT, RawClient, frontend
from lab.certs import make_self_signed

from relay.config import Listener, RelayConfig
from relay.inbound.auth import Credentials, FailureLimiter, write_entry
from relay.inbound.server import AuthGate
from relay.inbound.tls import TlsContextHolder

AUTH_LISTENER = (Listener("127.0.0.1", 0, auth=True),)
OUTSIDE = RelayConfig(networks=(ipaddress.ip_network("192.0.2.0/24"),))
RATE_LIMITED = (421, "4.7.0 relay.test Error: too many failed authentication attempts")
INVALID = (535, "5.7.8 Authentication credentials invalid")


class _HeldCredentials(Credentials):
    """Credentials whose checks wait until the test lets them go; counts the checks."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.checks = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    def check(self, user: str, password: bytes) -> bool:
        with self.lock:
            self.checks += 1
        assert self.release.wait(READ_TIMEOUT)
        return super().check(user, password)


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def _wait_checks(held: _HeldCredentials, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + READ_TIMEOUT
    while held.checks < count:
        assert asyncio.get_running_loop().time() < deadline, held.checks
        await asyncio.sleep(0.01)


def test_attempts_under_way_count_against_the_limit() -> None:
    limiter = FailureLimiter(2, 600.0, clock=lambda: 0.0)
    assert limiter.begin("192.0.2.1") and limiter.begin("192.0.2.1")
    assert limiter.blocked("192.0.2.1")
    assert not limiter.begin("192.0.2.1")  # two under way: a third is not even checked
    assert limiter.begin("192.0.2.2")  # per client address
    assert limiter.end("192.0.2.1", failed=False) == 0  # a success frees its slot
    assert limiter.begin("192.0.2.1")
    assert limiter.end("192.0.2.1", failed=True) == 1
    assert limiter.end("192.0.2.1", failed=True) == 2
    assert limiter.blocked("192.0.2.1") and not limiter.begin("192.0.2.1")


@pytest.mark.asyncio
async def test_parallel_sessions_cannot_exceed_the_failure_limit(tmp_path: Path) -> None:
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    write_entry(tmp_path / "users", "app1", b"hunter2")
    held = _HeldCredentials(tmp_path / "users")
    gate = AuthGate(held, FailureLimiter(2, 600.0))
    tls = TlsContextHolder(cert, key)
    async with frontend(tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER) as fe:
        sessions: list[RawClient] = []
        try:
            for _ in range(5):
                c = await fe.connect()
                assert (await c.cmd("EHLO brute.test")).code == 250
                await c.starttls()
                assert (await c.cmd("EHLO brute.test")).code == 250
                sessions.append(c)
            # Two wrong passwords are being checked (held in their worker threads) ...
            for i, c in enumerate(sessions[:2]):
                await c.send(f"AUTH PLAIN {_plain('app1', f'wrong{i}')}\r\n".encode())
                await _wait_checks(held, i + 1)
            # ... so three more attempts from the same address are refused unchecked.
            for c in sessions[2:]:
                await c.send(f"AUTH PLAIN {_plain('app1', 'wrong')}\r\n".encode())
                assert await asyncio.wait_for(c.reply(), 5.0) == RATE_LIMITED
                assert await c.closed()
            held.release.set()
            assert [await c.reply() for c in sessions[:2]] == [INVALID, INVALID]
            assert held.checks == 2
            assert fe.metrics.registry.get_sample_value("dane_relay_auth_failures_total") == 2
            assert fe.rejections("auth_rate_limited") == 3
            # The window now holds the limit: even the right password is not checked.
            assert await sessions[0].cmd(f"AUTH PLAIN {_plain('app1', 'hunter2')}") == (
                RATE_LIMITED
            )
            assert held.checks == 2
        finally:
            held.release.set()
            for c in sessions:
                await c.close()


@pytest.mark.asyncio
async def test_a_success_frees_its_reservation(tmp_path: Path) -> None:
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    write_entry(tmp_path / "users", "app1", b"hunter2")
    limiter = FailureLimiter(1, 600.0)
    gate = AuthGate(Credentials(tmp_path / "users"), limiter)
    tls = TlsContextHolder(cert, key)
    async with frontend(tmp_path, tls=tls, auth=gate, listen=AUTH_LISTENER) as fe:
        for _ in range(3):
            c = await fe.connect()
            assert (await c.cmd("EHLO app.test")).code == 250
            await c.starttls()
            assert (await c.cmd("EHLO app.test")).code == 250
            ok = await c.cmd(f"AUTH PLAIN {_plain('app1', 'hunter2')}")
            assert ok == (235, "2.7.0 Authentication successful")
            await c.close()
        assert not limiter.blocked("127.0.0.1")


def _raw_plain(authzid: bytes, user: bytes, password: bytes) -> str:
    return base64.b64encode(authzid + b"\0" + user + b"\0" + password).decode()


@pytest.mark.asyncio
@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "challenge"])
async def test_plain_with_another_authorization_identity_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, initial: bool
) -> None:
    """RFC 4616 §2: `postmaster NUL app1 NUL hunter2` asks to act as postmaster with app1's
    password; the relay has no proxy authorization, so it is refused (535 5.7.8) and
    counted, and the session is not authenticated."""
    caplog.set_level(logging.INFO, logger="relay.smtpd")
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    write_entry(tmp_path / "users", "app1", b"hunter2")
    gate = AuthGate(Credentials(tmp_path / "users"), FailureLimiter(5, 600.0))
    async with frontend(
        tmp_path,
        tls=TlsContextHolder(cert, key),
        auth=gate,
        listen=AUTH_LISTENER,
        relay_cfg=OUTSIDE,
    ) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO app.test")).code == 250
        await c.starttls()
        assert (await c.cmd("EHLO app.test")).code == 250
        blob = _raw_plain(b"postmaster", b"app1", b"hunter2")
        if initial:
            assert await c.cmd(f"AUTH PLAIN {blob}") == INVALID
        else:
            assert await c.cmd("AUTH PLAIN") == (334, "")
            assert await c.cmd(blob) == INVALID
        # Not authenticated: relaying from outside relay.networks is still refused.
        assert (await c.cmd("MAIL FROM:<app1@client.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@outside.example>")).code == 550
        await c.close()
        assert fe.metrics.registry.get_sample_value("dane_relay_auth_failures_total") == 1
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auth ")]
    assert line == (
        "auth client=127.0.0.1 mechanism=PLAIN user=app1 status=failed failures=1 "
        "authzid=postmaster reason=proxy-authorization"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("authzid", [b"", b"app1"], ids=["empty", "same-as-user"])
async def test_plain_with_no_or_the_same_authorization_identity_succeeds(
    tmp_path: Path, authzid: bytes
) -> None:
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    write_entry(tmp_path / "users", "app1", b"hunter2")
    gate = AuthGate(Credentials(tmp_path / "users"), FailureLimiter(5, 600.0))
    async with frontend(
        tmp_path,
        tls=TlsContextHolder(cert, key),
        auth=gate,
        listen=AUTH_LISTENER,
        relay_cfg=OUTSIDE,
    ) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO app.test")).code == 250
        await c.starttls()
        assert (await c.cmd("EHLO app.test")).code == 250
        ok = await c.cmd(f"AUTH PLAIN {_raw_plain(authzid, b'app1', b'hunter2')}")
        assert ok == (235, "2.7.0 Authentication successful")
        assert (await c.cmd("MAIL FROM:<app1@client.example>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@outside.example>")).code == 250
        await c.close()

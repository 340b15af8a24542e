"""The real inbound front end on both event loops the relay runs on: the stdlib loop and
uvloop (`dane-relay run` uses uvloop when it is installed). Each test runs on a fresh loop
of each kind and checks the exact bytes a client receives:
- the 421 of the connection limits and of a connection that arrives while stopping
  (uvloop's transport is no asyncio.WriteTransport: this once raised instead);
- `server.timeout` is idle time: a slow but steady DATA or AUTH exchange is not cut, an idle
  client gets `421 4.4.2` before the close;
- STARTTLS inside TLS gets 554 and the session goes on; a failed TLS handshake is one INFO
  line, counted as outcome `tls_failed`, and frees the connection slot;
- what a client pipelined after an AUTH 421 gets no reply and logs no error.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from inboundkit import READ_TIMEOUT, Frontend, RawClient, frontend
from lab.certs import make_self_signed

from relay.config import Listener
from relay.inbound.auth import Credentials, FailureLimiter, write_entry
from relay.inbound.server import AuthGate, Sessions
from relay.inbound.tls import TlsContextHolder

pytestmark = pytest.mark.timeout(60)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "stdlib": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
AUTH_LISTENER = (Listener("127.0.0.1", 0, auth=True),)
Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Run a scenario on a fresh loop of the parametrized kind."""

    def runner(scenario: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as loop_runner:
            kind = type(loop_runner.get_loop()).__module__.split(".")[0]
            assert kind == ("uvloop" if request.param == "uvloop" else "asyncio")
            return loop_runner.run(asyncio.wait_for(scenario, 30))

    return runner


async def _everything(port: int, source: str = "127.0.0.1", send: bytes = b"") -> bytes:
    """All the bytes the server sends on a new connection until it closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    if send:
        writer.write(send)
    try:
        return await asyncio.wait_for(reader.read(), READ_TIMEOUT)
    finally:
        writer.close()


async def _greeted_after_release(fe: Frontend, source: str) -> RawClient:
    """A new connection once a closed one has given its slot back (deadline 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        c = await fe.connect(source)
        assert c.greeting is not None
        if c.greeting.code == 220 or time.monotonic() > deadline:
            return c
        await c.close()
        await asyncio.sleep(0.02)


def _no_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    bad += [(r.name, r.getMessage()) for r in caplog.records if r.exc_info]
    assert bad == []


def _sessions(fe: Frontend, outcome: str, tls: str) -> float | None:
    return fe.metrics.registry.get_sample_value(
        "dane_relay_inbound_sessions_total", {"outcome": outcome, "tls": tls}
    )


def _tls(tmp_path: Path) -> TlsContextHolder:
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    return TlsContextHolder(cert, key)


def _auth(tmp_path: Path, limit: int = 5) -> AuthGate:
    users = tmp_path / "users"
    write_entry(users, "alice", b"s3cret pass")
    return AuthGate(Credentials(users), FailureLimiter(limit, 600.0))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_connection_limits_answer_421_on_both_loops(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with frontend(tmp_path, max_connections=2, max_connections_per_client=1) as fe:
            first = await fe.connect("127.0.0.1")
            assert first.greeting is not None and first.greeting.code == 220
            # RFC 5321 §3.8: 421 instead of the greeting, then the close.
            assert await _everything(fe.port, "127.0.0.1") == (
                b"421 4.7.0 relay.test Error: too many connections from 127.0.0.1\r\n"
            )
            second = await fe.connect("127.0.0.2")
            assert second.greeting is not None and second.greeting.code == 220
            assert await _everything(fe.port, "127.0.0.3") == (
                b"421 4.7.0 relay.test Error: too many connections\r\n"
            )
            assert _sessions(fe, "refused", "no") == 2
            for c in (first, second):
                await c.close()

    caplog.set_level(logging.INFO)
    run(scenario())
    assert not [r for r in caplog.records if r.exc_info]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_connection_while_stopping_gets_421_on_both_loops(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        sessions = Sessions()
        async with frontend(tmp_path, sessions=sessions) as fe:
            assert sessions.begin_shutdown() == 0
            assert await _everything(fe.port) == b"421 4.3.2 relay.test Service shutting down\r\n"

    caplog.set_level(logging.INFO)
    run(scenario())
    _no_errors(caplog)


def test_timeout_is_idle_time_in_data_and_an_idle_client_gets_421(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with frontend(tmp_path, timeout=1.0) as fe:
            c = await fe.connect()
            assert (await c.cmd("EHLO client.test")).code == 250
            assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
            assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
            assert (await c.cmd("DATA")).code == 354
            # RFC 5321 §4.5.3.2.6: the timeout runs between data blocks, not over the whole
            # DATA: 8 lines 0.3 s apart take 2.4 s, more than twice the timeout.
            await c.send(b"Subject: slow\r\n\r\n")
            for n in range(8):
                await asyncio.sleep(0.3)
                await c.send(b"line %d\r\n" % n)
            done = await c.cmd(b".")
            assert done.code == 250
            assert len(fe.queued) == 1
            # Then nothing: 421 4.4.2 and the close.
            assert await asyncio.wait_for(c.reader.read(), READ_TIMEOUT) == (
                b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
            )
            assert _sessions(fe, "timeout", "no") == 1

    run(scenario())


def test_timeout_is_idle_time_in_the_auth_exchange(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with frontend(
            tmp_path, timeout=1.0, tls=_tls(tmp_path), auth=_auth(tmp_path), listen=AUTH_LISTENER
        ) as fe:
            c = await fe.connect()
            assert (await c.cmd("EHLO client.test")).code == 250
            await c.starttls()
            assert (await c.cmd("EHLO client.test")).code == 250
            assert (await c.cmd("AUTH LOGIN")).code == 334
            # RFC 5321 §4.5.3.2.7: each answer is waited for from its challenge.
            await asyncio.sleep(0.7)
            assert (await c.cmd(_b64("alice"))).code == 334
            await asyncio.sleep(0.7)
            assert await c.cmd(_b64("s3cret pass")) == (235, "2.7.0 Authentication successful")
            await c.close()

    run(scenario())


def test_starttls_inside_tls_gets_554_and_the_session_goes_on(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with frontend(tmp_path, tls=_tls(tmp_path)) as fe:
            c = await fe.connect()
            assert (await c.cmd("EHLO client.test")).code == 250
            await c.starttls()
            # RFC 3207 §4.2: no second STARTTLS on a TLS session.
            assert await c.cmd("STARTTLS") == (554, "5.5.1 Error: TLS already active")
            assert await c.cmd("NOOP") == (250, "2.0.0 Ok")
            assert (await c.cmd("EHLO client.test")).code == 250
            assert await c.cmd("MAIL FROM:<alice@sender.example>") == (250, "2.1.0 Ok")
            assert await c.cmd("QUIT") == (221, "2.0.0 Bye")
            await c.close()

    caplog.set_level(logging.INFO)
    run(scenario())
    _no_errors(caplog)


def test_failed_handshake_is_one_info_line_and_frees_the_slot(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with frontend(tmp_path, tls=_tls(tmp_path), max_connections_per_client=1) as fe:
            c = await fe.connect()
            assert (await c.cmd("EHLO client.test")).code == 250
            assert await c.cmd("STARTTLS") == (220, "2.0.0 Ready to start TLS")
            await c.send(b"GARBAGE NOT TLS\r\n\r\n")  # no ClientHello
            assert await c.closed()
            await c.close()
            again = await _greeted_after_release(fe, "127.0.0.1")
            assert again.greeting is not None and again.greeting.code == 220
            await again.close()
            assert _sessions(fe, "tls_failed", "no") == 1

    caplog.set_level(logging.DEBUG)
    run(scenario())
    _no_errors(caplog)
    failed = [r for r in caplog.records if "tls=failed" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].levelno == logging.INFO
    assert failed[0].name == "relay.smtpd"
    assert failed[0].getMessage().startswith("starttls client=127.0.0.1 tls=failed reason=")
    sessions = [r.getMessage() for r in caplog.records if r.getMessage().startswith("session ")]
    assert " outcome=tls_failed " in sessions[0]


def test_commands_pipelined_after_the_auth_421_get_nothing(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with frontend(
            tmp_path, tls=_tls(tmp_path), auth=_auth(tmp_path, limit=1), listen=AUTH_LISTENER
        ) as fe:
            c = await fe.connect()
            assert (await c.cmd("EHLO client.test")).code == 250
            await c.starttls()
            assert (await c.cmd("EHLO client.test")).code == 250
            wrong = base64.b64encode(b"\0alice\0wrong").decode()
            assert (await c.cmd(f"AUTH PLAIN {wrong}")).code == 535
            # Blocked now: the first AUTH gets 421 and the close; the rest is not answered
            # (a second close of a TLS transport once made the next write raise).
            await c.send(
                f"AUTH PLAIN {wrong}\r\nAUTH PLAIN {wrong}\r\nNOOP\r\n"
                "MAIL FROM:<a@sender.example>\r\nFOO\r\n".encode()
            )
            rest = await asyncio.wait_for(c.reader.read(), READ_TIMEOUT)
            assert rest == (
                b"421 4.7.0 relay.test Error: too many failed authentication attempts\r\n"
            )
            await c.close()

    caplog.set_level(logging.INFO)
    run(scenario())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == []

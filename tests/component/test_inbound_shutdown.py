"""The graceful stop of the real front end (aiosmtpd + RelayHandler + SpoolStore): idle
sessions get 421 4.3.2 at once, a session in a transaction finishes it (250, committed)
and then gets 421, a session still open after the grace is cut off with 421 and nothing
of its unfinished message is queued (RFC 5321 §3.8)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from inboundkit import RawClient

from relay.config import Endpoint, RelayConfig, ServerConfig
from relay.inbound.handler import RelayHandler
from relay.inbound.server import Sessions, start_listeners
from relay.metrics import Metrics
from relay.spool.records import QueuedMessage
from relay.spool.store import SpoolStore

SHUTTING_DOWN = (421, "4.3.2 relay.test Service shutting down")


@dataclass
class Front:
    sessions: Sessions
    spool: Path
    host: str
    port: int
    queued: list[QueuedMessage] = field(default_factory=list)

    async def connect(self) -> RawClient:
        return await RawClient.open(self.host, self.port)

    async def greeted(self) -> RawClient:
        """A session after EHLO, counted in `sessions`."""
        c = await self.connect()
        assert c.greeting is not None and c.greeting.code == 220
        assert (await c.cmd("EHLO client.test")).code == 250
        return c

    def envelopes(self) -> list[str]:
        return sorted(p.name for p in (self.spool / "env").iterdir())


@asynccontextmanager
async def front(tmp_path: Path) -> AsyncIterator[Front]:
    cfg = replace(ServerConfig(), listen=(Endpoint("127.0.0.1", 0),))
    store = SpoolStore(tmp_path / "spool")
    store.open()
    queued: list[QueuedMessage] = []
    handler = RelayHandler(store, cfg, RelayConfig(), "relay.test", Metrics(), queued.append)
    sessions = Sessions()
    servers = await start_listeners(handler, cfg, "relay.test", None, None, sessions)
    host, port = servers[0].sockets[0].getsockname()[:2]
    try:
        yield Front(sessions, tmp_path / "spool", host, port, queued)
    finally:
        for srv in servers:
            srv.close()
        store.close()


async def _transaction_until_data(c: RawClient) -> None:
    assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
    assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
    assert (await c.cmd("DATA")).code == 354


@pytest.mark.asyncio
async def test_idle_sessions_get_421_and_are_closed_at_once(tmp_path: Path) -> None:
    async with front(tmp_path) as fe:
        first, second = await fe.greeted(), await fe.greeted()
        assert len(fe.sessions) == 2
        assert fe.sessions.begin_shutdown() == 0  # nothing left to finish
        for c in (first, second):
            assert await c.reply() == SHUTTING_DOWN
            assert await c.closed()
        assert await fe.sessions.drain(5.0) == 0
        assert len(fe.sessions) == 0


@pytest.mark.asyncio
async def test_session_in_data_finishes_with_250_then_gets_421(tmp_path: Path) -> None:
    async with front(tmp_path) as fe:
        idle = await fe.greeted()
        busy = await fe.greeted()
        await _transaction_until_data(busy)
        await busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")

        assert fe.sessions.begin_shutdown() == 1
        assert await idle.reply() == SHUTTING_DOWN
        # The message in DATA is still taken, committed and answered normally ...
        done = await busy.cmd(b"second half\r\n.")
        assert done.code == 250 and done.text.startswith("2.0.0 Ok: queued as "), done
        qid = done.text.rsplit(" ", 1)[1]
        # ... and the next thing the client reads is the 421, then the close.
        assert await busy.reply() == SHUTTING_DOWN
        assert await busy.closed()
        assert await fe.sessions.drain(5.0) == 0
        assert fe.envelopes() == [qid]
        assert [m.queue_id for m in fe.queued] == [qid]


@pytest.mark.asyncio
async def test_session_after_mail_completes_its_transaction(tmp_path: Path) -> None:
    async with front(tmp_path) as fe:
        c = await fe.greeted()
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert fe.sessions.begin_shutdown() == 1
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(b"Subject: late\r\n\r\nbody\r\n.")).code == 250
        assert await c.reply() == SHUTTING_DOWN
        assert await c.closed()
        assert len(fe.envelopes()) == 1


@pytest.mark.asyncio
async def test_rset_ends_the_transaction_and_the_session(tmp_path: Path) -> None:
    async with front(tmp_path) as fe:
        c = await fe.greeted()
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert fe.sessions.begin_shutdown() == 1
        assert (await c.cmd("RSET")).code == 250
        assert await c.reply() == SHUTTING_DOWN
        assert await c.closed()
        assert fe.envelopes() == []


@pytest.mark.asyncio
async def test_session_still_in_data_after_the_grace_is_cut_off(tmp_path: Path) -> None:
    async with front(tmp_path) as fe:
        c = await fe.greeted()
        await _transaction_until_data(c)
        await c.send(b"Subject: never finished\r\n\r\npart\r\n")
        assert fe.sessions.begin_shutdown() == 1
        assert await fe.sessions.drain(0.3) == 1
        assert await c.reply() == SHUTTING_DOWN
        assert await c.closed()
        assert len(fe.sessions) == 0
        # No 250 was given, so nothing is queued: the client still has the message.
        assert fe.envelopes() == []
        assert fe.queued == []


@pytest.mark.asyncio
async def test_connection_after_shutdown_began_gets_421_instead_of_the_greeting(
    tmp_path: Path,
) -> None:
    async with front(tmp_path) as fe:
        assert fe.sessions.begin_shutdown() == 0
        # The listener is still bound here (the app closes it first): a connection that
        # was accepted anyway is answered 421 and closed.
        c = await fe.connect()
        assert c.greeting == SHUTTING_DOWN
        assert await c.closed()
        assert len(fe.sessions) == 0


@pytest.mark.asyncio
async def test_quit_while_shutting_down_in_a_transaction_gets_221(tmp_path: Path) -> None:
    async with front(tmp_path) as fe:
        c = await fe.greeted()
        assert (await c.cmd("MAIL FROM:<alice@sender.example>")).code == 250
        assert fe.sessions.begin_shutdown() == 1
        assert (await c.cmd("QUIT")).code == 221
        assert await c.closed()


@pytest.mark.asyncio
async def test_help_still_lists_the_commands(tmp_path: Path) -> None:
    """The shutdown guard wraps every command but keeps what HELP reads from it."""
    async with front(tmp_path) as fe:
        c = await fe.greeted()
        reply = await c.cmd("HELP")
        assert reply.code == 214  # RFC 5321 §4.2.2: the help reply
        assert {"DATA", "EHLO", "MAIL", "QUIT", "RCPT", "RSET"} <= set(reply.text.split()[3:])
        assert await c.cmd("HELP MAIL") == (
            214,
            "2.0.0 Syntax: MAIL FROM: <address> [SP <mail-parameters>]",
        )

"""relay.delivery.transport against real SMTP peers on loopback, on both event loops.

Every peer is an asyncio server on 127.0.0.1:0 whose side of the conversation is a small
script in the test (no mocks of the transport): greeting, EHLO/HELO, STARTTLS with a
self-signed certificate made at test time, pipelined MAIL/RCPT/DATA driven by the
engine's own `_drive` and `Transaction`, and peers that break the protocol (overlong or
endless replies, mixed codes, silence, closing mid-transaction, plaintext injected after
the 220 to STARTTLS). Each test runs on a fresh stdlib loop and on a fresh uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from lab.certs import Leaf, make_ca, make_self_signed

from relay.delivery.client import (
    Capabilities,
    Command,
    ConnectionLost,
    Ending,
    Envelope,
    PeerReply,
    Phase,
    Transaction,
)
from relay.delivery.engine import _drive
from relay.delivery.tls import client_context, pkix_context
from relay.delivery.transport import (
    MAX_REPLY_LINES,
    SmtpTransport,
    message_data,
)
from relay.errors import (
    ConnectFailed,
    PeerTimeout,
    PkixInvalid,
    PkixUntrusted,
    RemotePermReject,
    RemoteTempReject,
    Scope,
    StartTlsRefused,
    TlsHandshakeFailed,
)
from relay.model import Outcome
from relay.smtp.reply import SmtpReply

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "stdlib": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
GREETING = b"220 mx.peer.test ESMTP ready\r\n"
EHLO_PIPELINING = b"250-mx.peer.test hello\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n"
FAST = dict.fromkeys(Phase, 5.0)
Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a scenario on a fresh loop of the parametrized kind (cancels leftovers)."""

    def runner(scenario: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as loop_runner:
            return loop_runner.run(asyncio.wait_for(scenario, 15))

    return runner


@pytest.fixture(scope="module")
def leaf() -> Leaf:
    return make_self_signed(["mx.peer.test"])


@pytest.fixture
def server_tls(leaf: Leaf, tmp_path: Path) -> tuple[ssl.SSLContext, list[str | None]]:
    """A server context for `leaf` and the list its SNI callback records names into."""
    chain, key = leaf.write(tmp_path, "peer")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    seen: list[str | None] = []

    def note_sni(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    ctx.sni_callback = note_sni
    return ctx, seen


class Conn:
    """The peer's side of one connection; records every command line it reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.lines: list[str] = []
        self.message = b""

    async def line(self) -> str | None:
        raw = await self.reader.readline()
        if not raw:
            return None
        text = raw.decode().rstrip("\r\n")
        self.lines.append(text)
        return text

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def data(self) -> bytes:
        return await self.reader.readuntil(b"\r\n.\r\n")


Script = Callable[[Conn], Awaitable[None]]


class Peer:
    """An SMTP peer on 127.0.0.1:0 that plays `script` on its first connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.conn: Conn | None = None
        self.finished: asyncio.Future[None] | None = None
        self.port = 0

    async def __aenter__(self) -> Peer:
        self.finished = asyncio.get_running_loop().create_future()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 24)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conn = Conn(reader, writer)
        assert self.finished is not None
        try:
            await self.script(self.conn)
        finally:
            writer.close()
            if not self.finished.done():
                self.finished.set_result(None)

    async def done(self) -> Conn:
        """The connection, once the script has ended."""
        assert self.finished is not None
        await self.finished
        assert self.conn is not None
        return self.conn


def responder(replies: dict[str, bytes], greeting: bytes = GREETING) -> Script:
    """A plain peer: one reply per command verb; DATA's 354 reads the message."""

    async def script(conn: Conn) -> None:
        await conn.send(greeting)
        while (line := await conn.line()) is not None:
            verb = line.split(" ", 1)[0].upper()
            await conn.send(replies.get(verb, b"502 5.5.2 not here\r\n"))
            if verb == "QUIT":
                return
            if verb == "DATA" and replies.get("DATA", b"").startswith(b"354"):
                conn.message = await conn.data()
                await conn.send(replies.get(".", b"250 2.0.0 queued as 1\r\n"))

    return script


def transport(command_timeout: float = 5.0) -> SmtpTransport:
    return SmtpTransport("client.test", 5.0, command_timeout, FAST)


async def waits_forever(conn: Conn) -> None:
    await conn.reader.read()  # until the client goes


# -- greeting ------------------------------------------------------------------------------


def test_greeting_220_opens_a_session_and_quit_is_answered(run: Run[Any]) -> None:
    async def scenario() -> tuple[SmtpReply, list[str]]:
        replies = {"QUIT": b"221 2.0.0 bye\r\n"}
        greeting = b"220-mx.peer.test first line\r\n220 ESMTP second line\r\n"
        async with Peer(responder(replies, greeting)) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.quit()
            return session.greeting, (await peer.done()).lines

    greeting, lines = run(scenario())
    assert greeting == SmtpReply(220, "2.0.0", "mx.peer.test first line ESMTP second line")
    assert lines == ["QUIT"]


@pytest.mark.parametrize(
    ("greeting", "error", "expected"),
    [
        (
            b"421 4.3.2 shutting down\r\n",
            RemoteTempReject,
            SmtpReply(421, "4.3.2", "shutting down"),
        ),
        (b"554 5.3.2 no service\r\n", RemotePermReject, SmtpReply(554, "5.3.2", "no service")),
    ],
)
def test_refusing_greeting_raises_host_scoped_reject_and_sends_nothing(
    run: Run[Any], greeting: bytes, error: type[Exception], expected: SmtpReply
) -> None:
    async def scenario() -> tuple[BaseException, list[str]]:
        async with Peer(responder({}, greeting)) as peer:
            with pytest.raises(error) as caught:
                await transport().open("127.0.0.1", peer.port)
            return caught.value, (await peer.done()).lines

    exc, lines = run(scenario())
    assert isinstance(exc, RemoteTempReject | RemotePermReject)
    assert exc.reply == expected
    assert exc.scope is Scope.HOST
    assert lines == []  # RFC 5321 §3.8: not even QUIT after a 421


def test_silent_peer_times_out_waiting_for_the_greeting(run: Run[Any]) -> None:
    async def scenario() -> BaseException:
        async with Peer(waits_forever) as peer:
            with pytest.raises(PeerTimeout) as caught:
                await transport(command_timeout=0.3).open("127.0.0.1", peer.port)
            return caught.value

    exc = run(scenario())
    assert isinstance(exc, PeerTimeout)
    assert exc.reply == SmtpReply(451, "4.4.2", "timeout waiting for the greeting")
    assert exc.scope is Scope.HOST


def test_refused_connection_raises_connect_failed(run: Run[Any]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def scenario() -> BaseException:
        with pytest.raises(ConnectFailed) as caught:
            await transport().open("127.0.0.1", port)
        return caught.value

    exc = run(scenario())
    assert isinstance(exc, ConnectFailed)
    assert exc.reply.code == 451 and exc.reply.enhanced == "4.4.1"
    assert exc.reply.text.startswith("cannot connect: ")
    assert exc.scope is Scope.HOST


def test_greeting_that_is_not_smtp_raises_connect_failed(run: Run[Any]) -> None:
    async def scenario() -> BaseException:
        async with Peer(responder({}, b"SSH-2.0-OpenSSH_9.6\r\n")) as peer:
            with pytest.raises(ConnectFailed) as caught:
                await transport().open("127.0.0.1", peer.port)
            return caught.value

    exc = run(scenario())
    assert isinstance(exc, ConnectFailed)
    assert exc.reply.text.startswith("SMTP protocol error in the greeting: not an SMTP reply")


# -- EHLO / HELO ---------------------------------------------------------------------------


def test_ehlo_multi_line_reply_gives_capabilities_bare_lf_accepted(run: Run[Any]) -> None:
    ehlo = (
        b"250-mx.peer.test hello client.test\r\n"
        b"250-PIPELINING\n"  # bare LF: read leniently
        b"250-SIZE 10240000\r\n"
        b"250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n"
        b"250 STARTTLS\r\n"
    )

    async def scenario() -> tuple[SmtpReply, Capabilities, list[bool], list[str]]:
        async with Peer(responder({"EHLO": ehlo, "QUIT": b"221 bye\r\n"})) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            reply = await session.ehlo("client.test")
            caps = session.capabilities()
            flags = [session.supports(x) for x in ("starttls", "PIPELINING", "smtputf8")]
            await session.quit()
            return reply, caps, flags, (await peer.done()).lines

    reply, caps, flags, lines = run(scenario())
    assert reply.code == 250
    assert reply.text.startswith("mx.peer.test hello client.test PIPELINING SIZE 10240000")
    assert caps == Capabilities(
        esmtp=True,
        pipelining=True,
        size=10240000,
        eightbitmime=True,
        enhancedstatuscodes=True,
        starttls=True,
    )
    assert flags == [True, True, False]
    assert lines == ["EHLO client.test", "QUIT"]


def test_ehlo_refused_falls_back_to_helo_without_capabilities(run: Run[Any]) -> None:
    replies = {"EHLO": b"502 5.5.2 what?\r\n", "HELO": b"250 mx.peer.test\r\n"}

    async def scenario() -> tuple[SmtpReply, Capabilities, bool, list[str]]:
        async with Peer(responder(replies)) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            reply = await session.ehlo("client.test")
            session.abort()
            return (
                reply,
                session.capabilities(),
                session.supports("8bitmime"),
                (await peer.done()).lines,
            )

    reply, caps, offered, lines = run(scenario())
    assert reply == SmtpReply(250, "2.0.0", "mx.peer.test")
    assert caps == Capabilities()
    assert offered is False
    assert lines == ["EHLO client.test", "HELO client.test"]


def test_ehlo_with_mixed_codes_is_a_protocol_error(run: Run[Any]) -> None:
    replies = {"EHLO": b"250-mx.peer.test\r\n251 PIPELINING\r\n"}

    async def scenario() -> BaseException:
        async with Peer(responder(replies)) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            with pytest.raises(ConnectFailed) as caught:
                await session.ehlo("client.test")
            session.abort()
            return caught.value

    exc = run(scenario())
    assert isinstance(exc, ConnectFailed)
    assert exc.reply.text == ("SMTP protocol error after EHLO: reply code 251 inside a 250 reply")


def test_ehlo_unanswered_times_out(run: Run[Any]) -> None:
    async def script(conn: Conn) -> None:
        await conn.send(GREETING)
        await waits_forever(conn)

    async def scenario() -> BaseException:
        async with Peer(script) as peer:
            session = await transport(command_timeout=0.3).open("127.0.0.1", peer.port)
            with pytest.raises(PeerTimeout) as caught:
                await session.ehlo("client.test")
            session.abort()
            return caught.value

    exc = run(scenario())
    assert isinstance(exc, PeerTimeout)
    assert exc.reply == SmtpReply(451, "4.4.2", "timeout after EHLO")


# -- STARTTLS ------------------------------------------------------------------------------


def tls_peer(ctx: ssl.SSLContext, after_220: list[bytes], ehlo_after: bytes) -> Script:
    """EHLO offers STARTTLS; the 220 is followed by `after_220` (each its own write, before
    the handshake); over TLS, EHLO gets `ehlo_after` and QUIT 221."""

    async def script(conn: Conn) -> None:
        await conn.send(GREETING)
        assert await conn.line() == "EHLO client.test"
        await conn.send(b"250-mx.peer.test\r\n250 STARTTLS\r\n")
        assert await conn.line() == "STARTTLS"
        conn.writer.write(b"220 2.0.0 go ahead\r\n")
        for chunk in after_220:
            conn.writer.write(chunk)
        # No await between the 220 and start_tls: the ClientHello is never read as text.
        await conn.writer.start_tls(ctx)
        conn.lines.append("-- tls --")
        while (line := await conn.line()) is not None:
            verb = line.split(" ", 1)[0]
            await conn.send(ehlo_after if verb == "EHLO" else b"221 2.0.0 bye\r\n")
            if verb == "QUIT":
                return

    return script


def test_starttls_returns_the_chain_sends_sni_and_resets_capabilities(
    run: Run[Any], leaf: Leaf, server_tls: tuple[ssl.SSLContext, list[str | None]]
) -> None:
    ctx, sni = server_tls
    script = tls_peer(ctx, [], b"250-mx.peer.test\r\n250 SIZE 2000\r\n")

    async def scenario() -> dict[str, Any]:
        async with Peer(script) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.ehlo("client.test")
            before = session.supports("starttls")
            chain = await session.starttls("MX.Peer.Test.", client_context())
            reset = session.capabilities()
            reply = await session.ehlo("client.test")
            out = {
                "before": before,
                "chain": chain,
                "tls": session.tls,
                "info": session.tls_info(),
                "reset": reset,
                "reply": reply,
                "caps": session.capabilities(),
                "starttls_after": session.supports("starttls"),
            }
            await session.quit()
            out["lines"] = (await peer.done()).lines
            return out

    out = run(scenario())
    assert out["before"] is True
    assert out["chain"] == list(leaf.chain_der)
    assert sni == ["mx.peer.test"]  # RFC 7672 §8.1: ASCII, no trailing dot
    assert out["tls"] is True
    assert out["info"][0] in ("TLSv1.2", "TLSv1.3") and out["info"][1] != ""
    assert out["reset"] == Capabilities()  # RFC 3207 §4.2
    assert out["reply"] == SmtpReply(250, "2.0.0", "mx.peer.test SIZE 2000")
    assert out["caps"] == Capabilities(esmtp=True, size=2000)
    assert out["starttls_after"] is False
    assert out["lines"] == ["EHLO client.test", "STARTTLS", "-- tls --", "EHLO client.test", "QUIT"]


def test_quit_over_tls_does_not_wait_for_a_peer_that_never_closes(
    run: Run[Any], server_tls: tuple[ssl.SSLContext, list[str | None]]
) -> None:
    # A blocking peer in a thread: after its 221 it never reads again, so our TLS
    # close_notify is never answered (asyncio's own TLS server would answer it).
    ctx, _sni = server_tls
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[str] = []
    release = threading.Event()

    def peer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(GREETING)
            plain = conn.makefile("rb")
            seen.append(plain.readline().decode().strip())
            conn.sendall(b"250-mx.peer.test\r\n250 STARTTLS\r\n")
            seen.append(plain.readline().decode().strip())
            conn.sendall(b"220 2.0.0 go ahead\r\n")
            with ctx.wrap_socket(conn, server_side=True) as tls:
                wrapped = tls.makefile("rb")
                seen.append(wrapped.readline().decode().strip())
                tls.sendall(b"250 mx.peer.test\r\n")
                seen.append(wrapped.readline().decode().strip())
                tls.sendall(b"221 2.0.0 bye\r\n")
                release.wait(20)

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()

    async def scenario() -> float:
        session = await SmtpTransport("client.test", 5.0, 10.0, FAST).open("127.0.0.1", port)
        await session.ehlo("client.test")
        await session.starttls("mx.peer.test", client_context())
        await session.ehlo("client.test")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await session.quit()
        return loop.time() - started

    try:
        elapsed = run(scenario())
    finally:
        release.set()
        thread.join(5)
        listener.close()
    assert elapsed < 5.0  # the command timeout is 10 s: quit() did not wait for the close
    assert seen == ["EHLO client.test", "STARTTLS", "EHLO client.test", "QUIT"]


@pytest.mark.parametrize("split", [False, True], ids=["with-220", "separate-writes"])
def test_bytes_injected_after_the_starttls_220_are_discarded(
    run: Run[Any], server_tls: tuple[ssl.SSLContext, list[str | None]], split: bool
) -> None:
    # CVE-2011-0411 class: plaintext "replies" sent after the 220 must never be taken for
    # the replies to the commands sent over TLS.
    ctx, _sni = server_tls
    injected = [b"250-injected.evil\r\n", b"250 PIPELINING\r\n", b"221 injected bye\r\n"]
    after = injected if split else [b"".join(injected)]
    script = tls_peer(ctx, after, b"250-real.peer.test\r\n250 SIZE 3000\r\n")

    async def scenario() -> tuple[SmtpReply, Capabilities, list[str]]:
        async with Peer(script) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.ehlo("client.test")
            await session.starttls("mx.peer.test", client_context())
            reply = await session.ehlo("client.test")
            caps = session.capabilities()
            await session.quit()
            return reply, caps, (await peer.done()).lines

    reply, caps, lines = run(scenario())
    assert reply == SmtpReply(250, "2.0.0", "real.peer.test SIZE 3000")
    assert caps == Capabilities(esmtp=True, size=3000)
    assert lines == ["EHLO client.test", "STARTTLS", "-- tls --", "EHLO client.test", "QUIT"]


def test_starttls_refused_is_a_host_scoped_tls_failure(run: Run[Any]) -> None:
    replies = {
        "EHLO": b"250-mx\r\n250 STARTTLS\r\n",
        "STARTTLS": b"454 4.7.0 TLS not available\r\n",
    }

    async def scenario() -> BaseException:
        async with Peer(responder(replies)) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.ehlo("client.test")
            with pytest.raises(TlsHandshakeFailed) as caught:
                await session.starttls("mx.peer.test", client_context())
            session.abort()
            return caught.value

    exc = run(scenario())
    assert isinstance(exc, TlsHandshakeFailed)
    assert exc.scope is Scope.HOST
    assert exc.reply == SmtpReply(
        451, "4.7.5", "Cannot start TLS: STARTTLS refused (454 4.7.0 TLS not available)"
    )
    # RFC 3207 §4: "TLS not available", as if STARTTLS were not offered: its own class and
    # reason, which the engine does not count as a dead destination (review 5b).
    assert type(exc) is StartTlsRefused and exc.reason == "starttls_refused"


def test_a_421_to_starttls_is_a_plain_tls_failure(run: Run[Any]) -> None:
    # The server closes the session (RFC 5321 §3.8), as a 421 greeting does: not available.
    replies = {
        "EHLO": b"250-mx\r\n250 STARTTLS\r\n",
        "STARTTLS": b"421 4.3.2 shutting down\r\n",
    }

    async def scenario() -> BaseException:
        async with Peer(responder(replies)) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.ehlo("client.test")
            with pytest.raises(TlsHandshakeFailed) as caught:
                await session.starttls("mx.peer.test", client_context())
            session.abort()
            return caught.value

    exc = run(scenario())
    assert type(exc) is TlsHandshakeFailed and exc.reason == "tls_handshake"
    assert exc.reply.text == "Cannot start TLS: STARTTLS refused (421 4.3.2 shutting down)"


def _refused_chain_peer(ctx: ssl.SSLContext) -> Script:
    """Offers STARTTLS and presents `ctx`'s chain; the client refuses it in the handshake."""

    async def script(conn: Conn) -> None:
        await conn.send(GREETING)
        await conn.line()
        await conn.send(b"250-mx.peer.test\r\n250 STARTTLS\r\n")
        await conn.line()
        conn.writer.write(b"220 2.0.0 go ahead\r\n")
        with contextlib.suppress(ssl.SSLError, OSError):
            await conn.writer.start_tls(ctx)  # the client's alert ends it

    return script


@pytest.mark.parametrize(
    ("expired", "trusted", "error", "text"),
    [
        # Anchored at the configured CA but expired (OpenSSL X509_V_ERR_CERT_HAS_EXPIRED):
        # before review 5b a plain TlsHandshakeFailed, which suspended the destination.
        (True, True, PkixInvalid, "Server certificate not verified (certificate has expired)"),
        (
            False,
            False,
            PkixUntrusted,
            # The peer sends its root too, which is not the configured CA.
            "Server certificate not trusted (self-signed certificate in certificate chain)",
        ),
    ],
    ids=["expired", "untrusted"],
)
def test_a_chain_the_pkix_context_refuses_is_a_certificate_verdict(
    run: Run[Any],
    tmp_path: Path,
    expired: bool,
    trusted: bool,
    error: type[TlsHandshakeFailed],
    text: str,
) -> None:
    ca, other = make_ca("Transport Test CA"), make_ca("Other CA")
    now = dt.datetime.now(dt.UTC)
    ended = {"not_after": now - dt.timedelta(days=1)} if expired else {}
    leaf = ca.issue(["mx.peer.test"], not_before=now - dt.timedelta(days=20), **ended)
    chain, key = leaf.write(tmp_path, "peer")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(chain, key)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes((ca if trusted else other).cert_pem)

    async def scenario() -> BaseException:
        async with Peer(_refused_chain_peer(server)) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.ehlo("client.test")
            with pytest.raises(TlsHandshakeFailed) as caught:
                await session.starttls("mx.peer.test", pkix_context(ca_file))
            session.abort()
            return caught.value

    exc = run(scenario())
    assert type(exc) is error
    assert exc.reason == error.reason != "tls_handshake"
    assert exc.scope is Scope.HOST
    assert exc.reply == SmtpReply(451, "4.7.5", text)


def test_handshake_with_a_peer_that_does_not_speak_tls_fails(run: Run[Any]) -> None:
    async def script(conn: Conn) -> None:
        await conn.send(GREETING)
        await conn.line()
        await conn.send(b"250-mx\r\n250 STARTTLS\r\n")
        await conn.line()
        await conn.send(b"220 go ahead\r\n")
        await conn.reader.read(1)  # the ClientHello arrives
        await conn.send(b"this is not TLS at all\r\n" * 10)

    async def scenario() -> BaseException:
        async with Peer(script) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.ehlo("client.test")
            with pytest.raises(TlsHandshakeFailed) as caught:
                await session.starttls("mx.peer.test", client_context())
            session.abort()
            return caught.value

    exc = run(scenario())
    assert isinstance(exc, TlsHandshakeFailed)
    assert exc.reply.code == 451 and exc.reply.enhanced == "4.7.5"
    assert exc.reply.text.startswith("Cannot start TLS: ")


# -- the mail transaction, PIPELINING ------------------------------------------------------

BODY = b"Subject: pipelined\r\n\r\n" + b".dotted line\r\n" + b"x" * 100 + b"\n" * 2000 + b"end"
SENDER, RCPTS = "alice@sender.test", ["bob@peer.test", "carol@peer.test"]


def pipelining_peer(one_segment: bool) -> Script:
    """Reads MAIL, RCPT, RCPT, DATA before answering any; replies in one write or four."""

    async def script(conn: Conn) -> None:
        await conn.send(GREETING)
        await conn.line()
        await conn.send(EHLO_PIPELINING)
        first = await conn.reader.read(4096)  # the whole batch, sent by the client at once
        conn.lines.append(first.decode())
        replies = [
            b"250 2.1.0 sender ok\r\n",
            b"250 2.1.5 bob ok\r\n",
            b"550 5.1.1 no such user carol\r\n",
            b"354 go ahead\r\n",
        ]
        if one_segment:
            await conn.send(b"".join(replies))
        else:
            for reply in replies:
                await conn.send(reply)
        conn.message = await conn.data()
        await conn.send(b"250 2.0.0 queued as 42\r\n")
        assert await conn.line() == "QUIT"
        await conn.send(b"221 bye\r\n")

    return script


@pytest.mark.parametrize("one_segment", [True, False], ids=["one-segment", "reply-by-reply"])
def test_pipelined_batch_is_written_at_once_and_replies_read_in_order(
    run: Run[Any], one_segment: bool
) -> None:
    async def scenario() -> tuple[Any, Conn]:
        async with Peer(pipelining_peer(one_segment)) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.ehlo("client.test")
            caps = session.capabilities()
            assert caps.pipelining
            envelope = Envelope(SENDER, RCPTS, size=len(BODY))
            outcome = await _drive(session, Transaction(envelope, caps), BODY, FAST)
            await session.quit()
            return outcome, await peer.done()

    outcome, conn = run(scenario())
    assert conn.lines[1] == (
        f"MAIL FROM:<{SENDER}> SIZE={len(BODY)}\r\n"
        f"RCPT TO:<{RCPTS[0]}>\r\nRCPT TO:<{RCPTS[1]}>\r\nDATA\r\n"
    )
    assert conn.lines[2:] == ["QUIT"]
    assert conn.message == message_data(BODY)
    bob, carol = outcome.recipients
    assert (bob.outcome, bob.reply) == (Outcome.DELIVERED, SmtpReply(250, "2.0.0", "queued as 42"))
    assert (carol.outcome, carol.reply) == (
        Outcome.BOUNCED,
        SmtpReply(550, "5.1.1", "no such user carol"),
    )
    assert outcome.ending is Ending.REUSABLE


def test_large_message_goes_in_blocks_and_arrives_whole(run: Run[Any]) -> None:
    body = b"".join(b"line %06d .. ..\r\n.leading dot\r\n" % i for i in range(20000))
    replies = {
        "EHLO": b"250 mx.peer.test\r\n",
        "MAIL": b"250 ok\r\n",
        "RCPT": b"250 ok\r\n",
        "DATA": b"354 go\r\n",
        "QUIT": b"221 bye\r\n",
    }

    async def scenario() -> tuple[Any, Conn]:
        async with Peer(responder(replies)) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.ehlo("client.test")
            envelope = Envelope(SENDER, RCPTS[:1], size=len(body))
            tx = Transaction(envelope, session.capabilities())
            outcome = await _drive(session, tx, body, FAST)
            await session.quit()
            return outcome, await peer.done()

    outcome, conn = run(scenario())
    assert len(body) > 10 * 64 * 1024
    assert conn.message == message_data(body)
    assert conn.lines == ["EHLO client.test", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPTS[0]}>"] + [
        "DATA",
        "QUIT",
    ]
    assert [r.outcome for r in outcome.recipients] == [Outcome.DELIVERED]


def test_peer_closing_mid_transaction_defers_what_was_not_answered(run: Run[Any]) -> None:
    async def script(conn: Conn) -> None:
        await conn.send(GREETING)
        await conn.line()
        await conn.send(EHLO_PIPELINING)
        await conn.reader.read(4096)
        # Two of four replies, then the connection closes (the FIN follows at once).
        conn.writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")

    async def scenario() -> Any:
        async with Peer(script) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.ehlo("client.test")
            tx = Transaction(Envelope(SENDER, RCPTS, size=10), session.capabilities())
            outcome = await _drive(session, tx, b"hello", FAST)
            again = await session.read_reply(1.0)
            session.abort()
            return outcome, again

    outcome, again = run(scenario())
    lost = SmtpReply(451, "4.4.2", "lost connection after RCPT TO")
    assert [(r.outcome, r.reply, r.reason) for r in outcome.recipients] == [
        (Outcome.DEFERRED, lost, "connection_lost"),
        (Outcome.DEFERRED, lost, "connection_lost"),
    ]
    assert outcome.ending is Ending.CLOSE
    assert again == ConnectionLost(timed_out=False)


def test_no_command_after_a_421(run: Run[Any]) -> None:
    replies = {"EHLO": b"250 mx.peer.test\r\n", "MAIL": b"421 4.3.2 going down\r\n"}

    async def scenario() -> tuple[Any, PeerReply | ConnectionLost, list[str]]:
        async with Peer(responder(replies)) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            await session.ehlo("client.test")
            tx = Transaction(Envelope(SENDER, RCPTS, size=10), session.capabilities())
            outcome = await _drive(session, tx, b"hello", FAST)
            await session.write(Command(Phase.RSET, "RSET"), b"")
            after = await session.read_reply(1.0)
            await session.quit()  # RFC 5321 §3.8: closes without QUIT
            return outcome, after, (await peer.done()).lines

    outcome, after, lines = run(scenario())
    assert outcome.ending is Ending.CLOSE
    assert [r.reply for r in outcome.recipients] == [SmtpReply(421, "4.3.2", "going down")] * 2
    assert after == ConnectionLost(timed_out=False)
    assert lines == ["EHLO client.test", f"MAIL FROM:<{SENDER}>"]


# -- hostile replies -----------------------------------------------------------------------


def one_reply_peer(reply: bytes, then_close: bool = False) -> Script:
    """Greets, answers the first command with `reply`, then waits (or closes)."""

    async def script(conn: Conn) -> None:
        await conn.send(GREETING)
        await conn.line()
        conn.writer.write(reply)
        if not then_close:
            await waits_forever(conn)

    return script


async def mail_reply(peer: Peer, timeout: float = 5.0) -> tuple[Any, Any]:
    """MAIL's reply, and what the next read gives."""
    session = await transport().open("127.0.0.1", peer.port)
    await session.write(Command(Phase.MAIL, f"MAIL FROM:<{SENDER}>"), b"")
    first = await session.read_reply(timeout)
    second = await session.read_reply(timeout)
    session.abort()
    return first, second


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"250 " + b"x" * 5000 + b"\r\n", id="overlong-line"),
        pytest.param(b"250 " + b"x" * 100_000, id="line-never-ends"),
        pytest.param(b"250-more\r\n" * 5000, id="reply-never-ends"),
        pytest.param(b"250-sender\r\n550 ok\r\n", id="mixed-codes"),
        pytest.param(b"OK sender fine\r\n", id="no-code"),
        pytest.param(b"25 ok\r\n", id="two-digits"),
        pytest.param(b"250_ok\r\n", id="bad-separator"),
    ],
)
def test_hostile_reply_is_a_lost_connection_not_a_wait(run: Run[Any], reply: bytes) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with Peer(one_reply_peer(reply)) as peer:
            # A generous timeout: the verdict must come from the bounds, not the clock.
            return await mail_reply(peer, timeout=10.0)

    first, second = run(scenario())
    assert first == ConnectionLost(timed_out=False)
    assert second == first


def test_reply_of_exactly_max_lines_is_read(run: Run[Any]) -> None:
    lines = [b"250-line %d\r\n" % i for i in range(MAX_REPLY_LINES - 1)] + [b"250 last\r\n"]

    async def scenario() -> tuple[Any, Any]:
        async with Peer(one_reply_peer(b"".join(lines), then_close=True)) as peer:
            return await mail_reply(peer)

    first, second = run(scenario())
    assert isinstance(first, PeerReply)
    assert first.code == 250
    assert first.message.split("\n") == [f"line {i}" for i in range(99)] + ["last"]
    assert second == ConnectionLost(timed_out=False)


def test_unanswered_command_times_out(run: Run[Any]) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with Peer(one_reply_peer(b"")) as peer:
            return await mail_reply(peer, timeout=0.3)

    first, second = run(scenario())
    assert first == ConnectionLost(timed_out=True)
    assert second == ConnectionLost(timed_out=True)


def test_half_a_reply_then_silence_times_out(run: Run[Any]) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with Peer(one_reply_peer(b"250-first line\r\n250-sec")) as peer:
            return await mail_reply(peer, timeout=0.3)

    first, _second = run(scenario())
    assert first == ConnectionLost(timed_out=True)


def test_control_character_in_a_command_line_is_refused(run: Run[Any]) -> None:
    async def scenario() -> tuple[BaseException, list[str]]:
        async with Peer(responder({"QUIT": b"221 bye\r\n"})) as peer:
            session = await transport().open("127.0.0.1", peer.port)
            with pytest.raises(ValueError) as caught:
                await session.write(Command(Phase.RCPT, "RCPT TO:<a@b>\r\nDATA"), b"")
            await session.quit()
            return caught.value, (await peer.done()).lines

    exc, lines = run(scenario())
    assert str(exc) == "command line with a control character"
    assert lines == ["QUIT"]

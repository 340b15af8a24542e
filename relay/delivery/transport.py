"""asyncio streams adapter: one outbound SMTP session, with exceptions mapped once.

Contract: `SmtpTransport.open()` returns an `OutboundSession` or raises a
`relay.errors.TemporaryFailure` subclass (ConnectFailed, PeerTimeout,
RemoteTempReject, RemotePermReject for a refusing greeting). Session setup methods
(`ehlo`, `starttls`) return peer replies as `SmtpReply` values (4xx/5xx included) and
raise only `TemporaryFailure` subclasses for connection-level trouble. The mail
transaction goes through `write()` and `read_reply()`, which move the bytes of the
commands `relay.delivery.client.Transaction` decides and never raise for what the peer
does: a failed write, a closed connection, a reply that is not SMTP or a timeout becomes
`ConnectionLost`. Nothing above this module sees asyncio, ssl or OSError exceptions.

`starttls()` returns the peer's certificate chain as the server sent it (DER,
leaf first) through `peer_chain()`, the one place that touches the private
`_sslobj` on Python < 3.13 (STYLE.md project decision).

Theory of operation: the session owns one `asyncio.StreamReader`/`StreamWriter` pair
(stdlib loop and uvloop alike; TLS through `StreamWriter.start_tls`). Command lines
given to `write()` are collected and sent as one batch when the next reply is read or
the message content is written, so a PIPELINING batch (RFC 2920 §3.1) leaves in one
write. Replies are read from the stream's buffer in order: nothing the peer sends is
dropped while no reply is awaited, so the replies to a pipelined batch are returned one
per `read_reply()`. The reply reader bounds what a peer can make it hold: `MAX_LINE_LENGTH`
bytes per line, `MAX_REPLY_LINES` lines per reply.

Does not: verify certificates (the caller's SSLContext and `relay.dane` do), decide
which command comes next (`relay.delivery.client`), or reuse connections.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Any

from relay.dane.pkix import chain_untrusted
from relay.delivery.client import (
    TIMEOUTS,
    Capabilities,
    Command,
    ConnectionLost,
    Hello,
    PeerReply,
    Phase,
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
from relay.smtp.address import wire_safe
from relay.smtp.domain import DomainSyntaxError, ascii_domain
from relay.smtp.reply import SmtpReply

__all__ = [
    "MAX_LINE_LENGTH",
    "MAX_REPLY_LINES",
    "OutboundSession",
    "SmtpTransport",
    "message_data",
    "peer_chain",
]

#: Longest reply line accepted, line ending included. RFC 5321 §4.5.3.1.5 allows 512;
#: real servers exceed it, so this is lenient but bounded (also the stream's buffer unit).
MAX_LINE_LENGTH = 4096
#: Most lines in one (multi-line) reply; an EHLO reply has one per extension.
MAX_REPLY_LINES = 100
#: Bytes written per block of message content; each block's write is bounded by
#: the DATA_BLOCK timeout (RFC 5321 §4.5.3.2.5; `delivery.data_block_timeout`).
_DATA_BLOCK = 64 * 1024
# More than the stream ever buffers (about 2 * MAX_LINE_LENGTH plus one socket read).
_DISCARD_CHUNK = 1 << 20


def peer_chain(ssl_object: Any) -> list[bytes]:
    """The certificate chain the peer sent, DER-encoded, leaf first.

    Uses the public `get_unverified_chain()` (Python >= 3.13) when present, else the
    same method on the private `_sslobj` (Python 3.11/3.12), on the stdlib loop and
    on uvloop alike (both hand out an `ssl.SSLObject`).
    """
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = ssl_object._sslobj.get_unverified_chain
    chain = getter() or []
    out: list[bytes] = []
    for cert in chain:
        if isinstance(cert, bytes | bytearray):
            out.append(bytes(cert))
        else:
            out.append(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
    return out


def message_data(body: bytes) -> bytes:
    """The message as written after a 354: CRLF line endings, dot-stuffed, end marker.

    RFC 5321 §4.5.2 (transparency) and §4.1.1.4 (CRLF.CRLF); bare CR and LF become CRLF
    (no bare LF smuggling, RFC 5321 §2.3.8). Only C-level bytes passes: a body whose CR
    and LF all come as CRLF pairs (the usual case) is copied at most once.
    """
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        # A CR followed by LF is one line end (leftmost first, as a scan reads them); any
        # other CR or LF is a line end of its own.
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    # Every LF now ends a CRLF, so a line starts at 0 and after each CRLF.
    data = body.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        return b"." + data + b".\r\n"
    return data + b".\r\n"


class _NotSmtp(Exception):
    """The peer sent something that is not an SMTP reply (RFC 5321 §4.2)."""


class _Closed(Exception):
    """The peer closed the connection before a whole reply arrived."""


def _parse_line(raw: bytes) -> tuple[int, bool, str]:
    """(code, last line?, text) of one reply line, its line ending already removed."""
    # RFC 5321 §4.2: Reply-code [ SP textstring ] CRLF, "-" instead of SP on all but the
    # last line of a multi-line reply; the code is three digits.
    code, separator = raw[:3], raw[3:4]
    if len(code) != 3 or not code.isdigit() or separator not in (b"", b" ", b"-"):
        raise _NotSmtp(f"not an SMTP reply line: {raw[:40]!r}")
    return int(code), separator != b"-", raw[4:].decode("utf-8", "surrogateescape")


async def _read_reply(reader: asyncio.StreamReader) -> PeerReply:
    """One whole reply from `reader`; the lines of a multi-line reply joined with "\\n".

    Raises:
        _NotSmtp: a line too long, too many lines, a malformed line or mixed codes.
        _Closed: end of stream before the last line.
        OSError: the connection failed (ssl.SSLError included).
    """
    code: int | None = None
    texts: list[str] = []
    while True:
        if len(texts) == MAX_REPLY_LINES:
            raise _NotSmtp(f"reply longer than {MAX_REPLY_LINES} lines")
        try:
            # Bare LF is accepted as a line end (lenient reading); CR before it is dropped.
            raw = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            raise _NotSmtp(f"reply line longer than {MAX_LINE_LENGTH} bytes") from exc
        except asyncio.IncompleteReadError as exc:
            raise _Closed("connection closed by the peer") from exc
        line = raw[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
        line_code, last, text = _parse_line(line)
        if code is not None and line_code != code:
            # RFC 5321 §4.2.1: every line of a multi-line reply carries the same code.
            raise _NotSmtp(f"reply code {line_code} inside a {code} reply")
        code = line_code
        texts.append(text)
        if last:
            return PeerReply(code, "\n".join(texts))


def _command_bytes(line: str) -> bytes:
    if not wire_safe(line):
        # RFC 5321 §4.1.1: a command line ends at CRLF; a control character would smuggle.
        raise ValueError("command line with a control character")
    return line.encode("utf-8") + b"\r\n"


def _clip(text: str) -> str:
    return text if len(text) < 120 else text[:117] + "..."


def _short(exc: BaseException) -> str:
    return _clip(str(exc) or type(exc).__name__)


class OutboundSession:
    """One SMTP connection after its 220 greeting."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        greeting: SmtpReply,
        command_timeout: float,
        data_block_timeout: float = TIMEOUTS[Phase.DATA_BLOCK],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._command_timeout = command_timeout
        self._data_block_timeout = data_block_timeout
        self.greeting = greeting
        self.tls = False
        self._capabilities = Capabilities()
        self._extensions: frozenset[str] = frozenset()
        self._outgoing = bytearray()  # command lines written, not yet sent
        self._lost: ConnectionLost | None = None  # no further reply can be read
        self._closing = False  # the peer said 421: no further command (RFC 5321 §3.8)

    def supports(self, extension: str) -> bool:
        """Whether the last EHLO reply announced `extension` (case-insensitive)."""
        return extension.upper() in self._extensions

    async def ehlo(self, name: str) -> SmtpReply:
        """EHLO, falling back to HELO when EHLO is refused (RFC 5321 §4.1.4).

        Raises:
            PeerTimeout: no whole reply within the command timeout.
            ConnectFailed: the connection failed or the peer sent something not SMTP.
            ValueError: `name` holds a control character (a caller bug).
        """
        # RFC 3207 §4.2: nothing learnt before this EHLO counts (after STARTTLS above all).
        self._capabilities = Capabilities()
        self._extensions = frozenset()
        # relay.delivery.client.Hello decides (HELO after a refused EHLO); this moves bytes.
        hello = Hello(name)
        command = hello.start()
        while True:
            assert command.line is not None
            reply = await self._setup_command(command.line, "after EHLO")
            step = hello.receive(reply)
            if not isinstance(step, Command):
                break
            command = step
        if isinstance(step, Capabilities):
            self._capabilities = step
            if step.esmtp:
                self._extensions = frozenset(
                    line.split(" ", 1)[0].strip().upper() for line in reply.message.split("\n")[1:]
                )
        return reply.parsed()

    def capabilities(self) -> Capabilities:
        """What the last EHLO announced; all False after HELO (relay.delivery.client)."""
        return self._capabilities

    async def starttls(self, server_hostname: str | None, context: ssl.SSLContext) -> list[bytes]:
        """Upgrade to TLS; returns the peer chain (DER, leaf first).

        Raises:
            TlsHandshakeFailed: `server_hostname` is not a host name (checked before
                STARTTLS is sent), the peer answered 421, the connection failed or the
                handshake failed. Its subclasses say more: `StartTlsRefused`, any other
                reply but 220 (454 "TLS not available"); with a CERT_REQUIRED context,
                `PkixUntrusted` (no path to a trusted CA) and `PkixInvalid` (any other
                certificate verification failure: expired, bad signature, ...).
            PeerTimeout: no reply to STARTTLS, or no handshake, within the command timeout.
        """
        try:
            # RFC 7672 §8.1, RFC 6066 §3: SNI is the TLSA base domain, an ASCII host name
            # (A-labels: ssl would encode a U-label with IDNA 2003). "_" is let through: a
            # CNAME target can be the base domain (RFC 7672 §2.2.3) and harms nothing here.
            # None: no SNI (an address-literal next hop, RFC 6066 §3).
            sni = (
                None if server_hostname is None else ascii_domain(server_hostname, underscore=True)
            )
        except DomainSyntaxError as exc:
            raise TlsHandshakeFailed(
                f"Cannot start TLS: SNI {exc}: not a host name", scope=Scope.HOST
            ) from exc
        try:
            reply = await self._setup_command("STARTTLS", "during STARTTLS")
        except ConnectFailed as exc:
            raise TlsHandshakeFailed(
                f"Cannot start TLS: {exc.reply.text}", scope=Scope.HOST
            ) from exc
        if reply.code != 220:
            said = _clip(" ".join(f"{reply.code} {reply.message}".split()))
            # RFC 3207 §4: 454 "TLS not available": the server is up but has no TLS for us,
            # as if it had not offered STARTTLS. A 421 closes the session: the server is
            # not available, as after a 421 greeting (RFC 5321 §3.8).
            refused = TlsHandshakeFailed if reply.code == 421 else StartTlsRefused
            raise refused(f"Cannot start TLS: STARTTLS refused ({said})", scope=Scope.HOST)
        self._capabilities = Capabilities()  # RFC 3207 §4.2: forget the pre-TLS EHLO
        self._extensions = frozenset()
        try:
            async with asyncio.timeout(self._command_timeout):
                await self._writer.start_tls(
                    context, server_hostname=sni, ssl_handshake_timeout=self._command_timeout
                )
                # RFC 3207 §5 (STARTTLS command injection, CVE-2011-0411): whatever the peer
                # sent after its 220 came before the handshake and is discarded unread.
                await self._discard_buffered()
        except TimeoutError as exc:
            self._lost = ConnectionLost(timed_out=True)
            raise PeerTimeout("timeout during STARTTLS") from exc
        except ssl.SSLCertVerificationError as exc:
            # Only a CERT_REQUIRED context (levels verify/secure) verifies during the
            # handshake; a chain without a trusted CA gets its own reason (relay.dane.pkix).
            # Before ValueError: SSLCertVerificationError is one too.
            self._lost = ConnectionLost()
            why = _clip(exc.verify_message or _short(exc))
            if chain_untrusted(exc.verify_code):
                raise PkixUntrusted(
                    f"Server certificate not trusted ({why})", scope=Scope.HOST
                ) from exc
            # RFC 5280 §6.1: a path that reaches a trust anchor but fails validation
            # (expired, bad signature, wrong purpose) is a verdict on the certificate too.
            raise PkixInvalid(f"Server certificate not verified ({why})", scope=Scope.HOST) from exc
        except ValueError as exc:
            # UnicodeError included: preparing the handshake (ssl's encoding of the name)
            # failed. A host-scoped TLS failure, never an internal error (defence in depth).
            self._lost = ConnectionLost()
            why = _short(exc).encode("ascii", "backslashreplace").decode("ascii")
            raise TlsHandshakeFailed(
                f"Cannot start TLS: cannot prepare the handshake ({why})", scope=Scope.HOST
            ) from exc
        except ssl.SSLError as exc:
            self._lost = ConnectionLost()
            raise TlsHandshakeFailed(
                f"Cannot start TLS: handshake failure ({_short(exc)})", scope=Scope.HOST
            ) from exc
        except OSError as exc:
            self._lost = ConnectionLost()
            raise TlsHandshakeFailed(
                "Cannot start TLS: lost connection during STARTTLS", scope=Scope.HOST
            ) from exc
        self.tls = True
        ssl_object = self._writer.get_extra_info("ssl_object")
        return peer_chain(ssl_object) if ssl_object is not None else []

    async def _discard_buffered(self) -> None:
        """Drop what the stream holds without waiting for more (asyncio.timeout(0) fires
        only if the read has to wait; a buffered read returns first)."""
        try:
            async with asyncio.timeout(0):
                await self._reader.read(_DISCARD_CHUNK)
        except TimeoutError:
            pass  # nothing was buffered

    def tls_info(self) -> tuple[str, str]:
        """(protocol version, cipher name) of the TLS session, or ("", "")."""
        cipher = self._writer.get_extra_info("cipher")
        if not cipher:
            return "", ""
        return str(cipher[1]), str(cipher[0])

    async def write(self, command: Command, message: bytes) -> None:
        """Write one command line, or (`command.line` None) the message as `message_data`.

        Command lines are queued and sent together before the next reply is read (a
        PIPELINING batch goes in one write, RFC 2920 §3.1). The message content is
        written in `_DATA_BLOCK` blocks, each bounded by the DATA_BLOCK timeout. Never
        raises for connection trouble: a failed or timed-out write is remembered and the
        next `read_reply()` returns it as `ConnectionLost`.

        Raises:
            ValueError: a command line with a control character (a caller bug: the
                client never builds one, `relay.smtp.address.wire_safe`).
        """
        if command.line is not None:
            line = _command_bytes(command.line)
            if self._lost is None and not self._closing:
                self._outgoing += line
            return
        if self._lost is not None or self._closing:
            return
        data = message_data(message)
        try:
            self._flush()
            for start in range(0, len(data), _DATA_BLOCK):
                self._writer.write(data[start : start + _DATA_BLOCK])
                async with asyncio.timeout(self._data_block_timeout):
                    await self._writer.drain()
        except TimeoutError:
            self._lost = ConnectionLost(timed_out=True)
        except OSError:
            self._lost = ConnectionLost()

    def _flush(self) -> bool:
        """Send the queued command lines; False if there were none."""
        if not self._outgoing:
            return False
        self._writer.write(bytes(self._outgoing))
        self._outgoing.clear()
        return True

    async def read_reply(self, timeout: float) -> PeerReply | ConnectionLost:
        """The peer's reply to the oldest command written, or why there is none.

        Sends the queued command lines first. `timeout` is the command's reply timeout
        (`relay.delivery.client.Command.timeout`); it bounds sending and the whole reply.
        """
        if self._lost is not None:
            return self._lost
        if self._closing:
            self._lost = ConnectionLost()
            return self._lost
        try:
            async with asyncio.timeout(timeout):
                if self._flush():
                    # Only after a write: replies the peer sent before it closed are still
                    # read, in order, from the buffer.
                    await self._writer.drain()
                reply = await _read_reply(self._reader)
        except TimeoutError:
            self._lost = ConnectionLost(timed_out=True)
            return self._lost
        except (_NotSmtp, _Closed, OSError):
            self._lost = ConnectionLost()
            return self._lost
        if reply.code == 421:
            self._closing = True
        return reply

    async def _setup_command(self, line: str, where: str) -> PeerReply:
        """Send one setup command and read its reply within the command timeout.

        Raises:
            PeerTimeout, ConnectFailed: as `ehlo`; ConnectFailed also after a 421 or a
                lost connection (no command is sent then, RFC 5321 §3.8).
            ValueError: a control character in `line`.
        """
        data = _command_bytes(line)
        if self._lost is not None or self._closing:
            raise ConnectFailed(f"lost connection {where}")
        try:
            async with asyncio.timeout(self._command_timeout):
                self._writer.write(data)
                await self._writer.drain()
                reply = await _read_reply(self._reader)
        except TimeoutError as exc:
            self._lost = ConnectionLost(timed_out=True)
            raise PeerTimeout(f"timeout {where}") from exc
        except _NotSmtp as exc:
            self._lost = ConnectionLost()
            raise ConnectFailed(f"SMTP protocol error {where}: {exc}") from exc
        except (_Closed, OSError) as exc:
            self._lost = ConnectionLost()
            raise ConnectFailed(f"lost connection {where}") from exc
        if reply.code == 421:
            self._closing = True
        return reply

    async def quit(self) -> None:
        """Say QUIT politely (not after a 421 or a lost connection) and close; errors are
        irrelevant at this point."""
        if self._lost is None and not self._closing:
            try:
                await self._setup_command("QUIT", "after QUIT")
            except (ConnectFailed, PeerTimeout):
                pass
        # Not waiting for the close: a TLS peer may never answer our close_notify, and
        # after QUIT's reply nothing it could send matters (the loop finishes the close).
        self._writer.close()

    def abort(self) -> None:
        """Close the connection now, without another command."""
        self._lost = self._lost or ConnectionLost()
        self._writer.transport.abort()


class SmtpTransport:
    """Opens outbound SMTP sessions (satisfies relay.delivery.engine.Transport)."""

    def __init__(
        self,
        local_hostname: str,
        connect_timeout: float,
        command_timeout: float,
        timeouts: Mapping[Phase, float] = TIMEOUTS,
    ) -> None:
        """`command_timeout` bounds the session setup commands (greeting, EHLO, STARTTLS,
        QUIT); `timeouts[Phase.DATA_BLOCK]` each block of message content written. The
        MAIL/RCPT/DATA reply timeouts come with each `read_reply()` call."""
        self.local_hostname = local_hostname
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.timeouts = timeouts

    async def open(self, address: str, port: int) -> OutboundSession:
        """Connect and read the greeting.

        Raises:
            ConnectFailed: refused, unreachable, closed or not SMTP before the greeting.
            PeerTimeout: no connection within the connect timeout, or no greeting within
                the command timeout.
            RemoteTempReject, RemotePermReject: a greeting other than 220 (scope HOST).
        """
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(address, port, limit=MAX_LINE_LENGTH)
        except TimeoutError as exc:
            raise PeerTimeout("timeout while connecting") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {_short(exc)}") from exc
        try:
            async with asyncio.timeout(self.command_timeout):
                greeting = await _read_reply(reader)
        except TimeoutError as exc:
            writer.transport.abort()
            raise PeerTimeout("timeout waiting for the greeting") from exc
        except _NotSmtp as exc:
            writer.transport.abort()
            raise ConnectFailed(f"SMTP protocol error in the greeting: {exc}") from exc
        except (_Closed, OSError) as exc:
            writer.transport.abort()
            raise ConnectFailed("lost connection before the greeting") from exc
        reply = greeting.parsed()
        if greeting.code != 220:
            # RFC 5321 §3.1: 554 means "no service here", 421 "not now": try the next host;
            # RFC 5321 §3.8: no command (not even QUIT) after a 421.
            writer.transport.abort()
            cls = RemotePermReject if reply.is_permanent else RemoteTempReject
            raise cls(reply=reply, scope=Scope.HOST)
        return OutboundSession(
            reader, writer, reply, self.command_timeout, self.timeouts[Phase.DATA_BLOCK]
        )

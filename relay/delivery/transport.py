"""aiosmtplib adapter: one outbound SMTP session, with exceptions mapped once.

Contract: `SmtpTransport.open()` returns an `OutboundSession` or raises a
`relay.errors.TemporaryFailure` subclass (ConnectFailed, PeerTimeout,
RemoteTempReject, RemotePermReject for a refusing greeting). Session setup methods
(`ehlo`, `starttls`) return peer replies as `SmtpReply` values (4xx/5xx included) and
raise only `TemporaryFailure` subclasses for connection-level trouble. The mail
transaction goes through `write()` and `read_reply()`, which move the bytes of the
commands `relay.delivery.client.Transaction` decides and never raise for what the peer
does: a failed write, a closed connection or a timeout becomes `ConnectionLost`. Nothing
above this module sees aiosmtplib, ssl or OSError exceptions.

`starttls()` returns the peer's certificate chain as the server sent it (DER,
leaf first) through `peer_chain()`, the one place that touches the private
`_sslobj` on Python < 3.13 (STYLE.md project decision).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiosmtplib
from aiosmtplib.errors import SMTPConnectResponseError

from relay.delivery.client import (
    TIMEOUTS,
    Capabilities,
    Command,
    ConnectionLost,
    PeerReply,
    Phase,
    parse_ehlo,
)
from relay.errors import (
    ConnectFailed,
    PeerTimeout,
    RemotePermReject,
    RemoteTempReject,
    Scope,
    TemporaryFailure,
    TlsHandshakeFailed,
)
from relay.smtp.address import wire_safe
from relay.smtp.domain import DomainSyntaxError, ascii_domain
from relay.smtp.reply import SmtpReply

__all__ = ["OutboundSession", "SmtpTransport", "peer_chain"]


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


_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_LEADING_DOT = re.compile(rb"(?m)^\.")
#: Bytes written per block of message content; each block's write is bounded by
#: the DATA_BLOCK timeout (RFC 5321 §4.5.3.2.5; `delivery.data_block_timeout`).
_DATA_BLOCK = 64 * 1024


def message_data(body: bytes) -> bytes:
    """The message as written after a 354: CRLF line endings, dot-stuffed, end marker.

    RFC 5321 §4.5.2 (transparency) and §4.1.1.4 (CRLF.CRLF); bare CR and LF become CRLF
    (as aiosmtplib's own DATA does: no bare LF smuggling, RFC 5321 §2.3.8).
    """
    data = _LINE_ENDINGS.sub(b"\r\n", body)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _LEADING_DOT.sub(b"..", data) + b".\r\n"


def _reply(response: Any) -> SmtpReply:
    return SmtpReply.from_peer(int(response.code), str(response.message))


@contextmanager
def _smtp_errors(where: str) -> Iterator[None]:
    try:
        yield
    except (TemporaryFailure, SMTPConnectResponseError):
        raise
    except aiosmtplib.SMTPTimeoutError as exc:
        raise PeerTimeout(f"timeout {where}") from exc
    except aiosmtplib.SMTPServerDisconnected as exc:
        raise ConnectFailed(f"lost connection {where}") from exc
    except aiosmtplib.SMTPConnectTimeoutError as exc:
        raise PeerTimeout(f"timeout {where}") from exc
    except aiosmtplib.SMTPConnectError as exc:
        raise ConnectFailed(f"cannot connect: {exc}") from exc
    except TimeoutError as exc:
        raise PeerTimeout(f"timeout {where}") from exc
    except aiosmtplib.SMTPException as exc:
        raise ConnectFailed(f"SMTP protocol error {where}: {exc}") from exc
    except OSError as exc:
        raise ConnectFailed(f"connection error {where}: {exc.strerror or exc}") from exc


class OutboundSession:
    def __init__(
        self,
        smtp: aiosmtplib.SMTP,
        greeting: SmtpReply,
        data_block_timeout: float = TIMEOUTS[Phase.DATA_BLOCK],
    ) -> None:
        self._smtp = smtp
        self._data_block_timeout = data_block_timeout
        self.greeting = greeting
        self.tls = False
        self._capabilities = Capabilities()
        self._lost: ConnectionLost | None = None  # a write failed: the next read says so

    def supports(self, extension: str) -> bool:
        return self._smtp.supports_extension(extension)

    async def ehlo(self, name: str) -> SmtpReply:
        """EHLO, falling back to HELO when EHLO is refused (RFC 5321 §4.1.4)."""
        with _smtp_errors("after EHLO"):
            response = await self._smtp.execute_command(b"EHLO", name.encode("ascii"))
            self._capabilities = Capabilities()  # RFC 3207 §4.2: nothing from before TLS
            if response.code == 250:
                # Let aiosmtplib parse the extensions it uses for supports_extension().
                self._smtp.last_ehlo_response = response
                self._capabilities = parse_ehlo(str(response.message))
                return _reply(response)
            if response.code >= 500:
                response = await self._smtp.execute_command(b"HELO", name.encode("ascii"))
                if response.code == 250:
                    self._smtp.last_helo_response = response
            return _reply(response)

    def capabilities(self) -> Capabilities:
        """What the last EHLO announced; all False after HELO (relay.delivery.client)."""
        return self._capabilities

    async def starttls(self, server_hostname: str, context: ssl.SSLContext) -> list[bytes]:
        """Upgrade to TLS; returns the peer chain (DER, leaf first).

        Raises:
            TlsHandshakeFailed: `server_hostname` is not a host name (checked before
                STARTTLS is sent), the peer refused STARTTLS or the handshake failed.
            PeerTimeout, ConnectFailed: as for any command.
        """
        try:
            # RFC 7672 §8.1, RFC 6066 §3: SNI is the TLSA base domain, an ASCII host name
            # (A-labels: ssl would encode a U-label with IDNA 2003). "_" is let through: a
            # CNAME target can be the base domain (RFC 7672 §2.2.3) and harms nothing here.
            sni = ascii_domain(server_hostname, underscore=True)
        except DomainSyntaxError as exc:
            raise TlsHandshakeFailed(
                f"Cannot start TLS: SNI {exc}: not a host name", scope=Scope.HOST
            ) from exc
        try:
            with _smtp_errors("during STARTTLS"):
                await self._smtp.starttls(server_hostname=sni, tls_context=context)
        except ValueError as exc:
            # UnicodeError included: preparing the handshake (ssl's encoding of the name)
            # failed. A host-scoped TLS failure, never an internal error (defence in depth).
            why = _short(exc).encode("ascii", "backslashreplace").decode("ascii")
            raise TlsHandshakeFailed(
                f"Cannot start TLS: cannot prepare the handshake ({why})", scope=Scope.HOST
            ) from exc
        except (ssl.SSLError, aiosmtplib.SMTPResponseException) as exc:
            raise TlsHandshakeFailed(
                f"Cannot start TLS: handshake failure ({_short(exc)})", scope=Scope.HOST
            ) from exc
        except ConnectFailed as exc:
            raise TlsHandshakeFailed(
                f"Cannot start TLS: {exc.reply.text}", scope=Scope.HOST
            ) from exc
        self.tls = True
        ssl_object = self._smtp.get_transport_info("ssl_object")
        return peer_chain(ssl_object) if ssl_object is not None else []

    def tls_info(self) -> tuple[str, str]:
        """(protocol version, cipher name) of the TLS session, or ("", "")."""
        try:
            cipher = self._smtp.get_transport_info("cipher")
        except aiosmtplib.SMTPException:
            return "", ""
        if not cipher:
            return "", ""
        return str(cipher[1]), str(cipher[0])

    async def write(self, command: Command, message: bytes) -> None:
        """Write one command line, or (`command.line` None) the message as `message_data`.

        Never raises for connection trouble: a failed or timed-out write is remembered and
        the next `read_reply()` returns it as `ConnectionLost`. Only one command is written
        before its reply is read: aiosmtplib's reader drops bytes that arrive while no
        reply is awaited, so it cannot carry PIPELINING (the engine turns it off).

        Raises:
            ValueError: a command line with a control character (a caller bug: the
                client never builds one, `relay.smtp.address.wire_safe`).
        """
        if self._lost is not None:
            return
        protocol = self._smtp.protocol
        if command.line is not None and not wire_safe(command.line):
            raise ValueError("command line with a control character")
        data = command.wire() if command.line is not None else message_data(message)
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("not connected")
            blocks = range(0, len(data), _DATA_BLOCK)
            for start in blocks:
                protocol.write(data[start : start + _DATA_BLOCK])
                if start == blocks[-1]:
                    # Nothing may yield to the loop between the last write and read_reply():
                    # aiosmtplib drops a reply that arrives before it is awaited. The last
                    # block is bounded by the reply's timeout instead.
                    break
                # FlowControlMixin's drain (asyncio.StreamWriter.drain's helper); it yields
                # only while the transport's buffer is full (asyncio.timeout adds no task).
                async with asyncio.timeout(self._data_block_timeout):
                    await protocol._drain_helper()
        except TimeoutError:
            self._lost = ConnectionLost(timed_out=True)
        except (aiosmtplib.SMTPException, OSError):
            self._lost = ConnectionLost()

    async def read_reply(self, timeout: float) -> PeerReply | ConnectionLost:
        """The peer's reply to the oldest command written, or why there is none.

        `timeout` is the command's reply timeout (`relay.delivery.client.Command.timeout`).
        """
        if self._lost is not None:
            return self._lost
        protocol = self._smtp.protocol
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("not connected")
            # read_response() marks a reply as awaited before it yields to the loop, so the
            # reply to the line just written is not taken for unsolicited data.
            response = await protocol.read_response(timeout=timeout)
        except (aiosmtplib.SMTPTimeoutError, TimeoutError):
            self._lost = ConnectionLost(timed_out=True)
            return self._lost
        except (aiosmtplib.SMTPException, OSError):
            # Disconnected, or a reply that is not SMTP (too long, malformed).
            self._lost = ConnectionLost()
            return self._lost
        return PeerReply(int(response.code), str(response.message))

    async def quit(self) -> None:
        """Say QUIT politely; errors are irrelevant at this point."""
        try:
            await self._smtp.execute_command(b"QUIT")
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        self._smtp.close()

    def abort(self) -> None:
        self._smtp.close()


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 120 else text[:117] + "..."


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
        smtp = aiosmtplib.SMTP(
            hostname=address,
            port=port,
            local_hostname=self.local_hostname,
            timeout=self.command_timeout,
            use_tls=False,
            start_tls=False,
            validate_certs=False,
        )
        try:
            with _smtp_errors("while connecting"):
                response = await smtp.connect(timeout=self.connect_timeout)
        except SMTPConnectResponseError as exc:
            reply = SmtpReply.from_peer(exc.code, exc.message)
            # RFC 5321 §3.1: a 554 greeting means "no service here": try the next host.
            cls = RemotePermReject if reply.is_permanent else RemoteTempReject
            raise cls(reply=reply, scope=Scope.HOST) from exc
        return OutboundSession(smtp, _reply(response), self.timeouts[Phase.DATA_BLOCK])

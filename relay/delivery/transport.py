"""aiosmtplib adapter: one outbound SMTP session, with exceptions mapped once.

Contract: `SmtpTransport.open()` returns an `OutboundSession` or raises a
`relay.errors.TemporaryFailure` subclass (ConnectFailed, PeerTimeout,
RemoteTempReject, RemotePermReject for a refusing greeting). Session methods
return peer replies as `SmtpReply` values (4xx/5xx included) and raise only
`TemporaryFailure` subclasses for connection-level trouble. Nothing above this
module sees aiosmtplib, ssl or OSError exceptions.

`starttls()` returns the peer's certificate chain as the server sent it (DER,
leaf first) through `peer_chain()`, the one place that touches the private
`_sslobj` on Python < 3.13 (STYLE.md project decision).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiosmtplib
from aiosmtplib.errors import SMTPConnectResponseError

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
    def __init__(self, smtp: aiosmtplib.SMTP, greeting: SmtpReply) -> None:
        self._smtp = smtp
        self.greeting = greeting
        self.tls = False

    def supports(self, extension: str) -> bool:
        return self._smtp.supports_extension(extension)

    async def ehlo(self, name: str) -> SmtpReply:
        """EHLO, falling back to HELO when EHLO is refused (RFC 5321 §4.1.4)."""
        with _smtp_errors("after EHLO"):
            response = await self._smtp.execute_command(b"EHLO", name.encode("ascii"))
            if response.code == 250:
                # Let aiosmtplib parse the extensions it uses for supports_extension().
                self._smtp.last_ehlo_response = response
                return _reply(response)
            if response.code >= 500:
                response = await self._smtp.execute_command(b"HELO", name.encode("ascii"))
                if response.code == 250:
                    self._smtp.last_helo_response = response
            return _reply(response)

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

    async def command(self, verb: bytes, arg: str) -> SmtpReply:
        """Send one command; an argument that cannot go on the wire (not UTF-8, control
        characters) is answered locally with 553 5.1.3 and never sent."""
        if not wire_safe(arg):
            return SmtpReply(553, "5.1.3", "address contains characters that cannot be sent")
        with _smtp_errors(f"after {verb.decode()}"):
            return _reply(await self._smtp.execute_command(verb, arg.encode("utf-8")))

    async def mail(self, sender: str, options: list[str]) -> SmtpReply:
        return await self.command(b"MAIL", f"FROM:<{sender}>" + "".join(f" {o}" for o in options))

    async def rcpt(self, recipient: str) -> SmtpReply:
        return await self.command(b"RCPT", f"TO:<{recipient}>")

    async def data(self, body: bytes) -> SmtpReply:
        with _smtp_errors("after DATA"):
            try:
                return _reply(await self._smtp.data(body))
            except aiosmtplib.SMTPDataError as exc:
                return SmtpReply.from_peer(exc.code, exc.message)
            except aiosmtplib.SMTPResponseException as exc:
                return SmtpReply.from_peer(exc.code, exc.message)

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

    def __init__(self, local_hostname: str, connect_timeout: float, command_timeout: float) -> None:
        self.local_hostname = local_hostname
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout

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
        return OutboundSession(smtp, _reply(response))

"""One connection's session setup before MAIL: EHLO, STARTTLS, DANE (RFC 7672 §2.2, §3).

Owns `negotiate(transport, session, route, address, port, requirement, helo_name,
context, clock)` -> `Negotiation`, the one implementation of these steps for the
delivery engine (which goes on to MAIL) and `dane-relay probe` (which QUITs):

    EHLO refused, connection trouble                   failure: that reply / error
    requirement none                                   plaintext: "none"
    STARTTLS not offered, DANE applies                 QUIT; DaneRequiredNoTls 4.7.4 (§2.2)
    STARTTLS not offered, encrypt/verify/secure        QUIT; TlsRequiredNotOffered 4.7.4
    STARTTLS not offered, may                          plaintext: "none"
    STARTTLS: SNI = TLSA base domain (RFC 7672 §8.1); none for an address literal
    handshake fails, may                               reconnect, EHLO, plaintext: "none"
    handshake fails, DANE or encrypt                   TlsHandshakeFailed 4.7.5
    DANE applies, verdict not verified                 QUIT; DaneVerificationFailed 4.7.5
    DANE applies, verified                             "verified" / "trusted"
    verify/secure: no path to a trusted CA             PkixUntrusted 4.7.5 (pkix_untrusted)
    verify/secure: chain refused otherwise (expired)   PkixInvalid 4.7.5 (pkix_invalid)
    verify/secure: leaf does not name the destination  QUIT; PkixNameMismatch 4.7.5
    verify/secure: chain trusted, name matches         "verified"
    no DANE (may, encrypt, only unusable TLSA)         "encrypted"
    after TLS                                          EHLO again (RFC 3207 §4.2)

Guarantees: returns a value for everything a peer does; a `relay.errors.DeliveryError`
(the transport maps library errors to those) becomes `Negotiation.failure`, ready to raise,
and the session is then closed (aborted; QUIT first where the table says so). On success
`Negotiation.session` has answered EHLO (over TLS when `tls` is not "none") and MAIL may
follow. Any other exception (cancellation) aborts the session and propagates.

Does not: open the first connection (the caller does, and owns its greeting), send MAIL,
log, count metrics, or verify chains when DANE does not apply.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from relay.dane import DaneStatus, DaneVerdict, verify
from relay.dane.pkix import pkix_names_match
from relay.dane.policy import TlsRequirement
from relay.delivery.route import HostRoute
from relay.errors import (
    DaneRequiredNoTls,
    DaneVerificationFailed,
    DeliveryError,
    PkixNameMismatch,
    RemotePermReject,
    RemoteTempReject,
    Scope,
    TlsHandshakeFailed,
    TlsRequiredNotOffered,
)
from relay.smtp.reply import SmtpReply

__all__ = ["Negotiation", "SessionOpener", "TlsSession", "negotiate"]


class TlsSession(Protocol):
    """The part of an outbound session that session setup uses (no MAIL, RCPT, DATA)."""

    def supports(self, extension: str) -> bool: ...
    async def ehlo(self, name: str) -> SmtpReply: ...
    async def starttls(
        self, server_hostname: str | None, context: ssl.SSLContext
    ) -> list[bytes]: ...
    def tls_info(self) -> tuple[str, str]: ...
    async def quit(self) -> None: ...
    def abort(self) -> None: ...


S = TypeVar("S", bound=TlsSession)
S_co = TypeVar("S_co", bound=TlsSession, covariant=True)


class SessionOpener(Protocol[S_co]):
    """Opens the plaintext connection again after a failed opportunistic handshake."""

    async def open(self, address: str, port: int) -> S_co: ...


@dataclass(frozen=True, slots=True)
class Negotiation(Generic[S]):
    """What session setup on one connection did."""

    session: S | None = None  # ready for MAIL; None when `failure` is set
    starttls_offered: bool | None = None  # None: EHLO was not answered
    # The SNI sent with STARTTLS; "": none (an address literal); None: STARTTLS not attempted.
    sni: str | None = None
    handshake_error: str = ""  # why the handshake failed
    fallback: bool = False  # level may: reconnected in plaintext after the failed handshake
    tls_version: str = ""
    cipher: str = ""
    chain: tuple[bytes, ...] | None = None  # the peer's chain (DER, leaf first); None: no TLS
    verdict: DaneVerdict | None = None  # set when DANE applied to a completed handshake
    tls: str = "none"  # verified / trusted / encrypted (set once TLS is up and DANE passed)
    dane: str = "none"  # pass / fail / none (DANE did not apply, or never got that far)
    dane_reason: str = ""  # no-starttls / handshake / the verdict's reason; "" for dane none
    failure: DeliveryError | None = None  # set when this connection will not take mail


async def negotiate(
    transport: SessionOpener[S],
    session: S,
    route: HostRoute,
    address: str,
    port: int,
    requirement: TlsRequirement,
    helo_name: str,
    context: ssl.SSLContext,
    clock: Callable[[], datetime],
    pkix_context: ssl.SSLContext | None = None,
) -> Negotiation[S]:
    """EHLO, then STARTTLS and DANE as `requirement` says, on the just opened `session`.

    `transport`, `address` and `port` reopen the connection when an opportunistic
    handshake fails. `clock` gives the time for DANE-TA date checks; it is called only
    when a chain is verified. `pkix_context` (relay.delivery.tls.pkix_context) replaces
    `context` for the requirements VERIFY and SECURE; without it they fail closed.

    Raises:
        Nothing for what the peer does (see `Negotiation.failure`); a non-`DeliveryError`
        exception (cancellation) after aborting the session.
    """
    out: Negotiation[S] = Negotiation()
    current = session
    try:
        await _ehlo(current, helo_name)
        offered = current.supports("starttls")
        out = replace(out, starttls_offered=offered)
        if requirement is TlsRequirement.NONE:
            return replace(out, session=current)  # level none: STARTTLS not attempted
        if not offered:
            if requirement is TlsRequirement.DANE:
                # RFC 7672 §2.2: DANE applies, STARTTLS not offered: defer, never plaintext.
                out = replace(out, dane="fail", dane_reason="no-starttls")
                await current.quit()
                raise DaneRequiredNoTls(scope=Scope.HOST)
            if requirement is not TlsRequirement.MAY:
                # RFC 7672 §3.1.3 (unusable TLSA), level encrypt, or Postfix verify/secure:
                # TLS mandatory: defer.
                await current.quit()
                raise TlsRequiredNotOffered(scope=Scope.HOST)
            return replace(out, session=current)  # RFC 7435 §3: level may, plaintext
        pkix = requirement in (TlsRequirement.VERIFY, TlsRequirement.SECURE)
        # RFC 7672 §8.1: SNI carries the TLSA base domain; for verify/secure (no TLSA) the
        # name to check: MX host (Postfix verify) or next-hop domain (Postfix secure).
        sni = _pkix_sni(route, requirement) if pkix else route.tlsa_base
        if route.literal:
            sni = ""  # RFC 6066 §3: literal IPv4 and IPv6 addresses are not sent as SNI
        out = replace(out, sni=sni)
        try:
            if pkix and pkix_context is None:
                raise TlsHandshakeFailed("Cannot start TLS: no PKIX trust store", scope=Scope.HOST)
            chain = await current.starttls(
                sni or None, pkix_context if pkix_context and pkix else context
            )
        except TlsHandshakeFailed as exc:
            out = replace(out, handshake_error=exc.reply.text)
            if requirement is not TlsRequirement.MAY:
                # RFC 7672 §2.2: mandatory TLS that fails defers, never falls back to plaintext.
                if requirement is TlsRequirement.DANE:
                    out = replace(out, dane="fail", dane_reason="handshake")
                raise
            # RFC 7435 §3: opportunistic TLS retries the address in plaintext, as Postfix does.
            current.abort()
            out = replace(out, fallback=True)
            current = await transport.open(address, port)
            await _ehlo(current, helo_name)
            return replace(out, session=current)
        version, cipher = current.tls_info()
        out = replace(out, tls_version=version, cipher=cipher, chain=tuple(chain))
        tls = "encrypted"
        if requirement is TlsRequirement.DANE:
            # RFC 7672 §3.2.2: reference identifiers are the TLSA base domain, the MX host
            # name and, when the MX RRset is secure, the next-hop domain.
            verdict = verify(route.usable, chain, route.reference_names, clock())
            verified = verdict.status is DaneStatus.VERIFIED
            dane = "pass" if verified else "fail"
            out = replace(out, verdict=verdict, dane=dane, dane_reason=verdict.reason)
            if not verified:
                # RFC 7672 §3: no usable record matched: defer; QUIT before MAIL FROM.
                await current.quit()
                raise DaneVerificationFailed(
                    f"Server certificate not verified ({verdict.reason})", scope=Scope.HOST
                )
            tls = route.dane_label  # RFC 7672 §2.2.1: "trusted" via an insecure MX RRset
        elif pkix:
            # Postfix smtp_tls_verify_cert_match = hostname; smtp_tls_secure_cert_match =
            # nexthop, dot-nexthop. The chain was validated by OpenSSL in the handshake.
            below = route.next_hop if requirement is TlsRequirement.SECURE else None
            if not chain or not pkix_names_match(chain[0], (sni,), below):
                await current.quit()
                raise PkixNameMismatch(
                    f"Server certificate not verified (name mismatch: {sni})", scope=Scope.HOST
                )
            tls = "verified"
        out = replace(out, tls=tls)
        # RFC 3207 §4.2: forget everything learnt before TLS; EHLO again.
        await _ehlo(current, helo_name)
        return replace(out, session=current)
    except DeliveryError as exc:
        current.abort()
        return replace(out, failure=exc)
    except BaseException:
        current.abort()
        raise


def _pkix_sni(route: HostRoute, requirement: TlsRequirement) -> str:
    if requirement is TlsRequirement.SECURE:
        return route.next_hop  # Postfix smtp_tls_secure_cert_match = nexthop, dot-nexthop
    return route.host.name  # Postfix smtp_tls_verify_cert_match = hostname


async def _ehlo(session: TlsSession, helo_name: str) -> None:
    reply = await session.ehlo(helo_name)
    if not reply.is_positive:
        cls = RemotePermReject if reply.is_permanent else RemoteTempReject
        raise cls(reply=reply, scope=Scope.HOST)

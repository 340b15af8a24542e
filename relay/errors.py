"""The relay's exception tree; every delivery failure knows its SMTP class.

Contract: permanence is the class (`TemporaryFailure` = 4xx, keep queued;
`PermanentFailure` = 5xx, bounce), scope and fault are attributes. Each
`DeliveryError` carries an `SmtpReply` that is safe to show to a client or put in a
DSN. DANE problems are always temporary (RFC 7672 §2.2, §3; Postfix smtp_proto.c).
No I/O here.
"""

from __future__ import annotations

import enum

from relay.smtp.reply import SmtpReply

__all__ = [
    "BadDestinationDomain",
    "ConfigError",
    "ConnectFailed",
    "DaneNotAvailable",
    "DaneRequiredNoTls",
    "DaneVerificationFailed",
    "DeliveryError",
    "DnsTempFail",
    "Fault",
    "MailLoop",
    "MailLoopDeferred",
    "MalformedMx",
    "NoSuchDomain",
    "NullMx",
    "PkixInvalid",
    "PkixNameMismatch",
    "PkixUntrusted",
    "PeerTimeout",
    "PermanentFailure",
    "RelayError",
    "RemotePermReject",
    "RemoteTempReject",
    "Scope",
    "SpoolError",
    "StartTlsRefused",
    "TemporaryFailure",
    "TlsHandshakeFailed",
    "TlsRequiredNotOffered",
    "TlsaLookupFailed",
    "TlsaMalformed",
]


class Scope(enum.Enum):
    """Which part of the delivery the failure applies to (Postfix smtp_trouble.c)."""

    HOST = "host"  # this MX host only: try the next one
    DOMAIN = "domain"  # every host of the domain
    MESSAGE = "message"
    RECIPIENT = "recipient"


class Fault(enum.Enum):
    LOCAL_CONFIG = "local"
    REMOTE = "remote"


class RelayError(Exception):
    """Root of all relay errors; never raised directly."""


class ConfigError(RelayError):
    """Invalid configuration; the message is `file: key: expected …, got …`."""


class SpoolError(RelayError, OSError):
    """The spool could not durably store or update a record."""

    def __str__(self) -> str:
        # OSError would prefix "[Errno N]"; the message already says what failed.
        return str(self.strerror or (self.args[-1] if self.args else ""))


class DeliveryError(RelayError):
    """A delivery attempt ended; `reply` says how, `scope` says for whom."""

    default_reply = SmtpReply(451, "4.3.0", "Delivery failed")
    default_scope = Scope.HOST
    reason = "error"  # short token for logs and metric labels

    def __init__(
        self,
        text: str | None = None,
        *,
        reply: SmtpReply | None = None,
        scope: Scope | None = None,
        fault: Fault = Fault.REMOTE,
    ) -> None:
        base = reply or self.default_reply
        if text is not None and reply is None:
            base = SmtpReply(base.code, base.enhanced, text)
        self.reply = base
        self.scope = scope or self.default_scope
        self.fault = fault
        super().__init__(str(base))


class TemporaryFailure(DeliveryError):
    default_reply = SmtpReply(451, "4.4.0", "Temporary failure")


class DnsTempFail(TemporaryFailure):
    """SERVFAIL, timeout, bogus or indeterminate answer (RFC 7672 §2.1).

    `kind` is a closed token for logs and metric labels: "servfail", "bogus", "timeout",
    "refused", "truncated", "network", "cname-loop", "malformed" or "error".
    """

    default_reply = SmtpReply(451, "4.4.3", "DNS lookup failed")
    default_scope = Scope.DOMAIN
    reason = "dns"

    def __init__(
        self,
        text: str | None = None,
        *,
        kind: str = "error",
        reply: SmtpReply | None = None,
        scope: Scope | None = None,
        fault: Fault = Fault.REMOTE,
    ) -> None:
        super().__init__(text, reply=reply, scope=scope, fault=fault)
        self.kind = kind


class TlsaLookupFailed(TemporaryFailure):
    """The TLSA lookup failed: DANE status cannot be decided (RFC 7672 §2.2)."""

    default_reply = SmtpReply(451, "4.7.5", "TLSA lookup error")
    reason = "tlsa_lookup"


class DaneRequiredNoTls(TemporaryFailure):
    """DANE applies but the peer did not offer STARTTLS (RFC 7672 §2.2)."""

    default_reply = SmtpReply(451, "4.7.4", "TLS is required, but was not offered by host")
    reason = "dane_no_starttls"


class TlsRequiredNotOffered(TemporaryFailure):
    """The level demands TLS (encrypt) and the peer did not offer STARTTLS."""

    default_reply = SmtpReply(451, "4.7.4", "TLS is required, but was not offered by host")
    reason = "tls_not_offered"


class DaneVerificationFailed(TemporaryFailure):
    """Handshake completed but no usable TLSA record matched (RFC 7672 §3)."""

    default_reply = SmtpReply(451, "4.7.5", "Server certificate not verified")
    reason = "dane_verification"


class PkixNameMismatch(TemporaryFailure):
    """Levels verify/secure: the validated certificate does not name the destination."""

    default_reply = SmtpReply(451, "4.7.5", "Server certificate not verified")
    reason = "pkix_name"


class TlsaMalformed(TemporaryFailure):
    """Secure TLSA records whose data is malformed, with no usable record beside them."""

    default_reply = SmtpReply(451, "4.7.5", "TLSA records malformed")
    reason = "tlsa_malformed"


class DaneNotAvailable(TemporaryFailure):
    """Level dane-only, but the host has no secure usable TLSA records."""

    default_reply = SmtpReply(451, "4.7.5", "DANE required, but no usable TLSA records")
    reason = "dane_required"


class TlsHandshakeFailed(TemporaryFailure):
    default_reply = SmtpReply(451, "4.7.5", "Cannot start TLS: handshake failure")
    reason = "tls_handshake"


class PkixUntrusted(TlsHandshakeFailed):
    """Levels verify/secure: the handshake failed because the peer's chain does not lead
    to a CA of the trust store (`relay.dane.pkix.chain_untrusted`). Postfix says "Server
    certificate not trusted" (smtp_proto.c)."""

    default_reply = SmtpReply(451, "4.7.5", "Server certificate not trusted")
    reason = "pkix_untrusted"


class PkixInvalid(TlsHandshakeFailed):
    """Levels verify/secure: the handshake failed because OpenSSL refused the peer's chain
    for any other reason (expired or not yet valid, bad signature, wrong purpose). A
    verdict on the certificate, like `PkixUntrusted`, not a connection failure. Postfix
    says "Server certificate not verified" (smtp_proto.c)."""

    default_reply = SmtpReply(451, "4.7.5", "Server certificate not verified")
    reason = "pkix_invalid"


class StartTlsRefused(TlsHandshakeFailed):
    """The peer answered STARTTLS with neither 220 nor 421 (RFC 3207 §4: "454 TLS not
    available due to temporary reason"): it is up and talking SMTP, but has no TLS for us
    now, which is what not offering STARTTLS says (`TlsRequiredNotOffered`)."""

    reason = "starttls_refused"


class ConnectFailed(TemporaryFailure, ConnectionError):
    default_reply = SmtpReply(451, "4.4.1", "Connection failed")
    reason = "connect"


class PeerTimeout(TemporaryFailure, TimeoutError):
    default_reply = SmtpReply(451, "4.4.2", "Timed out talking to host")
    reason = "timeout"


class RemoteTempReject(TemporaryFailure):
    reason = "remote_4xx"


class MalformedMx(TemporaryFailure):
    """An MX record names no host name (an IP literal, octets outside LDH, RFC 5321 §5.1).

    The host is skipped for the next MX; with none left the domain is deferred: a DNS
    configuration error at the destination may be fixed (Postfix: "malformed" MX data).
    """

    # RFC 3463 §3.5: X.4.4 unable to route.
    default_reply = SmtpReply(451, "4.4.4", "MX target is not a host name")
    default_scope = Scope.HOST
    reason = "malformed_mx"


class PermanentFailure(DeliveryError):
    default_reply = SmtpReply(550, "5.0.0", "Permanent failure")
    default_scope = Scope.DOMAIN


class NoSuchDomain(PermanentFailure):
    default_reply = SmtpReply(550, "5.1.2", "Host or domain name not found")
    reason = "nxdomain"


class BadDestinationDomain(PermanentFailure):
    """The next-hop domain can never be a DNS name (bad syntax, an address literal): it
    never resolves, so it bounces at once instead of being retried for days."""

    # RFC 3463 §3.2: X.1.2 bad destination system address.
    default_reply = SmtpReply(550, "5.1.2", "Bad destination domain syntax")
    reason = "bad_domain"


class NullMx(PermanentFailure):
    """RFC 7505 §3: a null MX means the domain accepts no mail."""

    default_reply = SmtpReply(556, "5.1.10", "Domain does not accept mail (null MX)")
    reason = "null_mx"


class RemotePermReject(PermanentFailure):
    reason = "remote_5xx"


class MailLoop(PermanentFailure):
    """The most preferred MX host (or the configured next hop) is the relay itself:
    sending would loop, so the domain bounces (Postfix: "mail for D loops back to
    myself", RFC 3463 §3.5 X.4.6 routing loop detected)."""

    default_reply = SmtpReply(554, "5.4.6", "Mail loops back to myself")
    default_scope = Scope.DOMAIN
    reason = "mail_loop"


class MailLoopDeferred(TemporaryFailure):
    """The relay is one of the domain's MX hosts, and every host more preferred than it
    failed: the relay must not hand the mail to itself or a less preferred host, so the
    domain is deferred (Postfix truncates the MX list at its own preference)."""

    default_reply = SmtpReply(451, "4.4.6", "Mail loops back to myself")
    default_scope = Scope.DOMAIN
    reason = "mail_loop"

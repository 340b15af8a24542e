"""relay.delivery.secure.negotiate against scripted sessions, with real DANE verdicts.

Each test asserts the exact sequence of calls the peer saw (EHLO, STARTTLS, EHLO, QUIT,
ABORT, and CONNECT for the plaintext reconnection of level may) and the returned
`Negotiation`. The whole requirement x STARTTLS offered x handshake x verdict product is
covered by one table; the remaining tests pin the details (SNI, reference names, clock,
refused EHLO, cancellation).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from lab.certs import make_self_signed

from relay.dane import DaneStatus, TlsaRecord
from relay.dane.policy import AddressStatus, MxStatus, TlsaState, TlsRequirement, decide
from relay.delivery.planner import MxHost
from relay.delivery.route import HostRoute
from relay.delivery.secure import Negotiation, negotiate
from relay.errors import (
    ConnectFailed,
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

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HELO = "relay.example.net"
ADDRESS, PORT = "192.0.2.1", 2525
EHLO_OK = SmtpReply(250, "2.0.0", "mx")
VERSION, CIPHER = "TLSv1.3", "TLS_AES_256_GCM_SHA384"
HANDSHAKE_ERROR = "Cannot start TLS: handshake failure (alert)"


def self_signed(name: str) -> bytes:
    """A self-signed EC P-256 certificate for `name` (DER), from the lab's certificate factory."""
    return make_self_signed([name]).cert_der


SERVER_CERT = self_signed("mx.example.net")
OTHER_CERT = self_signed("attacker.example")
# Level secure: a name below the next-hop domain example.com (Postfix dot-nexthop).
NEXTHOP_CERT = self_signed("smtp.example.com")


def tlsa_3_1_1(der: bytes) -> TlsaRecord:
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    return TlsaRecord(3, 1, 1, hashlib.sha256(spki).digest())


def host_route(
    *,
    mx_status: MxStatus = MxStatus.SECURE,
    tlsa_base: str = "mx.example.net",
    records: tuple[TlsaRecord, ...] = (tlsa_3_1_1(SERVER_CERT),),
) -> HostRoute:
    """A level-dane route to mx.example.net (next hop example.com) with these records."""
    decision = decide("dane", mx_status, AddressStatus.SECURE, TlsaState.SECURE_USABLE)
    return HostRoute(
        host=MxHost("mx.example.net", 10),
        next_hop="example.com",
        mx_status=mx_status,
        addresses=(ADDRESS,),
        address_status=AddressStatus.SECURE,
        failed_families=(),
        canonical="" if tlsa_base == "mx.example.net" else tlsa_base,
        tlsa_lookups=(),
        tlsa_base=tlsa_base,
        tlsa_state=TlsaState.SECURE_USABLE,
        tlsa_records=records,
        usable=records,
        malformed=(),
        decision=decision,
        reason="",
        failure=None,
        dnssec="secure",
    )


# -- scripted peers ------------------------------------------------------------------------


@dataclass
class Peer:
    """How the server behaves on one connection."""

    ehlo: SmtpReply = EHLO_OK
    tls_ehlo: SmtpReply = EHLO_OK
    starttls_offered: bool = True
    starttls: list[bytes] | BaseException = field(default_factory=lambda: [SERVER_CERT])


class ScriptedSession:
    def __init__(self, opener: ScriptedOpener, peer: Peer) -> None:
        self.opener = opener
        self.peer = peer
        self.in_tls = False

    def supports(self, extension: str) -> bool:
        return extension == "starttls" and self.peer.starttls_offered and not self.in_tls

    async def ehlo(self, name: str) -> SmtpReply:
        self.opener.calls.append(f"EHLO {name}")
        return self.peer.tls_ehlo if self.in_tls else self.peer.ehlo

    async def starttls(self, server_hostname: str, context: ssl.SSLContext) -> list[bytes]:
        self.opener.calls.append(f"STARTTLS {server_hostname}")
        pkix = self.opener.pkix_context
        assert context is (
            pkix if server_hostname in self.opener.pkix_names else self.opener.context
        )
        if isinstance(self.peer.starttls, BaseException):
            raise self.peer.starttls
        self.in_tls = True
        return list(self.peer.starttls)

    def tls_info(self) -> tuple[str, str]:
        return (VERSION, CIPHER) if self.in_tls else ("", "")

    async def quit(self) -> None:
        self.opener.calls.append("QUIT")

    def abort(self) -> None:
        self.opener.calls.append("ABORT")


class ScriptedOpener:
    """Hands out one session per scripted peer; `open` is only used for reconnections."""

    def __init__(self, *peers: Peer | DeliveryError) -> None:
        self.peers = list(peers)
        self.calls: list[str] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.pkix_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.pkix_names: set[str] = set()  # SNI names for which pkix_context is expected
        self.clock_calls = 0

    def first(self) -> ScriptedSession:
        peer = self.peers.pop(0)
        assert isinstance(peer, Peer)
        return ScriptedSession(self, peer)

    async def open(self, address: str, port: int) -> ScriptedSession:
        self.calls.append(f"CONNECT {address}:{port}")
        peer = self.peers.pop(0)
        if isinstance(peer, DeliveryError):
            raise peer
        return ScriptedSession(self, peer)

    def clock(self) -> datetime:
        self.clock_calls += 1
        return NOW


async def run(
    opener: ScriptedOpener,
    requirement: TlsRequirement,
    route: HostRoute | None = None,
) -> tuple[ScriptedSession, Negotiation[ScriptedSession]]:
    session = opener.first()
    if requirement in (R.VERIFY, R.SECURE):
        opener.pkix_names.add("example.com" if requirement is R.SECURE else "mx.example.net")
    result = await negotiate(
        opener,
        session,
        route or host_route(),
        ADDRESS,
        PORT,
        requirement,
        HELO,
        opener.context,
        opener.clock,
        opener.pkix_context,
    )
    return session, result


# -- the whole table -----------------------------------------------------------------------

R = TlsRequirement
E, S, Q, A = f"EHLO {HELO}", "STARTTLS mx.example.net", "QUIT", "ABORT"
C = f"CONNECT {ADDRESS}:{PORT}"
SN = "STARTTLS example.com"  # level secure: SNI is the next-hop domain
BAD = TlsHandshakeFailed(HANDSHAKE_ERROR, scope=Scope.HOST)

# requirement, STARTTLS offered, handshake ok, chain matches ->
#   calls (CONNECT: the plaintext reconnection), tls, failure type, dane, dane_reason
TABLE = [
    # none: STARTTLS is never attempted, whatever the peer offers.
    (R.NONE, True, True, True, [E], "none", None, "none", ""),
    (R.NONE, False, True, True, [E], "none", None, "none", ""),
    # may: TLS when offered; a failed handshake reconnects in plaintext (RFC 7435 §3).
    (R.MAY, False, True, True, [E], "none", None, "none", ""),
    (R.MAY, True, True, True, [E, S, E], "encrypted", None, "none", ""),
    (R.MAY, True, True, False, [E, S, E], "encrypted", None, "none", ""),
    (R.MAY, True, False, True, [E, S, A, C, E], "none", None, "none", ""),
    # encrypt: TLS mandatory, no authentication.
    (R.ENCRYPT, False, True, True, [E, Q, A], "none", TlsRequiredNotOffered, "none", ""),
    (R.ENCRYPT, True, True, True, [E, S, E], "encrypted", None, "none", ""),
    (R.ENCRYPT, True, True, False, [E, S, E], "encrypted", None, "none", ""),
    (R.ENCRYPT, True, False, True, [E, S, A], "none", TlsHandshakeFailed, "none", ""),
    # dane: RFC 7672 §2.2 (no STARTTLS, failed handshake) and §3 (verdict).
    (R.DANE, False, True, True, [E, Q, A], "none", DaneRequiredNoTls, "fail", "no-starttls"),
    (R.DANE, True, True, True, [E, S, E], "verified", None, "pass", "match"),
    (R.DANE, True, True, False, [E, S, Q, A], "none", DaneVerificationFailed, "fail", "no-match"),
    (R.DANE, True, False, True, [E, S, A], "none", TlsHandshakeFailed, "fail", "handshake"),
    # verify: Postfix smtp_tls_verify_cert_match = hostname; chain checked by OpenSSL.
    (R.VERIFY, False, True, True, [E, Q, A], "none", TlsRequiredNotOffered, "none", ""),
    (R.VERIFY, True, True, True, [E, S, E], "verified", None, "none", ""),
    (R.VERIFY, True, True, False, [E, S, Q, A], "none", PkixNameMismatch, "none", ""),
    (R.VERIFY, True, False, True, [E, S, A], "none", TlsHandshakeFailed, "none", ""),
    # secure: Postfix smtp_tls_secure_cert_match = nexthop, dot-nexthop.
    (R.SECURE, False, True, True, [E, Q, A], "none", TlsRequiredNotOffered, "none", ""),
    (R.SECURE, True, True, True, [E, SN, E], "verified", None, "none", ""),
    (R.SECURE, True, True, False, [E, SN, Q, A], "none", PkixNameMismatch, "none", ""),
    (R.SECURE, True, False, True, [E, SN, A], "none", TlsHandshakeFailed, "none", ""),
]


@pytest.mark.parametrize(
    ("requirement", "offered", "handshake_ok", "matches", "calls", "tls", "failure", "dane",
     "dane_reason"),
    TABLE,
)  # fmt: skip
async def test_table(
    requirement: TlsRequirement,
    offered: bool,
    handshake_ok: bool,
    matches: bool,
    calls: list[str],
    tls: str,
    failure: type[DeliveryError] | None,
    dane: str,
    dane_reason: str,
) -> None:
    good = NEXTHOP_CERT if requirement is R.SECURE else SERVER_CERT
    chain = [good if matches else OTHER_CERT]
    first = Peer(starttls_offered=offered, starttls=chain if handshake_ok else BAD)
    opener = ScriptedOpener(first, Peer(starttls=BAD))
    first_session, result = await run(opener, requirement)

    assert opener.calls == calls
    fallback = C in calls
    assert result.starttls_offered is offered
    assert (result.tls, result.dane, result.dane_reason) == (tls, dane, dane_reason)
    assert result.fallback is fallback
    if failure is None:
        assert result.failure is None
        assert result.session is not None
        assert (result.session is first_session) is not fallback
    else:
        assert type(result.failure) is failure
        assert result.failure.scope is Scope.HOST
        assert result.session is None
    tls_attempted = offered and requirement is not R.NONE
    sni = "example.com" if requirement is R.SECURE else "mx.example.net"
    assert result.sni == (sni if tls_attempted else None)
    handshake_done = tls_attempted and handshake_ok
    handshake_failed = tls_attempted and not handshake_ok
    assert result.handshake_error == (HANDSHAKE_ERROR if handshake_failed else "")
    assert result.chain == (tuple(chain) if handshake_done else None)
    tls_info = (VERSION, CIPHER) if handshake_done else ("", "")
    assert (result.tls_version, result.cipher) == tls_info
    # The chain is verified only where DANE applies, and only then is the clock read.
    dane_verified = handshake_done and requirement is R.DANE
    assert (result.verdict is not None) is dane_verified
    assert opener.clock_calls == (1 if dane_verified else 0)
    if result.verdict is not None:
        expected = DaneStatus.VERIFIED if matches else DaneStatus.FAILED
        assert (result.verdict.status, result.verdict.reason) == (expected, dane_reason)


async def test_table_covers_the_product() -> None:
    """Every requirement x offered x handshake x verdict case that can differ is listed."""
    keys = {(r, o, h, m) for r, o, h, m, *_ in TABLE}
    assert len(keys) == len(TABLE)
    for requirement in R:
        for offered in (True, False):
            for handshake_ok in (True, False):
                for matches in (True, False):
                    # Collapse the cases the peer never reaches (no STARTTLS, failed handshake).
                    reached_tls = offered and requirement is not R.NONE
                    h = handshake_ok if reached_tls else True
                    m = matches if reached_tls and handshake_ok else True
                    assert (requirement, offered, h, m) in keys, (requirement, offered, h, m)


# -- details -------------------------------------------------------------------------------


async def test_pkix_failure_text_and_reply() -> None:
    opener = ScriptedOpener(Peer(starttls=[SERVER_CERT]))
    _, result = await run(opener, R.SECURE)  # mx.example.net is not below example.com
    assert isinstance(result.failure, PkixNameMismatch)
    assert (result.failure.reply.code, result.failure.reply.enhanced) == (451, "4.7.5")
    assert result.failure.reply.text == (
        "Server certificate not verified (name mismatch: example.com)"
    )


async def test_pkix_levels_without_a_trust_store_fail_closed() -> None:
    opener = ScriptedOpener(Peer())
    session = opener.first()
    result = await negotiate(
        opener, session, host_route(), ADDRESS, PORT, R.VERIFY, HELO, opener.context, opener.clock
    )
    assert isinstance(result.failure, TlsHandshakeFailed)
    assert opener.calls == [E, A]


async def test_dane_failure_text_and_reply() -> None:
    opener = ScriptedOpener(Peer(starttls=[OTHER_CERT]))
    _, result = await run(opener, R.DANE)
    assert isinstance(result.failure, DaneVerificationFailed)
    assert (result.failure.reply.code, result.failure.reply.enhanced) == (451, "4.7.5")
    assert result.failure.reply.text == "Server certificate not verified (no-match)"
    assert "MAIL" not in " ".join(opener.calls)


async def test_no_starttls_replies_are_4_7_4() -> None:
    for requirement in (R.DANE, R.ENCRYPT):
        _, result = await run(ScriptedOpener(Peer(starttls_offered=False)), requirement)
        assert result.failure is not None
        assert (result.failure.reply.code, result.failure.reply.enhanced) == (451, "4.7.4")


async def test_insecure_mx_rrset_earns_trusted() -> None:
    """RFC 7672 §2.2.1: a DANE match via an insecure MX RRset is "trusted"."""
    opener = ScriptedOpener(Peer())
    _, result = await run(opener, R.DANE, host_route(mx_status=MxStatus.INSECURE))
    assert (result.tls, result.dane, result.failure) == ("trusted", "pass", None)


async def test_sni_is_the_tlsa_base_domain() -> None:
    """RFC 7672 §8.1: SNI (and the DANE-TA name checks) use the CNAME-expanded base."""
    opener = ScriptedOpener(Peer())
    _, result = await run(opener, R.DANE, host_route(tlsa_base="mx.hosting.example"))
    assert opener.calls == [E, "STARTTLS mx.hosting.example", E]
    assert result.sni == "mx.hosting.example"
    assert result.tls == "verified"


async def test_dane_ta_names_come_from_the_route() -> None:
    """A DANE-TA(2) record on the issuer: the leaf's name must be a reference identifier
    of the route (TLSA base domain, MX host, next-hop domain), as relay.dane.verify says."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2099, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
            .not_valid_after(datetime(2099, 1, 1, tzinfo=UTC))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(Encoding.DER)

    ca_der = ca.public_bytes(Encoding.DER)
    spki = ca.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    route = host_route(records=(TlsaRecord(2, 1, 1, hashlib.sha256(spki).digest()),))

    _, good = await run(ScriptedOpener(Peer(starttls=[leaf("example.com"), ca_der])), R.DANE, route)
    assert (good.tls, good.dane, good.dane_reason) == ("verified", "pass", "match")
    assert good.verdict is not None and good.verdict.match_depth == 1
    _, bad = await run(
        ScriptedOpener(Peer(starttls=[leaf("other.example"), ca_der])), R.DANE, route
    )
    assert (bad.tls, bad.dane, bad.dane_reason) == ("none", "fail", "name-mismatch")
    assert isinstance(bad.failure, DaneVerificationFailed)


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (SmtpReply(421, "4.3.2", "busy"), RemoteTempReject),
        (SmtpReply(554, "5.7.1", "no"), RemotePermReject),
    ],
)
async def test_refused_ehlo_fails_before_starttls(
    reply: SmtpReply, error: type[DeliveryError]
) -> None:
    opener = ScriptedOpener(Peer(ehlo=reply))
    _, result = await run(opener, R.DANE)
    assert opener.calls == [E, A]
    assert type(result.failure) is error
    assert result.failure.reply == reply and result.failure.scope is Scope.HOST
    assert (result.starttls_offered, result.sni, result.dane) == (None, None, "none")


async def test_refused_ehlo_over_tls_keeps_what_tls_gave() -> None:
    """RFC 3207 §4.2: EHLO again after TLS; its refusal fails the connection, while the
    TLS outcome already reached stays on the value (the engine logs it)."""
    opener = ScriptedOpener(Peer(tls_ehlo=SmtpReply(421, "4.3.2", "busy")))
    _, result = await run(opener, R.DANE)
    assert opener.calls == [E, S, E, A]
    assert isinstance(result.failure, RemoteTempReject)
    assert (result.tls, result.dane, result.dane_reason) == ("verified", "pass", "match")
    assert result.session is None


async def test_may_fallback_reconnect_failure_is_returned() -> None:
    refused = ConnectFailed("cannot connect: refused", scope=Scope.HOST)
    opener = ScriptedOpener(Peer(starttls=BAD), refused)
    _, result = await run(opener, R.MAY)
    assert opener.calls == [E, S, A, C, A]
    assert result.failure is refused
    assert (result.fallback, result.handshake_error, result.session) == (
        True,
        HANDSHAKE_ERROR,
        None,
    )


async def test_may_fallback_refused_ehlo_aborts_the_new_session() -> None:
    opener = ScriptedOpener(Peer(starttls=BAD), Peer(ehlo=SmtpReply(421, "4.3.2", "busy")))
    _, result = await run(opener, R.MAY)
    assert opener.calls == [E, S, A, C, E, A]
    assert isinstance(result.failure, RemoteTempReject)


async def test_cancellation_aborts_and_propagates() -> None:
    opener = ScriptedOpener(Peer(starttls=asyncio.CancelledError()))
    with pytest.raises(asyncio.CancelledError):
        await run(opener, R.DANE)
    assert opener.calls == [E, S, A]


async def test_connection_trouble_during_starttls_is_a_failure() -> None:
    lost = ConnectFailed("lost connection during STARTTLS", scope=Scope.HOST)
    opener = ScriptedOpener(Peer(starttls=lost))
    _, result = await run(opener, R.MAY)
    # Not a handshake failure: no plaintext retry, whatever the level.
    assert opener.calls == [E, S, A]
    assert result.failure is lost and not result.fallback
